"""Stage 2, the network: the timm backbone, the PPG heads, the pose refinement graph network,
and the one place networks are saved and loaded (with the published-weights adaptor beside
it). Plain torch: no Lightning, no data pipeline, no evaluation."""
