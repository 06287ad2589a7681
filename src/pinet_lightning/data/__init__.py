"""Stage 3, the training and evaluation data: augmentation, the synthetic crowd generator,
the COCO keypoint dataset and the Lightning data module. Builds targets with ``codec``;
never imports ``model`` or ``inference`` (data workers must not need the network)."""
