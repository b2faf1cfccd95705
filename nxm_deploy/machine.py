"""One description of the machine for reports and benchmarks (results are compared only within one machine)."""

from __future__ import annotations

import os
import platform


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset, a test worker pinned to
    one core), else every core. The default thread count of ONNX Runtime sessions; PyTorch's OpenMP pool follows
    the affinity by itself."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str | None:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``, else None."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """``line`` (one readable line) plus its parts: platform, CPU count and model, Python version."""
    model = cpu_model()
    line = f"{platform.platform()}, {os.cpu_count()} CPUs" + (f", {model}" if model else "")
    line += f", Python {platform.python_version()}"
    return {"line": line, "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version()}


def machine_line() -> str:
    """:func:`machine`'s one-line form."""
    return machine()["line"]
