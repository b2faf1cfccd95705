"""TensorRT engines: specs (:mod:`.spec`), FP16 graph conversion (:mod:`.fp16`), builds (:mod:`.trt`, the only
module that imports ``tensorrt``, lazily), the post-build layer check (:mod:`.inspect`), the stage and the
``build-engine`` command (:mod:`.stage`), and the runtime used by the client (:mod:`.trt_runtime`)."""
