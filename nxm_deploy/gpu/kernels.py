"""Linear layers on NVIDIA GPU kernels: 2:4 semi-structured sparse (cuSPARSELt) in FP16 and INT8, dense INT8.

The four inference variants of a model (:data:`VARIANTS`):

* ``dense-fp16``: every Linear an ``nn.Linear`` in FP16 (cuBLAS);
* ``sparse-fp16``: each 2:4 Linear a :class:`SemiSparseLinear` in FP16 (``torch._cslt_sparse_mm``);
* ``dense-int8``: each 2:4 Linear an :class:`Int8Linear` on ``torch._int_mm`` (INT8 x INT8 -> INT32, cuBLASLt),
  dequantized by ``acc * (s_w[n] * s_x) + bias``;
* ``sparse-int8``: each 2:4 Linear a :class:`SemiSparseLinear` on INT8 codes: ``torch._cslt_sparse_mm`` with the
  dequantization scale ``alpha[n] = s_w[n] * s_x`` fused as cuSPARSELt's per-output-row alpha (vector scaling)
  and FP16 output.

INT8 numerics are those of our Q/DQ graph (:func:`nxm_deploy.quantization.fake_quant.int8_codes`, GPUSQ-TLM Eq. 1-2):
symmetric, zero point 0, ``s = amax / 127``, ``q = clamp(round(x / s), -128, 127)`` (round half to even), activation
scale per tensor, weight scale per output channel. Weights keep their exact zeros, so the INT8 codes of a 2:4
weight are 2:4 too.

cuSPARSELt's shape rules (``torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS``): the
sparse operand (the weight, ``[out_features, in_features]``) must have both dimensions multiples of 32 (INT8) or
16 (FP16); the dense operand's rows (tokens) are padded here to multiples of 16 (INT8) / 8 (FP16) and the padding
sliced off. A layer that breaks a rule (e.g. a 2-class classifier) stays dense, and :func:`convert_model` says why.

The compressed weight (values + metadata, ``torch._cslt_compress``) is made once per layer and reused by every call.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from nxm_deploy.errors import ConfigError
from nxm_deploy.quantization.fake_quant import QUANT_MAX, int8_codes

log = logging.getLogger("nxm_deploy.gpu")

VARIANTS = ("dense-fp16", "sparse-fp16", "dense-int8", "sparse-int8")
#: cuSPARSELt: multiple of both dimensions of the sparse operand, and of the dense operand's rows, per dtype
SPARSE_MULTIPLE = {torch.int8: 32, torch.float16: 16, torch.bfloat16: 16}
DENSE_ROW_MULTIPLE = {torch.int8: 16, torch.float16: 8, torch.bfloat16: 8}
#: torch._int_mm: K and N multiples of 8, M > 16
INT_MM_MULTIPLE, INT_MM_MIN_ROWS = 8, 17


def kernel_reason(out_features: int, in_features: int, variant: str) -> str | None:
    """Why a Linear of this shape cannot run on ``variant``'s kernel, or None when it can.

    Args:
        out_features / in_features: the weight's ``[out, in]`` (``N``, ``K``).
        variant: one of :data:`VARIANTS`.
    """
    if variant == "dense-fp16":
        return None
    if variant == "dense-int8":
        if out_features % INT_MM_MULTIPLE or in_features % INT_MM_MULTIPLE:
            return f"{out_features}x{in_features} is not a multiple of 8 in both dimensions (torch._int_mm)"
        return None
    if variant not in VARIANTS:
        raise ConfigError(f"Unknown GPU variant {variant!r}; known: {', '.join(VARIANTS)}.")
    dtype = torch.int8 if variant == "sparse-int8" else torch.float16
    m = SPARSE_MULTIPLE[dtype]
    if out_features % m or in_features % m:
        return (f"{out_features}x{in_features} is not a multiple of {m}x{m} (cuSPARSELt "
                f"{'INT8' if dtype == torch.int8 else 'FP16'} sparse operand)")
    return None


def is_2of4(weight: torch.Tensor) -> bool:
    """True when every 4 consecutive weights along the input axis (dim 1) hold at most 2 nonzeros."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _pad_rows(x2d: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    rows = x2d.shape[0]
    target = max(-(-rows // multiple) * multiple, -(-minimum // multiple) * multiple)
    return x2d if target == rows else nn.functional.pad(x2d, (0, 0, 0, target - rows))


class FakeQuant(nn.Module):
    """A per-tensor INT8 quantize-dequantize in the input's dtype (an INT8 tensor of the Q/DQ graph that the GPU
    model keeps in FP16: GEMM outputs, attention inputs). ``y = clamp(round(x / s), -128, 127) * s``."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (int8_codes(x, self.scale).float() * self.scale).to(x.dtype)


class SemiSparseLinear(nn.Module):
    """A 2:4 Linear on cuSPARSELt: FP16 weights, or INT8 codes with the dequantization fused as alpha.

    Shapes: input ``[..., in_features]`` FP16 -> output ``[..., out_features]`` FP16.

    Args:
        weight: ``[out, in]`` float, 2:4 along ``in`` (pruned entries exactly 0), on the CUDA device.
        bias: ``[out]`` or None.
        input_scale: INT8 only: the activation scale ``s_x`` (0-d, FP32); None selects FP16.
        weight_scale: INT8 only: ``[out]`` per-output-channel weight scales ``s_w`` (FP32).
        output_quant: optional :class:`FakeQuant` applied to the output (an INT8-out GEMM of the Q/DQ graph).

    Raises:
        ConfigError: the weight is not 2:4, or its shape breaks cuSPARSELt's rule (:func:`kernel_reason`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, input_scale: torch.Tensor | None = None,
                 weight_scale: torch.Tensor | None = None, output_quant: nn.Module | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.int8 = input_scale is not None
        reason = kernel_reason(out_features, in_features, "sparse-int8" if self.int8 else "sparse-fp16")
        if reason:
            raise ConfigError(f"Cannot make a 2:4 sparse Linear: {reason}.")
        if not is_2of4(weight):
            raise ConfigError(f"Cannot make a 2:4 sparse Linear of a {out_features}x{in_features} weight that is not 2:4.")
        self.in_features, self.out_features = in_features, out_features
        if self.int8:
            codes = int8_codes(weight, weight_scale.float().reshape(-1, 1))
            self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
            self.register_buffer("alpha", (weight_scale.float().reshape(-1) * self.input_scale).contiguous())
            self.register_buffer("packed", torch._cslt_compress(codes.contiguous()))
            self.dtype = torch.int8
        else:
            self.register_buffer("packed", torch._cslt_compress(weight.detach().half().contiguous()))
            self.alpha = None
            self.dtype = torch.float16
        self.register_buffer("bias", None if bias is None else bias.detach().half().clone())
        self.output_quant = output_quant
        # set by convert_model's check: the dequantization scale (INT8) and the bias in the kernel's epilogue,
        # else applied after it (INT32 out, one elementwise kernel)
        self.fuse_alpha = self.int8
        self.fuse_bias = True
        self.alg_id = 0

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        """``[M, in]`` -> ``[M, out]`` FP16 (before the output quantizer)."""
        rows = x2d.shape[0]
        xp = _pad_rows(x2d, DENSE_ROW_MULTIPLE[self.dtype])
        operand = int8_codes(xp, self.input_scale) if self.int8 else xp.half()
        if self.int8 and not self.fuse_alpha:
            acc = torch._cslt_sparse_mm(self.packed, operand.t(), out_dtype=torch.int32, transpose_result=True,
                                        alg_id=self.alg_id)[:rows]
            y = acc.float() * self.alpha
            return (y if self.bias is None else y + self.bias.float()).half()
        y = torch._cslt_sparse_mm(self.packed, operand.t(), bias=self.bias if self.fuse_bias else None,
                                  alpha=self.alpha, out_dtype=torch.float16 if self.int8 else None,
                                  transpose_result=True, alg_id=self.alg_id)
        y = y[:rows]
        if self.bias is not None and not self.fuse_bias:
            y = y + self.bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernel(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.out_features)
        return y if self.output_quant is None else self.output_quant(y)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {'int8' if self.int8 else 'fp16'}, "
                f"fuse_alpha={self.fuse_alpha}, fuse_bias={self.fuse_bias}, alg_id={self.alg_id}")


class Int8Linear(nn.Module):
    """A dense INT8 Linear: ``torch._int_mm(q(x), q(W)ᵀ)`` (INT32) dequantized by ``acc * s_w[n] * s_x + bias``.

    Shapes: input ``[..., in_features]`` FP16 -> output ``[..., out_features]`` FP16. Same arguments as
    :class:`SemiSparseLinear` (``input_scale`` / ``weight_scale`` required).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, input_scale: torch.Tensor,
                 weight_scale: torch.Tensor, output_quant: nn.Module | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        reason = kernel_reason(out_features, in_features, "dense-int8")
        if reason:
            raise ConfigError(f"Cannot make an INT8 Linear: {reason}.")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.register_buffer("codes_t", int8_codes(weight, weight_scale.float().reshape(-1, 1)).t())  # [K, N] column-major
        self.register_buffer("alpha", (weight_scale.float().reshape(-1) * self.input_scale).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.output_quant = output_quant

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        rows = x2d.shape[0]
        acc = torch._int_mm(int8_codes(_pad_rows(x2d, INT_MM_MULTIPLE, INT_MM_MIN_ROWS), self.input_scale), self.codes_t)
        y = acc[:rows].float() * self.alpha
        if self.bias is not None:
            y = y + self.bias
        return y.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernel(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.out_features)
        return y if self.output_quant is None else self.output_quant(y)


def reference_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, *,
                     input_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernels compute, in FP32 dense math: ``dq(q(x)) @ dq(q(W))ᵀ + b`` (INT8) or ``x @ Wᵀ + b`` (FP16
    weights). Used to check every converted layer once on the device (:func:`convert_model`, ``check``)."""
    x = x.float()
    if input_scale is not None:
        s_w = weight_scale.float().reshape(-1, 1)
        w = int8_codes(weight, s_w).float() * s_w
        x = int8_codes(x, input_scale.float()).float() * input_scale.float()
    else:
        w = weight.half().float()
    y = x @ w.t()
    return y if bias is None else y + bias.float()


@dataclasses.dataclass
class LayerRecord:
    """One Linear of a converted model: what it became and why."""

    name: str
    shape: tuple[int, int]
    kernel: str  # "cusparselt-int8", "cusparselt-fp16", "int_mm", "dense-fp16"
    reason: str | None = None  # why it stayed dense
    fuse_alpha: bool | None = None
    fuse_bias: bool | None = None
    max_abs_err: float | None = None  # vs reference_linear on a probe input


def _scales_of(module: nn.Module, calibration: dict[str, float] | None, name: str):
    """``(input_scale, weight_scale, output_quant)`` of a Linear: learned (QuantLinear) or calibrated (random
    weights for speed: per-channel max of |W|, per-tensor max of |x| from ``calibration``)."""
    from nxm_deploy.quantization.fake_quant import QuantLinear

    if isinstance(module, QuantLinear):
        out_q = getattr(module, "output_quantizer", None)
        return (module.input_quantizer.scale().detach(), module.weight_quantizer.scale().detach(),
                None if out_q is None or not out_q.enabled else FakeQuant(out_q.scale()))
    if calibration is None or name not in calibration:
        raise ConfigError(f"Layer {name} has no learned INT8 scales and no calibrated input range.",
                          hint="Convert a QAT model (load_qat_model) or pass calibration={name: amax}.")
    w = module.weight.detach().float()
    weight_scale = w.abs().amax(dim=1).clamp(min=1e-8) / QUANT_MAX
    return torch.tensor(max(calibration[name], 1e-8) / QUANT_MAX, device=w.device), weight_scale, None


def _check_layer(new: nn.Module, weight, bias, scales, record: LayerRecord, tolerance: float) -> None:
    """Run the layer's kernel once on a random probe against :func:`reference_linear`; for the sparse kernel try the
    bias (and INT8 scale) fused in the epilogue first, then applied after (pytorch/pytorch#115154). Raises RuntimeError
    when no option matches."""
    gen = torch.Generator(device=weight.device).manual_seed(0)
    in_scale = scales[0] if scales else None
    amplitude = float(in_scale) * 100 if in_scale is not None else 1.0
    x = ((torch.rand(37, weight.shape[1], device=weight.device, generator=gen) * 2 - 1) * amplitude).half()
    ref = reference_linear(weight, bias, x.float(), input_scale=in_scale, weight_scale=scales[1] if scales else None)
    bound = tolerance * (ref.abs().max().item() + 1e-6)
    errors = []
    if isinstance(new, SemiSparseLinear):  # (fuse_alpha, fuse_bias), fastest first
        options = [(new.int8, True), (new.int8, False)] + ([(False, False)] if new.int8 else [])
    else:
        options = [(None, None)]
    for fuse_alpha, fuse_bias in options:
        if fuse_alpha is not None:
            new.fuse_alpha, new.fuse_bias = fuse_alpha, fuse_bias
        label = f"fuse_alpha={fuse_alpha}, fuse_bias={fuse_bias}"
        try:
            err = (new._kernel(x).float() - ref).abs().max().item()
        except RuntimeError as exc:  # a kernel configuration cuSPARSELt refuses
            errors.append(f"{label}: {str(exc).splitlines()[0][:160]}")
            continue
        if err <= bound:
            record.fuse_alpha, record.fuse_bias, record.max_abs_err = fuse_alpha, fuse_bias, err
            return
        errors.append(f"{label}: max |err| {err:.3g} > {bound:.3g}")
    raise RuntimeError(f"{record.name} ({record.kernel}) disagrees with the FP32 reference: {'; '.join(errors)}")


def convert_model(model: nn.Module, variant: str, targets: list[str], *, calibration: dict[str, float] | None = None,
                  check: bool = True, tolerance: float = 2e-2) -> list[LayerRecord]:
    """In place: put ``model`` on the GPU in FP16 with its 2:4 ``targets`` on ``variant``'s kernels.

    Args:
        model: a Hugging Face model on the CUDA device; a QAT model (targets are ``QuantLinear``) brings its
            learned scales, its output quantizers (kept as :class:`FakeQuant` after the GEMM) and attention
            quantizers (kept as fake quant in FP16); a float model needs ``calibration`` for INT8 variants.
        variant: one of :data:`VARIANTS`.
        targets: fqns of the 2:4 Linears. Linears outside them stay dense FP16.
        calibration: ``{fqn: amax of the layer input}`` for float models in INT8 variants.
        check: run the first converted layer of each shape once against :func:`reference_linear` (relative
            ``tolerance``); the others of that shape take the epilogue options it settled.

    Returns:
        list[LayerRecord]: one per target (kernel used, or why it stayed dense).

    Raises:
        ConfigError: unknown variant; a target missing or not a Linear.
        RuntimeError: a converted layer disagrees with the reference.
    """
    from nxm_deploy.quantization.fake_quant import QuantLinear, TensorQuantizer

    if variant not in VARIANTS:
        raise ConfigError(f"Unknown GPU variant {variant!r}; known: {', '.join(VARIANTS)}.")
    records, replacements, checked = [], {}, {}
    int8 = variant.endswith("int8")
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"Target {name} is not a module of the model.") from exc
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"Target {name} is a {type(module).__name__}, not a Linear.")
        weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
        record = LayerRecord(name, tuple(weight.shape), "dense-fp16")
        reason = kernel_reason(*weight.shape, variant)
        if reason is None and variant.startswith("sparse") and not is_2of4(weight):
            reason = "the weight is not 2:4"
        new = None
        if variant == "dense-fp16" or reason:
            record.reason = reason
        else:
            scales = _scales_of(module, calibration, name) if int8 else None
            if variant == "dense-int8":
                new, record.kernel = Int8Linear(weight, bias, input_scale=scales[0], weight_scale=scales[1],
                                                output_quant=scales[2]), "int_mm"
            else:
                new = SemiSparseLinear(weight, bias, input_scale=scales[0] if scales else None,
                                       weight_scale=scales[1] if scales else None,
                                       output_quant=scales[2] if scales else None)
                record.kernel = f"cusparselt-{'int8' if int8 else 'fp16'}"
            key = (record.shape, record.kernel, bias is not None)
            if key in checked:  # same shape and kernel: the epilogue options the first one settled
                first = checked[key]
                record.fuse_alpha, record.fuse_bias = first.fuse_alpha, first.fuse_bias
                if isinstance(new, SemiSparseLinear) and first.fuse_alpha is not None:
                    new.fuse_alpha, new.fuse_bias = first.fuse_alpha, first.fuse_bias
            elif check:
                with torch.no_grad():
                    _check_layer(new, weight, bias, scales, record, tolerance)
                checked[key] = record
        if new is None and isinstance(module, QuantLinear):  # stays dense: its Q/DQ math (INT8) or plain (FP16)
            new = _DenseFakeQuantLinear(module) if int8 else _plain_linear(module)
        if new is not None:
            replacements[name] = new
        records.append(record)
    # fake quantizers left (attention inputs): a per-tensor fake quant that keeps FP16 (INT8), else nothing
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            fqn = f"{name}.{child_name}" if name else child_name
            if isinstance(child, TensorQuantizer) and not any(fqn.startswith(t + ".") for t in replacements):
                replacements[fqn] = FakeQuant(child.scale()) if int8 and child.enabled and child.axis is None \
                    else nn.Identity()
    model.half()  # the rest of the model; the new modules keep their FP32 scales and INT8 codes as made
    for fqn, new in replacements.items():
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return records


