"""The INT8 parity rule, shared by the export stage (ORT vs the PyTorch fake-quant twin) and the FP16-remainder
conversion of the INT8 graph (FP16 remainder vs FP32 remainder): class agreement on the examples that are not
numerical ties. numpy only (no torch), so the engine builder can use it.
"""

from __future__ import annotations

import numpy as np

#: INT8 parity: argmax agreement with the reference (the fake-quant twin, or the FP32-remainder graph). An input
#: that lands on a rounding boundary can flip one INT8 code between kernels, so a logit bound alone would be
#: brittle; the argmax must agree on >= 99.5% of the examples that are not ties.
INT8_MIN_AGREEMENT = 0.995
#: INT8 examples whose fake-quant twin has a top-2 logit margin at or below this are numerical ties: ONNX Runtime
#: and PyTorch round an activation on a code boundary apart now and then (max |Δlogit| 0.02-0.03 measured on MiniLM),
#: which flips the class of such an example without any error in the graph. They are counted and reported, and
#: left out of the agreement gate.
INT8_TIE_MARGIN = 0.05


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
