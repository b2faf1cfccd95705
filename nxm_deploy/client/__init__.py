"""Inference client: run a run directory's deployed model from text (ONNX Runtime, or TensorRT engines).

``TextClassifier.from_artifacts(run_dir)`` reads the run manifest, checks hashes, loads the tokenizer
(``tokenizers``) and an ONNX Runtime session or TensorRT engine; ``predict`` / ``predict_logits`` classify
texts or text pairs; ``MicroBatcher`` groups concurrent single requests. Imports neither torch nor
transformers. The runner of a single ONNX model (Polygraphy's interface) is
:class:`nxm_deploy.runtimes.onnxruntime.OnnxRuntimeRunner`.
"""

from nxm_deploy.client.batching import MicroBatcher
from nxm_deploy.client.classifier import TextClassifier

__all__ = ["MicroBatcher", "TextClassifier"]
