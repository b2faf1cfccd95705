"""GLUE task data: task registry, TSV / Hugging Face readers, metrics and PyTorch loaders.

Importing this package does not import torch or transformers; ``encode_dataset``, ``make_dataloader`` and
``encode_fixed``
(from :mod:`nxm_deploy.data.loader`, which needs torch) are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nxm_deploy.data.glue import GLUE_DIR_ENV, TaskExamples, load_task_split, resolve_glue_dir
from nxm_deploy.data.metrics import compute_metrics
from nxm_deploy.data.tasks import TASKS, TaskSpec, get_task, register_task

if TYPE_CHECKING:  # pragma: no cover
    from nxm_deploy.data.loader import TaskData, encode_dataset, encode_fixed, make_dataloader

__all__ = [
    "GLUE_DIR_ENV",
    "TASKS",
    "TaskData",
    "TaskExamples",
    "TaskSpec",
    "compute_metrics",
    "encode_dataset",
    "encode_fixed",
    "get_task",
    "load_task_split",
    "make_dataloader",
    "register_task",
    "resolve_glue_dir",
]

_LAZY = {"TaskData", "encode_dataset", "make_dataloader", "encode_fixed"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from nxm_deploy.data import loader  # noqa: PLC0415 - imports torch

        return getattr(loader, name)
    raise AttributeError(f"module 'nxm_deploy.data' has no attribute {name!r}")
