"""ONNX export (dense FP32, sparse INT8 Q/DQ) and the per-layer n:m verifier of exported graphs."""
