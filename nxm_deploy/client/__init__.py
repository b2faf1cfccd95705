"""Inference client: run exported artifacts (ONNX Runtime on CPU; TensorRT engines in a later issue)."""

from nxm_deploy.client.onnxruntime import OrtRunner

__all__ = ["OrtRunner"]
