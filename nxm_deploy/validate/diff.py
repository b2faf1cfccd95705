"""Output diffing with Polygraphy on the same real inputs, with INT8-aware tolerances.

Every runner (PyTorch, ONNX Runtime, TensorRT) is run on the same fixed-shape batches of real dev examples;
the outputs become one Polygraphy ``RunResults`` and :meth:`polygraphy.comparator.Comparator.compare_accuracy`
checks each pair with ``SimpleCompareFunc(atol, rtol, check_error_stat="elemwise")`` (an element fails when
``|a - b| > atol`` and ``|a - b| > rtol * |b|``; with ``rtol = 0`` only ``atol`` counts).

Inputs and every runner's outputs are saved in Polygraphy's JSON format under ``<run>/diff/`` (``inputs.json``,
``outputs_<runner>.json``), so each comparison can be re-run by hand, e.g. ::

    cd runs/NAME && polygraphy run onnx/sparse_int8_qdq.onnx --onnxrt --load-inputs diff/inputs.json \\
        --load-outputs diff/outputs_torch_int8_fakequant.json --atol 0.0123 --rtol 0 --check-error-stat elemwise

Tolerances (not Polygraphy's 1e-5 defaults):

* FP32 vs FP32 on CPU (PyTorch vs ONNX Runtime dense): ``atol`` :data:`FP32_ATOL`.
* reduced-precision float on a GPU (TF32 / FP16: ORT CUDA, TensorRT dense): ``atol`` :data:`GPU_FLOAT_ATOL`.
* INT8 (:func:`int8_tolerance`), derived from the fake-quant reference: the noise ``d`` the candidate shows on a
  *calibration* subset (the first half of the diff batches), clamped by bounds measured on the PyTorch twin
  alone, on *every* diff batch (the candidate cannot move them)::

      d = max |ORT_int8 - torch_fakequant|              first half: observed implementation noise
      q = max |torch_fakequant - torch_qat_fp32|        all batches: the INT8 perturbation (quantizers off)
      s = rms (torch_fakequant - torch_fakequant_fp64)  all batches: the twin's own rounding noise, per logit
      z = Phi^-1(1 - alpha / (2 N))                     N logits compared (all batches), alpha = 1e-3
      atol_int8 = clamp(k * d, lo = max(1e-3, q / 20), hi = max(lo, q / 2, sqrt(2) * z * s)),  rtol = 0

  ``k`` is ``validate.diff_tolerance_factor`` (default 4): the held-out batches may see a few more rounding
  flips than the calibration half. The lower bound (5 % of the whole INT8 perturbation, at least 1e-3) covers
  a handful of one-code rounding flips that the calibration half happened not to hit and keeps bit-identical
  implementations from getting a zero tolerance. The upper bound keeps a broken INT8 graph from calibrating its
  own tolerance; it is the larger of two bounds on what a correct INT8 runtime can show:

  * ``q / 2``: half the whole quantization effect (shallow models, where a rounding flip stays local);
  * ``sqrt(2) z s``, a statistical bound on the rounding-flip noise (deep models). An activation within an ulp
    of a rounding boundary lands on either INT8 code depending on the float arithmetic before it, and in a deep
    model the flipped codes cascade through every later quantizer: the twin evaluated in FP32 and in FP64 (same
    weights and scales, two arithmetic precisions) differs by exactly this noise (as in the export stage's
    :func:`nxm_deploy.export.parity.noise_tie_margin`). ``ORT - twin`` is at worst the difference of two such
    independent draws (rms ``sqrt(2) s``); the noise is a sum of many flips, Gaussian (kurtosis 2.9-3.1 on
    the model below), so by a union bound over the ``N`` compared logits an honest runtime exceeds ``sqrt(2) z s``
    anywhere with probability at most ``alpha``. ``z`` grows with ``N`` as the max over more batches does.
    Without a ``torch_int8_fakequant_fp64`` runner this bound is left out.

  Measured on a random-init 12-layer, hidden-768 BERT (2:4, INT8 GEMM outputs and attention, percentile
  calibration; 8 batches of 8 at 32 tokens, ``tests/integration/test_int8_tolerance_deep.py``): rms of
  ``ORT - twin`` 0.0061, of ``twin FP32 - FP64`` 0.0067, of ``twin - quantizers off`` 0.0059, so ``q / 2`` of
  the calibration half (0.0083) sat below the honest max |Δ| (0.019, a held-out batch); the bound is 0.042;
  with one layer's INT8 weight scale doubled (``layer.5.output.dense``) max |Δ| is at least 0.073 on every batch.

The dense-vs-sparse comparison is reported (max |Δlogit|, argmax agreement) but never gated: they are
different models.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the fake-quant twin run in FP64: its difference to ``torch_int8_fakequant`` is the twin's own rounding noise
from nxm_deploy.runtimes.pytorch import FAKEQUANT_FP64

log = logging.getLogger("nxm_deploy.validate")

FP32_ATOL = 1e-3
GPU_FLOAT_ATOL = 5e-2
INT8_ATOL_FLOOR = 1e-3
INT8_FLOOR_FRACTION = 0.05
INT8_CAP_FRACTION = 0.5
#: alpha of the INT8 noise bound: probability that a correct INT8 runtime exceeds it on some compared logit
INT8_FALSE_ALARM = 1e-3
#: rms of ``ORT - twin`` over the twin's own rounding-noise rms when their roundings are independent (worst case)
INT8_DECORRELATION = 2.0 ** 0.5
#: INT8 atol when there is no fake-quant reference to derive one from (the export stage's parity bound)
INT8_FALLBACK_ATOL = 5e-2
DEFAULT_TOLERANCE_FACTOR = 4.0
INPUTS_FILE = "inputs.json"


def outputs_file(runner_name: str) -> str:
    return f"outputs_{runner_name}.json"


@dataclass
class Comparison:
    """One pair to compare: ``candidate`` against ``reference`` with a named tolerance."""

    reference: str
    candidate: str
    tolerance: str  # key into the tolerances dict: "fp32", "gpu_float", "int8"
    gated: bool = True
    why: str = ""


def calibration_batches(n_batches: int) -> int:
    """How many leading diff batches calibrate ``d`` of the INT8 rule: the first half (rounded up), at least 1."""
    return max(1, (int(n_batches) + 1) // 2)


def gaussian_max_z(n: int, false_alarm: float = INT8_FALSE_ALARM) -> float:
    """``z`` with ``P(max_i |x_i| > z sigma) <= false_alarm`` for ``n`` Gaussian draws ``x_i ~ N(0, sigma^2)``:
    ``Phi^-1(1 - false_alarm / (2 n))`` (two-sided tail, union bound over the ``n`` draws; no independence
    needed). 4.32 for 64 logits at 1e-3, 4.47 for 128."""
    from statistics import NormalDist

    return float(NormalDist().inv_cdf(1.0 - false_alarm / (2.0 * max(int(n), 1))))


def int8_tolerance(fakequant: list[np.ndarray], ort_int8: list[np.ndarray], qat_fp32: list[np.ndarray] | None,
                   factor: float = DEFAULT_TOLERANCE_FACTOR, floor: float = INT8_ATOL_FLOOR,
                   floor_fraction: float = INT8_FLOOR_FRACTION, cap_fraction: float = INT8_CAP_FRACTION, *,
                   fakequant_fp64: list[np.ndarray] | None = None, n_calibration: int | None = None,
                   false_alarm: float = INT8_FALSE_ALARM) -> dict:
    """The INT8 tolerance rule of this module's docstring, on every diff batch (logits in logit units).

    Args:
        fakequant: logits of the PyTorch fake-quant twin, one float array per batch (``[B, C]``; any shape, the
            same in every list).
        ort_int8: logits of the INT8 model under test on the same batches.
        qat_fp32: the twin with its quantizers off (the QAT weights in FP32), or None: no ``q`` (lower bound
            ``floor``; no ``q / 2`` cap).
        factor: ``k``, applied to ``d``. floor: least atol. floor_fraction: least atol as a fraction of ``q``.
        cap_fraction: the ``q`` cap's fraction (1/2).
        fakequant_fp64: the twin evaluated in FP64 (:func:`nxm_deploy.quantization.fake_quant.float64_copy`), or
            None: no noise bound (without ``qat_fp32`` too: no cap at all).
        n_calibration: leading batches that calibrate ``d``; default :func:`calibration_batches` (the first
            half). ``q`` and ``s`` use every batch: they do not involve ``ort_int8``.
        false_alarm: ``alpha`` of the noise bound (:func:`gaussian_max_z`).

    Returns:
        dict: ``atol``, ``rtol`` (0), ``observed_impl_max_abs_diff`` (d), ``quantization_max_abs_diff`` (q),
        ``rounding_noise_rms`` (s), ``logits_compared`` (N), ``z``, ``noise_bound`` (``sqrt(2) z s``),
        ``false_alarm``, ``calibration_batches``, ``batches``, ``factor``, ``lower``, ``cap`` (None: no cap),
        ``limited_by`` (``factor``/``floor``/``cap``) and ``rule`` (one line). Quantities an input was missing
        for are None.

    Raises:
        ValueError: no batches, lists of different lengths, or arrays of different shapes.
    """
    lists = [x for x in (fakequant, ort_int8, qat_fp32, fakequant_fp64) if x is not None]
    if not fakequant or len({len(x) for x in lists}) != 1:
        raise ValueError(f"int8_tolerance needs the same number (>= 1) of batches per runner, got {[len(x) for x in lists]}")
    n_batches = len(fakequant)
    n_cal = calibration_batches(n_batches) if n_calibration is None else max(1, min(int(n_calibration), n_batches))

    def diffs(xs, ys):
        for a, b in zip(xs, ys):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape != b.shape:
                raise ValueError(f"outputs of different shapes: {a.shape} and {b.shape}")
            yield a - b

    d = max(float(np.max(np.abs(x))) for x in diffs(ort_int8[:n_cal], fakequant[:n_cal]))
    q = max(float(np.max(np.abs(x))) for x in diffs(fakequant, qat_fp32)) if qat_fp32 is not None else None
    n = sum(int(np.asarray(a).size) for a in fakequant)
    s = z = bound = None
    if fakequant_fp64 is not None:
        s = float(np.sqrt(sum(float(np.sum(x * x)) for x in diffs(fakequant, fakequant_fp64)) / max(n, 1)))
        z = gaussian_max_z(n, false_alarm)
        bound = INT8_DECORRELATION * z * s
    lower = max(floor, floor_fraction * q) if q is not None else floor
    caps = [c for c in (cap_fraction * q if q is not None else None, bound) if c is not None]
    cap = max(lower, *caps) if caps else float("inf")
    raw = factor * d
    atol = min(max(raw, lower), cap)
    limited_by = "cap" if raw > cap else "floor" if raw < lower else "factor"
    lo_text = f"max({floor:g}, {floor_fraction:g} q)" if q is not None else f"{floor:g}"
    hi_terms = [t for t, c in ((f"{cap_fraction:g} q", q), ("√2 · z · s", bound)) if c is not None]
    rule = (f"atol = clamp({factor:g} × d, lo = {lo_text}, hi = max(lo, {', '.join(hi_terms)}))" if hi_terms
            else f"atol = max({factor:g} × d, {lo_text})")
    rule += f" with d = max|ORT INT8 − torch fake-quant| on the first {n_cal} of {n_batches} batches"
    if q is not None:
        rule += ", q = max|torch fake-quant − torch QAT FP32| on all of them"
    if bound is not None:
        rule += (", s = rms(torch fake-quant FP32 − FP64) on all of them (the twin's own rounding noise), "
                 f"z = Φ⁻¹(1 − α/2N) for the N = {n} logits compared, α = {false_alarm:g}")
    return {
        "atol": float(atol), "rtol": 0.0, "observed_impl_max_abs_diff": d, "quantization_max_abs_diff": q,
        "rounding_noise_rms": s, "logits_compared": n, "z": z, "noise_bound": bound,
        "false_alarm": false_alarm if bound is not None else None, "calibration_batches": n_cal,
        "batches": n_batches, "factor": factor, "lower": float(lower),
        "cap": None if cap == float("inf") else float(cap), "limited_by": limited_by, "rule": rule + ", rtol = 0",
    }


def make_feeds(tokenizer, examples, input_names: list[str], n_examples: int, batch_size: int,
               seq_len: int) -> list[dict[str, np.ndarray]]:
    """Fixed-shape ``[batch_size, seq_len]`` int64 batches of the first ``n_examples`` real examples (padded to
    ``seq_len``; the last batch is filled by cycling from the start so every batch has the same shape)."""
    n = min(int(n_examples), len(examples))
    if n < 1:
        return []
    batches = max(1, -(-n // batch_size))
    feeds = []
    for b in range(batches):
        idx = [(b * batch_size + i) % n for i in range(batch_size)]
        texts_a = [examples.texts_a[i] for i in idx]
        texts_b = [examples.texts_b[i] for i in idx] if examples.texts_b is not None else None
        enc = tokenizer(texts_a, texts_b, truncation=True, max_length=seq_len, padding="max_length")
        feeds.append({k: np.asarray(enc[k], dtype=np.int64).reshape(batch_size, seq_len)
                      for k in input_names if k in enc})
    return feeds


def collect_outputs(runners: dict, feeds: list[dict[str, np.ndarray]]):
    """Run every active runner on every feed; Polygraphy ``RunResults`` (one entry per runner, in order)."""
    from polygraphy.comparator import IterationResult, RunResults

    results = RunResults()
    for name, runner in runners.items():
        iterations = []
        for feed in feeds:
            out = runner.infer(feed)
            iterations.append(IterationResult(outputs={"logits": np.array(out["logits"], dtype=np.float32, copy=True)},
                                              runtime=runner.last_inference_s, runner_name=name))
        results.append((name, iterations))
    return results


def logits_of(results, name: str) -> list[np.ndarray]:
    return [np.asarray(it["logits"]) for it in results[name]]


def compare(results, reference: str, candidate: str, atol: float, rtol: float) -> dict:
    """Polygraphy comparison of ``candidate`` against ``reference`` (elementwise, ``atol``/``rtol``).

    Returns:
        dict: ``passed``, ``iterations``, ``iterations_passed``, ``max_abs_diff``, ``mean_abs_diff``,
        ``max_rel_diff``, ``argmax_agreement``.
    """
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    pair = RunResults()
    pair.append((reference, results[reference]))
    pair.append((candidate, results[candidate]))
    func = SimpleCompareFunc(atol=float(atol), rtol=float(rtol), check_error_stat="elemwise")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(pair, comparisons=[(0, 1)], compare_func=func)
    per_iteration = list(accuracy[0].values())[0]
    passed_iterations = [all(bool(r) for r in it.values()) for it in per_iteration]
    stats = [it["logits"] for it in per_iteration]
    ref, cand = logits_of(results, reference), logits_of(results, candidate)
    agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, cand)]))) \
        if ref and ref[0].ndim == 2 and ref[0].shape[1] > 1 else None
    return {
        "passed": bool(accuracy) and all(passed_iterations),
        "iterations": len(per_iteration), "iterations_passed": int(sum(passed_iterations)),
        "max_abs_diff": float(max(s.max_absdiff for s in stats)),
        "mean_abs_diff": float(np.mean([s.mean_absdiff for s in stats])),
        "max_rel_diff": float(max(s.max_reldiff for s in stats)),
        "argmax_agreement": agree,
    }


def save_polygraphy_files(out_dir: Path, feeds: list[dict[str, np.ndarray]], results) -> dict[str, str]:
    """``inputs.json`` (Polygraphy's ``--save-inputs`` format: a JSON list of feed dicts) and one
    ``outputs_<runner>.json`` ``RunResults`` per runner. Returns runner name -> file name (plus ``inputs``)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"inputs": INPUTS_FILE}
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        save_json(feeds, str(out_dir / INPUTS_FILE), description="diff inputs")
        for name, iterations in results.items():
            one = RunResults()
            one.append((name, iterations))
            one.save(str(out_dir / outputs_file(name)))
            files[name] = outputs_file(name)
    return files


