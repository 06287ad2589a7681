"""Stage 0, the bottom of the import graph: what every stage shares and nothing depends on
above it. Keypoint layouts, constants, image reading and resizing, bilinear sampling, the
COCO annotation file reader and validator, safe torch file loading, plain-data config values.
Imports only third-party libraries (numpy, torch, OpenCV, omegaconf)."""
