"""INT8 fake quantization with learned scales (LSQ) that exports as ONNX QuantizeLinear/DequantizeLinear."""

from nxm_deploy.quantization.fake_quant import (
    QuantLinear,
    TensorQuantizer,
    calibrate,
    export_mode,
    quantize_model_,
    quantized_modules,
)

__all__ = ["TensorQuantizer", "QuantLinear", "quantize_model_", "calibrate", "export_mode", "quantized_modules"]