def polygraphy_argv(model: str, backend: str, reference_outputs: str, atol: float, rtol: float,
                    inputs: str) -> list[str] | None:
    """``polygraphy run`` arguments that re-run a comparison by hand (paths relative to the run directory),
    or None for a runtime Polygraphy's CLI cannot run on its own (PyTorch): the runtime's ``polygraphy`` flags
    (:data:`nxm_deploy.runtimes.RUNTIMES`)."""
    from nxm_deploy.runtimes import RUNTIMES

    runtime = RUNTIMES.get(backend)
    if runtime is None or runtime.polygraphy is None:
        return None
    return ["polygraphy", "run", model, *runtime.polygraphy, "--load-inputs", inputs, "--load-outputs",
            reference_outputs, "--atol", f"{atol:.6g}", "--rtol", f"{rtol:.6g}", "--check-error-stat", "elemwise"]


def format_command(argv: list[str], cwd: str | Path | None = None) -> str:
    text = " ".join(shlex.quote(a) for a in argv)
    return f"cd {shlex.quote(str(cwd))} && {text}" if cwd else text


# Polygraphy's own console-script entry point, run by this interpreter: it works wherever the library imports,
# also where the ``polygraphy`` script is not on PATH (wheels installed with ``pip --target``).
_POLYGRAPHY_MAIN = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"


