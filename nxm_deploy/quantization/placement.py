"""Where INT8 Q/DQ goes beyond the inputs and weights of the n:m GEMMs: GEMM outputs and attention matmuls.

TensorRT runs a GEMM on its structured-sparse INT8 kernels when the GEMM is INT8 in *and* INT8 out (an explicit
Q/DQ pair on its input, a constant-foldable Q/DQ weight, and a QuantizeLinear on its output, after the bias);
it runs attention in INT8 when both attention matmuls have INT8 inputs. The two groups of
``train.qat.quantizers`` (:class:`~nxm_deploy.config.recipe.QuantizerGroupsConfig`):

* ``gemm_outputs``: ``output_quantizer`` (per tensor) after every n:m GEMM whose output is not already an INT8
  attention input (ModelOpt PR #1664's output quantizers; demoBERT's output range on every FC).
* ``attention``: per-tensor ``q_bmm_quantizer`` and ``k_bmm_quantizer`` (the inputs of Q·Kᵀ),
  ``softmax_quantizer`` and ``v_bmm_quantizer`` (the inputs of probs·V) on each BERT-style self-attention
  module (ModelOpt's names). The Q/K/V GEMM outputs are then quantized by these, after the head reshape and
  transpose, which TensorRT commutes the Q/DQ through; there is one quantizer per tensor either way.

Softmax probabilities lie in [0, 1]: their quantizer calibrates by max whatever the recipe's activation
method; every other new quantizer uses the recipe's (percentile by default: GEMM output ranges have outliers).

The attention math of the ``nxm_int8_eager`` implementation is transformers' BERT ``eager_attention_forward``
(``softmax(Q Kᵀ · scaling + mask) V``) with the four quantizers applied; a module without them runs the same
math unquantized. It uses transformers' eager (additive float) attention mask.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from nxm_deploy.errors import ConfigError
from nxm_deploy.quantization.fake_quant import QuantLinear, TensorQuantizer

#: attention implementation name registered with transformers' ``AttentionInterface``.
INT8_ATTENTION = "nxm_int8_eager"
#: per-module attention quantizer names (ModelOpt's HF attention plugin uses the same).
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "softmax_quantizer", "v_bmm_quantizer")
log = logging.getLogger("nxm_deploy.quantization")


def int8_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs):
    """Eager scaled dot-product attention with INT8 fake-quantized matmul inputs when ``module`` carries them.

    Shapes: ``query`` float ``[batch, heads, seq, head_dim]``, ``key``/``value`` ``[batch, kv_heads, seq,
    head_dim]`` (``kv_heads = heads / module.num_key_value_groups``, grouped-query attention); ``attention_mask`` additive
    float ``[batch, 1, seq_q, seq_k]`` or None. Returns ``(output [batch, seq, heads, head_dim], probs
    [batch, heads, seq_q, seq_k])``, the contract of transformers' attention functions.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    quantized = getattr(module, "softmax_quantizer", None) is not None
    if quantized:
        query, key, value = module.q_bmm_quantizer(query), module.k_bmm_quantizer(key), module.v_bmm_quantizer(value)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:  # grouped-query attention (Llama-style): each K/V head serves `groups` query heads
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(module.softmax_quantizer(probs) if quantized else probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, dim]`` -> ``[batch, kv_heads * groups, seq, dim]`` (transformers' ``repeat_kv``)."""
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(INT8_ATTENTION, int8_eager_attention)
    AttentionMaskInterface.register(INT8_ATTENTION, eager_mask)


def attention_support(model: nn.Module) -> tuple[tuple[str, str, str] | None, str]:
    """``(q, k, v child names, "")`` where the model's attention runs through transformers' ``AttentionInterface``
    (so INT8 attention can be placed), else ``(None, why not)`` (:mod:`nxm_deploy.architectures`)."""
    from nxm_deploy.architectures import architecture_of

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = architecture_of(model_type)
    if arch is None:
        return None, f"model type {model_type!r} is not in the architecture registry"
    if arch.attention is None:
        return None, arch.attention_note or f"{arch.name} attention is not known to nxm-deploy"
    return arch.attention, ""


def _attention_modules(model: nn.Module, targets: Iterable[str], qkv: tuple[str, str, str]) -> dict[str, nn.Module]:
    """Self-attention modules whose query, key and value projections (child names ``qkv``) are all quantized
    targets, by fqn."""
    targets = set(targets)
    out = {}
    for name in targets:
        parent, _, child = name.rpartition(".")
        if child == qkv[0] and all(f"{parent}.{p}" in targets for p in qkv):
            out[parent] = model.get_submodule(parent)
    return dict(sorted(out.items()))


def place_quantizers_(model: nn.Module, targets: list[str], gemm_outputs: bool, attention: bool,
                      learn_amax: bool = True) -> dict[str, list[str]]:
    """In place: add the quantizer groups to a model whose ``targets`` are already :class:`QuantLinear`.

    Args:
        model: a Hugging Face model after :func:`~nxm_deploy.quantization.quantize_model_` of ``targets``.
        targets: fqns of the n:m GEMMs (the quantized Linears).
        gemm_outputs: add an ``output_quantizer`` to every target not covered by the attention quantizers.
        attention: add the four attention quantizers to every self-attention module whose Q, K and V
            projections are targets, and switch the model to the ``nxm_int8_eager`` attention implementation.
        learn_amax: LSQ-learned scales (as the other quantizers of the run).

    Returns:
        dict: ``{"gemm_outputs": [linear fqns], "attention": [attention module fqns]}``, plus
        ``"attention_skipped": why`` when the architecture's attention cannot take the quantizers (it does not run
        through transformers' ``AttentionInterface``, :mod:`nxm_deploy.architectures`); its Q/K/V outputs then get
        output quantizers like any other GEMM.

    Raises:
        ConfigError: ``attention`` requested on an architecture that supports it, but no Q/K/V target triple exists
            (Q/K/V are excluded from the n:m targets); a target is not a QuantLinear.
    """
    placed: dict = {"gemm_outputs": [], "attention": []}
    covered: set[str] = set()
    qkv, why_not = attention_support(model) if attention else (None, "")
    if attention and qkv is None:  # the architecture's attention has no hook: it stays unquantized, said so
        log.warning("INT8 attention not placed: %s; the attention matmuls stay in floating point", why_not)
        placed["attention_skipped"] = why_not
    elif attention:
        modules = _attention_modules(model, targets, qkv)
        if not modules:
            raise ConfigError(
                f"INT8 attention needs self-attention modules whose {', '.join(qkv)} Linears are all n:m targets; "
                "this model/recipe has none.",
                hint="Set train.qat.quantizers.attention: false, or include the Q/K/V projections in sparsity.include.")
        _register()
        device = next(model.parameters()).device
        for fqn, module in modules.items():
            for name in ATTENTION_QUANTIZERS:
                if getattr(module, name, None) is None:
                    module.add_module(name, TensorQuantizer(
                        axis=None, learn_amax=learn_amax,
                        calib_method="max" if name == "softmax_quantizer" else None).to(device))
            covered.update(f"{fqn}.{p}" for p in qkv)
            placed["attention"].append(fqn)
        model.set_attn_implementation(INT8_ATTENTION)
    if gemm_outputs:
        for name in targets:
            if name in covered:
                continue
            module = model.get_submodule(name)
            if not isinstance(module, QuantLinear):
                raise ConfigError(f"Cannot add an output quantizer to '{name}': it is not a QuantLinear.",
                                  hint="Call quantize_model_ on the targets first.")
            module.add_output_quantizer(learn_amax)
            placed["gemm_outputs"].append(name)
    return placed


def uses_int8_attention(model: nn.Module) -> bool:
    """True when the model runs the ``nxm_int8_eager`` attention (its graph must keep it at export)."""
    return getattr(model.config, "_attn_implementation", None) == INT8_ATTENTION


def use_eager_attention(model: nn.Module) -> None:
    """Plain MatMul/Softmax attention (the graph form TensorRT's attention fusions expect), for export and for the
    PyTorch twin of an exported graph; a model with INT8 attention keeps ``nxm_int8_eager``, the same form with
    the attention quantizers."""
    name = INT8_ATTENTION if uses_int8_attention(model) else "eager"
    if name == INT8_ATTENTION:
        _register()  # a process that loaded the model without placing quantizers (idempotent)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name
