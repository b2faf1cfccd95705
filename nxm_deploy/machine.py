"""One description of the machine for reports and benchmarks (results are compared only within one machine)."""

from __future__ import annotations

import os
import platform


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
