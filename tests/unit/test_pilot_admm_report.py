"""tools/pilot_admm_report.py applies the round-2 rule of benchmarks/PROTOCOL.md: the residual bound on every task
first, then the best average kept score, with rho 500 kept unless a new configuration leads it by more than 0.1."""

from __future__ import annotations

from pathlib import Path
from tiny_models import tool_module

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("rte", "mrpc")


def _load():
    return tool_module("pilot_admm_report")


def _results(**per_config):
    """{config: {task: cell}} from {config: [(score, residual) per task]}; a missing config has not run."""
    out = {}
    for name in ("rho500_epoch", "rho200_epoch", "rho100x3_epoch", "magnitude"):
        cells = per_config.get(name)
        out[name] = {t: None if cells is None else {"score": s, "residual": r, "projected": s, "mask_change": []}
                     for t, (s, r) in zip(TASKS, cells or [(0, 0)] * len(TASKS))}
    return out


def test_the_best_average_within_the_residual_bound_is_kept():
    report = _load()
    results = _results(rho500_epoch=[(56.0, 0.01), (82.0, 0.01)], rho200_epoch=[(57.0, 0.03), (83.0, 0.04)],
                       rho100x3_epoch=[(60.0, 0.20), (85.0, 0.01)])  # the best scores, but over the bound on RTE
    assert report.decide(results, TASKS)[0] == "rho200_epoch"


def test_a_lead_of_at_most_0_1_keeps_rho_500():
    report = _load()
    results = _results(rho500_epoch=[(56.0, 0.01), (82.0, 0.01)], rho200_epoch=[(56.1, 0.03), (82.05, 0.04)],
                       rho100x3_epoch=[(50.0, 0.01), (80.0, 0.01)])
    kept, why = report.decide(results, TASKS)
    assert kept == "rho500_epoch" and "not more than" in why


def test_nothing_is_decided_while_a_configuration_has_not_run():
    report = _load()
    results = _results(rho500_epoch=[(56.0, 0.01), (82.0, 0.01)], rho200_epoch=[(70.0, 0.01), (90.0, 0.01)])
    assert report.decide(results, TASKS)[0] is None
