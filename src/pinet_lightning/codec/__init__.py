"""Stage 1, the frame: where output cells sit in the input (the cell/pixel conventions) and
PINet's training targets (encode, the sparse batch and its device-side readers). Data,
model, inference and training all speak it; it imports only ``core``."""
