"""INT8 symmetric fake quantization for QAT, after ModelOpt's ``weight_quantizer``/``input_quantizer`` layout.

Numerics (what TensorRT wants from explicit Q/DQ): signed INT8, zero point 0, ``scale = amax / 127``, codes
clamped to ``[-128, 127]`` exactly as ONNX ``QuantizeLinear`` saturates, round half to even (both torch and
ONNX). Weights: per output channel (axis 0 of ``[out, in]``); activations: per tensor at the input of each
quantized Linear.

Training: ``q(x) = clamp(round(x / s), -128, 127) * s`` with straight-through rounding; ``s = amax / 127`` is
learned with the LSQ gradient (Esser et al., ICLR 2020, Eq. 3) including its gradient scale
``g = 1 / sqrt(numel * 127)``. Pruned weights are exactly 0 and stay exactly 0 after fake quantization
(``round(0 / s) = 0``), so the INT8 code of every pruned weight is 0.

Export: :func:`export_mode` switches every quantizer to ``torch.fake_quantize_per_{tensor,channel}_affine``
with constant scale buffers and int32 zero points, which the TorchScript ONNX exporter emits as a single
QuantizeLinear + DequantizeLinear pair per tensor.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
from torch import nn

from nxm_deploy.config.recipe import check_num_bits  # the torch-free schema owns the rule
from nxm_deploy.errors import ConfigError

QUANT_MIN, QUANT_MAX = -128, 127
_AMAX_FLOOR = 1e-8


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x - x * scale).detach() + x * scale


class TensorQuantizer(nn.Module):
    """Symmetric INT8 fake quantizer with a learnable ``amax``.

    Args:
        axis (int | None): channel axis for per-channel scales (0 for a Linear weight), None for per-tensor.
        num_channels (int): size of ``axis`` (ignored when per-tensor).
        learn_amax (bool): train ``amax`` with the LSQ gradient. Defaults to True.
        num_bits (int): must be 8 (symmetric INT8, the TensorRT Q/DQ type); other widths raise.
        calib_method (str | None): calibration method of this quantizer whatever :func:`calibrate` is given
            (``"max"`` for a bounded tensor such as softmax probabilities); None follows :func:`calibrate`.

    Raises:
        ConfigError: ``num_bits`` other than 8.

    Modes: ``calibrating`` (records max |x| per channel and, per tensor, a sample of |x| for percentile
    calibration; output = input), normal fake-quant, and ``exporting`` (ONNX-friendly torch ops).
    """

    def __init__(self, axis: int | None = None, num_channels: int = 1, learn_amax: bool = True, num_bits: int = 8,
                 calib_method: str | None = None):
        super().__init__()
        check_num_bits(num_bits)
        self.axis = axis
        self.calib_method = calib_method
        shape = (num_channels,) if axis is not None else ()
        self.amax = nn.Parameter(torch.ones(shape), requires_grad=learn_amax)
        self.calibrating = False
        self.exporting = False
        self.enabled = True
        self._calib_max: torch.Tensor | None = None
        self._calib_samples: list[torch.Tensor] = []

    @property
    def num_bits(self) -> int:
        return 8

    def scale(self) -> torch.Tensor:
        """``amax / 127`` as float32, shape ``[C]`` (per channel) or ``[]`` (per tensor)."""
        return self.amax.clamp(min=_AMAX_FLOOR) / QUANT_MAX

    def extra_repr(self) -> str:
        return f"int8 symmetric, axis={self.axis}, learn_amax={self.amax.requires_grad}"

    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        return [d for d in range(x.ndim) if d != (self.axis % x.ndim)]

    def _collect(self, x: torch.Tensor) -> None:
        xa = x.detach().abs().float()
        if self.axis is None:
            cur = xa.max()
            flat = xa.flatten()
            if flat.numel() > 65536:  # bounded sample for percentile calibration
                idx = torch.randint(flat.numel(), (65536,), generator=torch.Generator().manual_seed(len(self._calib_samples)))
                flat = flat[idx]
            self._calib_samples.append(flat)
        else:
            cur = xa.amax(dim=self._reduce_dims(x))
        self._calib_max = cur if self._calib_max is None else torch.maximum(self._calib_max, cur)

    @torch.no_grad()
    def load_calib_amax(self, method: str = "max", percentile: float = 99.99) -> None:
        """Set ``amax`` from the collected statistics (``max`` or ``percentile`` of |x|; per channel: max).

        Raises:
            ConfigError: when nothing was collected or ``method`` is unknown.
        """
        if self._calib_max is None:
            raise ConfigError("Quantizer saw no calibration data: the forward_loop fed no batch through it.")
        if method == "max" or self.axis is not None:
            amax = self._calib_max
        elif method == "percentile":
            samples = torch.cat(self._calib_samples)
            amax = torch.quantile(samples, percentile / 100.0)
        else:
            raise ConfigError(f"Calibration method {method!r} is not one of 'max', 'percentile'.")
        if not bool(torch.isfinite(amax).all()):
            raise ConfigError(
                f"Calibration produced a non-finite amax ({amax.flatten()[:4].tolist()} ...): the calibration data "
                "or the model output has NaN/inf.", hint="Check the calibration batches and the model checkpoint.")
        self.amax.copy_(amax.clamp(min=_AMAX_FLOOR).reshape(self.amax.shape))
        self._calib_max, self._calib_samples = None, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self._collect(x)
            return x
        if self.exporting:
            if self.axis is None:
                return torch.fake_quantize_per_tensor_affine(
                    x, self._export_scale, self._export_zero_point, QUANT_MIN, QUANT_MAX
                )
            return torch.fake_quantize_per_channel_affine(
                x, self._export_scale, self._export_zero_point, self.axis, QUANT_MIN, QUANT_MAX
            )
        scale = self.scale()
        if self.amax.requires_grad:
            numel_per_scale = x.numel() / max(scale.numel(), 1)
            scale = _grad_scale(scale, 1.0 / (numel_per_scale * QUANT_MAX) ** 0.5)
        if self.axis is not None:
            shape = [1] * x.ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        return torch.clamp(_round_ste(x / scale), QUANT_MIN, QUANT_MAX) * scale

    @torch.no_grad()
    def int8_codes(self, x: torch.Tensor) -> torch.Tensor:
        """INT8 codes ``clamp(round(x / scale), -128, 127)`` as ``torch.int8``, same shape as ``x``."""
        scale = self.scale()
        if self.axis is not None:
            shape = [1] * x.ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        return int8_codes(x, scale)


def int8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT8 codes ``clamp(round(x / scale), -128, 127)`` (round half to even, computed in FP32) as ``torch.int8``;
    ``scale`` broadcasts to ``x``. ONNX ``QuantizeLinear`` with zero point 0 (GPUSQ-TLM Eq. 1)."""
    return torch.clamp(torch.round(x.float() / scale), QUANT_MIN, QUANT_MAX).to(torch.int8)