def _plain_linear(q: nn.Linear) -> nn.Linear:
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device, dtype=q.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(q.weight)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    return lin


class _DenseFakeQuantLinear(nn.Module):
    """A QuantLinear that no INT8 kernel takes, kept as Q/DQ math in FP16 (``dq(q(x)) @ dq(q(W))ᵀ + b``)."""

    def __init__(self, q):
        super().__init__()
        s_w = q.weight_quantizer.scale().detach().float().reshape(-1, 1)
        self.register_buffer("weight", (int8_codes(q.weight.detach(), s_w).float() * s_w).half())
        self.register_buffer("bias", None if q.bias is None else q.bias.detach().half().clone())
        self.input_quant = FakeQuant(q.input_quantizer.scale())
        out_q = getattr(q, "output_quantizer", None)
        self.output_quant = None if out_q is None or not out_q.enabled else FakeQuant(out_q.scale())

    def forward(self, x):
        y = nn.functional.linear(self.input_quant(x), self.weight, self.bias)
        return y if self.output_quant is None else self.output_quant(y)


def calibrate_inputs(model: nn.Module, targets: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{fqn: max |input|}`` of each target Linear over one forward of ``inputs`` (for float models in INT8)."""
    amax: dict[str, float] = {}
    hooks = []
    for name in targets:
        def hook(_module, args, _out, name=name):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return amax
