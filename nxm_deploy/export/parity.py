"""The INT8 parity rule, shared by the export stage (ORT vs the PyTorch fake-quant twin) and the FP16-remainder
conversion of the INT8 graph (FP16 remainder vs FP32 remainder): class agreement on the examples that are not
numerical ties. numpy only (no torch), so the engine builder can use it.
"""

from __future__ import annotations

import numpy as np

#: INT8 parity: argmax agreement with the reference (the fake-quant twin, or the FP32-remainder graph). An input
#: that lands on a rounding boundary can flip one INT8 code between kernels, so a logit bound alone would be
#: brittle; the argmax must agree on >= 99.5% of the examples that are not ties (within the tie margin).
INT8_MIN_AGREEMENT = 0.995
#: The least tie margin of INT8 parity (logit units): examples whose fake-quant twin has a top-2 logit margin at or
#: below it are numerical ties. The export stage raises it to the model's own measured noise floor
#: (:func:`noise_tie_margin`); the FP16-remainder check uses it as is.
INT8_TIE_MARGIN = 0.05
#: A class can flip only when the top-2 margin is below |Δ top-1| + |Δ top-2| <= 2 max |Δlogit|.
NOISE_TIE_FACTOR = 2.0


def noise_tie_margin(fp32_logits: np.ndarray, fp64_logits: np.ndarray, floor: float = INT8_TIE_MARGIN) -> dict:
    """The tie margin of INT8 parity, from the quantized model's own arithmetic noise.

    A fake-quant model rounds every activation to an INT8 code; an activation within an ulp of a rounding boundary
    lands on either code depending on the order and precision of the float arithmetic before it, and the flipped
    code propagates through every later quantizer. The same twin evaluated in FP32 and in FP64 (no error in either)
    therefore differs by the noise any correct INT8 runtime shows against it (MiniLM on RTE with INT8 GEMM outputs
    and attention: max |Δlogit| FP32 vs FP64 0.27, ONNX Runtime vs FP32 0.30; both flip 2-3 of 256 classes, each
    with a top-2 margin under 0.16). An ONNX Runtime class flip on an example whose margin is within
    ``NOISE_TIE_FACTOR`` × that max |Δ| is noise, not an export error.

    Args:
        fp32_logits, fp64_logits: the twin's outputs ``[..., C]`` on the same inputs, in FP32 and in FP64.
        floor: the least margin returned (logit units).

    Returns:
        dict: ``tie_margin`` = max(floor, NOISE_TIE_FACTOR · max |Δ|), and the FP32-vs-FP64 ``max_abs_diff``,
        ``mean_abs_diff``, ``argmax_agreement`` (:func:`logit_stats`).
    """
    noise = logit_stats(fp64_logits, fp32_logits)
    return {"tie_margin": max(floor, NOISE_TIE_FACTOR * noise["max_abs_diff"]), **noise}


def argmax_agreement_stats(reference: np.ndarray, candidate: np.ndarray, tie_margin: float = 0.0) -> dict:
    """Class agreement of two logit arrays ``[N, C]`` (C > 1), leaving numerical ties of the reference out.

    Returns:
        dict: ``argmax_agreement`` (all rows), ``tie_margin``, ``near_ties`` (rows whose reference top-2 margin is
        ``<= tie_margin``), ``argmax_agreement_decisive`` (the other rows; None when every row is a tie).
    """
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > tie_margin
    agree = reference.argmax(-1) == candidate.argmax(-1)
    return {"argmax_agreement": float(np.mean(agree)), "tie_margin": tie_margin, "near_ties": int((~decisive).sum()),
            "argmax_agreement_decisive": float(np.mean(agree[decisive])) if decisive.any() else None}



def logit_stats(reference, candidate, tie_margin: float | None = None) -> dict:
    """How far two models' outputs ``[..., C]`` are apart: the one comparison of export parity, the CPU INT8 artifact
    check and the FP16-remainder check (a causal LM's positions count as rows).

    Args:
        reference, candidate: float arrays of one shape.
        tie_margin: when given, the agreement also leaves out the reference's numerical ties
            (:func:`argmax_agreement_stats`).

    Returns:
        dict: ``max_abs_diff``, ``mean_abs_diff`` (float64 arithmetic) and ``argmax_agreement`` (None when C is 1:
        a regression score); with ``tie_margin`` also ``tie_margin``, ``near_ties``, ``argmax_agreement_decisive``.
    """
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"outputs of different shapes: {ref.shape} and {cand.shape}")
    diff = np.abs(ref - cand)
    out = {"max_abs_diff": float(diff.max()) if diff.size else 0.0,
           "mean_abs_diff": float(diff.mean()) if diff.size else 0.0, "argmax_agreement": None}
    if ref.size and ref.shape[-1] > 1:
        rows_ref, rows_cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, ref.shape[-1])
        if tie_margin is None:
            out["argmax_agreement"] = float(np.mean(rows_ref.argmax(-1) == rows_cand.argmax(-1)))
        else:
            out.update(argmax_agreement_stats(rows_ref, rows_cand, tie_margin))
    return out
