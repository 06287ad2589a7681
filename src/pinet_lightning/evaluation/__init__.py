"""Stage 2, scoring: COCO and CrowdPose keypoint AP (pycocotools, faster-coco-eval) and the
evaluator that gathers predictions across ranks. Independent of the network."""