class QuantLinear(nn.Linear):
    """``nn.Linear`` with ``input_quantizer`` (per tensor) and ``weight_quantizer`` (per output channel), and an
    optional ``output_quantizer`` (per tensor, after the bias: an INT8-out GEMM, :meth:`add_output_quantizer`).

    Shapes: input ``[..., in_features]`` float32 -> output ``[..., out_features]`` float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, learn_amax: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.input_quantizer = TensorQuantizer(axis=None, learn_amax=learn_amax)
        self.weight_quantizer = TensorQuantizer(axis=0, num_channels=out_features, learn_amax=learn_amax)
        self.register_module("output_quantizer", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, learn_amax: bool = True) -> "QuantLinear":
        """Wrap an existing Linear, sharing nothing: weights are copied."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, learn_amax=learn_amax)
        q.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def add_output_quantizer(self, learn_amax: bool = True) -> TensorQuantizer:
        """Quantize this GEMM's output (per tensor, after the bias); returns the quantizer."""
        if self.output_quantizer is None:
            self.output_quantizer = TensorQuantizer(axis=None, learn_amax=learn_amax).to(self.weight.device)
        return self.output_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)


def quantize_model_(model: nn.Module, module_names: list[str], learn_amax: bool = True) -> list[str]:
    """In place: replace each named ``nn.Linear`` by a :class:`QuantLinear` holding the same weights.

    Raises:
        ConfigError: when a name is missing or not a Linear.

    Returns:
        list[str]: the replaced module fqns.
    """
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"Cannot quantize '{name}': no such module.") from exc
        if isinstance(module, QuantLinear):
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"Cannot quantize '{name}': it is a {type(module).__name__}, not nn.Linear.")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(module, learn_amax=learn_amax))
    return list(module_names)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """All :class:`QuantLinear` modules of ``model`` by fqn."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _quantizers(model: nn.Module) -> Iterator[TensorQuantizer]:
    return (m for m in model.modules() if isinstance(m, TensorQuantizer))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], None],
    method: str = "max",
    percentile: float = 99.99,
) -> None:
    """Initialise every quantizer's ``amax`` from data (PTQ), after ModelOpt ``mtq.quantize(model, cfg, forward_loop)``.

    Args:
        model: a model holding :class:`QuantLinear` modules.
        forward_loop: callable that forwards all calibration batches through ``model``.
        method: ``"max"`` or ``"percentile"`` (activations; weights always use per-channel max, and a quantizer
            with its own ``calib_method`` uses that).
        percentile: percentile of |x| for ``"percentile"``, in percent.
    """
    quantizers = list(_quantizers(model))
    if not quantizers:
        raise ConfigError("calibrate(): the model has no quantizers; call quantize_model_ first.")
    for q in quantizers:
        q.calibrating = True
    was_training = model.training
    model.eval()
    try:
        forward_loop(model)
    finally:
        for q in quantizers:
            q.calibrating = False
        model.train(was_training)
    for q in quantizers:
        q.load_calib_amax(q.calib_method or (method if q.axis is None else "max"), percentile)


def float64_copy(model: nn.Module) -> nn.Module:
    """An FP64 copy of a (fake-quant) model, for measuring its own arithmetic noise: every parameter and buffer in
    FP64 except the export-mode quantizer scales (:func:`export_mode`), which stay FP32 because torch's
    ``fake_quantize_per_*_affine`` ops take only FP32/BF16 scales (the scales are exact FP32 values either way)."""
    twin = copy.deepcopy(model).double()
    for q in _quantizers(twin):
        if hasattr(q, "_export_scale"):
            q._export_scale = q._export_scale.float()
    return twin


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which quantizers use ONNX-exportable torch fake-quant ops (QuantizeLinear/DequantizeLinear)."""
    quantizers = list(_quantizers(model))
    for q in quantizers:
        # constant (non-persistent) buffers, so the exporter writes initializers, not a scale subgraph
        scale = q.scale().detach().float().clone()
        scale = scale.reshape(()) if q.axis is None else scale
        q.register_buffer("_export_scale", scale, persistent=False)
        q.register_buffer("_export_zero_point", torch.zeros_like(scale, dtype=torch.int32), persistent=False)
        q.exporting = True
    try:
        yield model
    finally:
        for q in quantizers:
            q.exporting = False
            del q._export_scale, q._export_zero_point
