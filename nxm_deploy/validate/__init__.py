"""Validation of a run's deployable models, in one process, and the run report.

* :mod:`~nxm_deploy.validate.runners` - ONNX Runtime (CPU / CUDA / TensorRT EP), TensorRT engines and PyTorch
  behind Polygraphy's runner interface (context manager, ``infer(feed_dict)``);
* :mod:`~nxm_deploy.validate.stage` - :func:`validate_stage`: dev-set metric per runner, output diff, latency grid,
  gates; writes ``validation.json`` and ``diff/``;
* :mod:`~nxm_deploy.timing` - interleaved A/B timing, percentiles, same-run speedups;
* :mod:`~nxm_deploy.validate.diff` - Polygraphy Comparator with INT8-aware tolerances, saved inputs/outputs and
  the ``polygraphy run`` commands that re-check them by hand;
* :mod:`~nxm_deploy.validate.gates` - CI thresholds (their errors and exit codes: :mod:`nxm_deploy.errors`);
* :mod:`~nxm_deploy.validate.report` / :mod:`~nxm_deploy.validate.plots` - ``report.json``, ``report.md``, ``plots/``.

Importing this package imports nothing heavy; import the submodules.
"""
