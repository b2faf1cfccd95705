"""TensorRT engine specs and builds. Only ``nxm_deploy.engine.trt`` names ``tensorrt`` (imported lazily)."""
