"""Stage 3, from network outputs to people: batched decoding (peaks, proposals, refinement,
flip test), pose fusion, the public ``Predictor`` and the drawing of poses. Reads ``model``
and ``codec``; no Lightning, no pycocotools, no data pipeline."""
