"""Inference client: run a run directory's deployed model from text (ONNX Runtime, or TensorRT engines).

``TextClassifier.from_artifacts(run_dir)`` reads the run manifest, checks hashes, loads the tokenizer
(``tokenizers``) and an ONNX Runtime session or TensorRT engine; ``predict`` / ``predict_logits`` classify
texts or text pairs; ``MicroBatcher`` groups concurrent single requests. Imports neither torch nor
transformers. ``OrtRunner`` is the low-level ONNX Runtime runner used by the validation stage.
"""

from nxm_deploy.client.batching import MicroBatcher
from nxm_deploy.client.classifier import TextClassifier
from nxm_deploy.client.onnxruntime import OrtRunner

__all__ = ["MicroBatcher", "OrtRunner", "TextClassifier"]