def run_polygraphy(argv: list[str], cwd: str | Path, timeout: float = 300) -> tuple[int, str]:
    """Run a ``polygraphy run`` argv (its first word, ``polygraphy``, becomes this interpreter running Polygraphy's
    console entry point); ``(rc, output tail)``."""
    argv = [sys.executable, "-c", _POLYGRAPHY_MAIN, *argv[1:]]
    proc = subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode, tail


def default_comparisons(runners: dict) -> list[Comparison]:
    """Which pairs to compare, from the runners' labels (see the module docstring)."""
    names = set(runners)
    comps: list[Comparison] = []

    def add(ref, cand, tol, gated=True, why=""):
        if ref in names and cand in names and ref != cand:
            comps.append(Comparison(ref, cand, tol, gated, why))

    add("torch_dense_fp32", "dense_fp32", "fp32", why="PyTorch FP32 vs its ONNX export")
    add("torch_int8_fakequant", "sparse_int8", "int8", why="fake-quant reference vs the Q/DQ export")
    add("torch_int8_fakequant", "torch_qat_fp32", "int8", gated=False,
        why="INT8 perturbation itself (same QAT weights, quantizers off): bounds the INT8 tolerance")
    add("torch_int8_fakequant", FAKEQUANT_FP64, "int8", gated=False,
        why="the twin's own INT8 rounding noise (FP32 vs FP64 arithmetic): bounds the INT8 tolerance")
    from nxm_deploy.runtimes import get_runtime

    for name, runner in runners.items():
        runtime = get_runtime(runner.backend)
        if name in ("dense_fp32", "sparse_int8") or not runtime.validation:  # the references themselves
            continue
        if getattr(runner, "peer", False):
            add("dense_fp32", name, runner.precision if runner.precision == "int8" else "fp32", gated=False,
                why="ONNX Runtime's own CPU path for the dense model (the peer) vs dense FP32: reported only")
            continue
        if runner.precision == "int8" and not runtime.int8_gated:
            add("sparse_int8", name, "int8", gated=False,
                why=f"INT8 GEMMs with an FP16 remainder ({runtime.label}) vs the FP32-remainder Q/DQ reference: reported")
        elif runner.precision == "int8":
            add("sparse_int8", name, "int8", why=f"INT8 on {runner.backend} vs the ORT CPU Q/DQ reference")
        elif runner.sparse and not runtime.int8_gated:
            add("dense_fp32", name, "gpu_float", gated=False,
                why=f"sparse {runner.precision.upper()} vs dense FP32: different models, reported only")
        else:
            tol = "fp32" if runtime.device == "cpu" else "gpu_float"
            add("dense_fp32", name, tol, why=f"dense on {runner.backend} vs ORT CPU FP32")
    add("dense_fp32", "sparse_int8", "int8", gated=False, why="dense FP32 vs sparse INT8: different models, reported only")
    return comps


