"""Validation of a run's deployable models, in one process, and the run report.

* the runners come from the runtimes (:mod:`nxm_deploy.runtimes`: ONNX Runtime, TensorRT, PyTorch behind
  Polygraphy's runner interface); :mod:`~nxm_deploy.validate.runners` checks each one's inputs and outputs;
* :mod:`~nxm_deploy.validate.stage` - :func:`validate_stage`: dev-set metric per runner, output diff, latency grid,
  gates; writes ``validation.json`` and ``diff/``;
* :mod:`~nxm_deploy.timing` - interleaved A/B timing, percentiles, same-run speedups;
* :mod:`~nxm_deploy.validate.diff` - Polygraphy Comparator with INT8-aware tolerances, saved inputs/outputs and
  the ``polygraphy run`` commands that re-check them by hand;
* :mod:`~nxm_deploy.validate.gates` - CI thresholds (their errors and exit codes: :mod:`nxm_deploy.errors`);
* :mod:`~nxm_deploy.validate.report` / :mod:`~nxm_deploy.validate.plots` - ``report.json``, ``report.md``, ``plots/``.

Importing this package imports nothing heavy; import the submodules.
"""
