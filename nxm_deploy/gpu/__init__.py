"""NVIDIA GPU inference with PyTorch: 2:4 semi-structured sparse GEMMs (cuSPARSELt), INT8, CUDA graphs.

* :mod:`nxm_deploy.gpu.kernels` - the Linear replacements (2:4 FP16, 2:4 INT8 with the dequantization scale
  fused as cuSPARSELt's per-row alpha, dense INT8 through ``torch._int_mm``) and :func:`convert_model`;
* :mod:`nxm_deploy.gpu.graphs` - one CUDA graph per input shape, replayed;
* :mod:`nxm_deploy.gpu.bench` - ``nxm-deploy bench-gpu``: GEMM and end-to-end tables.

Everything here needs a CUDA device at run time; importing it does not.
"""