def run_diff(runners: dict, feeds: list[dict[str, np.ndarray]], out_dir: str | Path, run_dir: str | Path,
             *, factor: float = DEFAULT_TOLERANCE_FACTOR, comparisons: list[Comparison] | None = None,
             verify_cli: int = 1) -> dict:
    """Run, compare and save. ``runners``: name -> active runner (labels: ``backend``, ``precision``, ``source``).

    Args:
        out_dir: where ``inputs.json`` / ``outputs_*.json`` go (normally ``<run_dir>/diff``).
        run_dir: commands are written relative to it.
        factor: ``k`` of the INT8 rule (:func:`int8_tolerance`; its inputs are the runners
            ``torch_int8_fakequant``, ``sparse_int8`` and, when present, ``torch_qat_fp32`` and
            :data:`FAKEQUANT_FP64`).
        verify_cli: re-run this many of the printed ONNX Runtime CPU commands with the ``polygraphy`` CLI and
            record the exit code (0 = the hand-run command reproduces the in-process verdict).

    Returns:
        dict: ``inputs`` (description), ``tolerances``, ``comparisons`` (one dict per pair: reference, candidate,
        tolerance, atol, rtol, gated, why, the stats of :func:`compare`, ``command``), ``files``, ``ok`` (every
        gated comparison passed).
    """
    from nxm_deploy.runtimes import get_runtime

    out_dir, run_dir = Path(out_dir).resolve(), Path(run_dir).resolve()
    results = collect_outputs(runners, feeds)
    n_cal = calibration_batches(len(feeds))
    tolerances = {
        "fp32": {"atol": FP32_ATOL, "rtol": 0.0, "rule": "FP32 vs FP32 on CPU: summation order only"},
        "gpu_float": {"atol": GPU_FLOAT_ATOL, "rtol": 0.0, "rule": "TF32/FP16 GPU kernels vs FP32"},
    }
    if "torch_int8_fakequant" in runners and "sparse_int8" in runners and feeds:
        int8 = int8_tolerance(
            logits_of(results, "torch_int8_fakequant"), logits_of(results, "sparse_int8"),
            logits_of(results, "torch_qat_fp32") if "torch_qat_fp32" in runners else None, factor=factor,
            fakequant_fp64=logits_of(results, FAKEQUANT_FP64) if FAKEQUANT_FP64 in runners else None,
            n_calibration=n_cal,
        )
    else:
        int8 = {"atol": INT8_FALLBACK_ATOL, "rtol": 0.0,
                "rule": "no fake-quant reference in this diff: a one-code INT8 rounding flip bound"}
    tolerances["int8"] = int8
    files = save_polygraphy_files(out_dir, feeds, results)
    rel_dir = out_dir.relative_to(run_dir) if out_dir.is_relative_to(run_dir) else out_dir
    rows, to_verify = [], []
    for comp in comparisons if comparisons is not None else default_comparisons(runners):
        tol = tolerances[comp.tolerance]
        row = {"reference": comp.reference, "candidate": comp.candidate, "tolerance": comp.tolerance,
               "atol": tol["atol"], "rtol": tol["rtol"], "gated": comp.gated, "why": comp.why,
               **compare(results, comp.reference, comp.candidate, tol["atol"], tol["rtol"])}
        cand = runners[comp.candidate]
        argv = None
        if comp.gated and cand.source:
            src = Path(cand.source).resolve()
            model = src.relative_to(run_dir) if src.is_relative_to(run_dir) else src
            argv = polygraphy_argv(str(model), cand.backend, f"{rel_dir}/{outputs_file(comp.reference)}",
                                   tol["atol"], tol["rtol"], inputs=f"{rel_dir}/{INPUTS_FILE}")
        row["command"] = format_command(argv, run_dir) if argv else None
        if argv and get_runtime(cand.backend).device == "cpu":  # re-runnable here by hand
            to_verify.append((row, argv))
        rows.append(row)
    # re-run the printed commands with the polygraphy CLI (INT8 ones first): the hand-run verdict must agree
    for row, argv in sorted(to_verify, key=lambda item: item[0]["tolerance"] != "int8")[:max(0, verify_cli)]:
        rc, tail = run_polygraphy(argv, run_dir)
        row["cli_exit_code"] = rc
        row["cli_agrees"] = (rc == 0) == row["passed"]
        if not row["cli_agrees"]:
            log.warning("polygraphy CLI verdict (exit %s) differs from the in-process comparison: %s", rc, tail)
    n, b = len(feeds), (int(next(iter(feeds[0].values())).shape[0]) if feeds else 0)
    L = int(next(iter(feeds[0].values())).shape[1]) if feeds else 0
    return {
        "inputs": f"{n} batches of {b} real dev examples padded to {L} tokens (first {n_cal} calibrate the INT8 "
                  "tolerance's observed noise)",
        "batches": n, "batch_size": b, "sequence_length": L, "runners": list(runners), "tolerances": tolerances,
        "comparisons": rows, "files": {k: f"{rel_dir}/{v}" for k, v in files.items()},
        "ok": all(r["passed"] for r in rows if r["gated"]),
    }
