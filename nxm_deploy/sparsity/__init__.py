"""n:m sparsity: the pattern type, exact projection masks, target selection and the ADMM sparsifier.

Importing this package does not import torch (the recipe schema needs only :class:`NMPattern`); the mask functions
(:mod:`nxm_deploy.sparsity.mask`, torch) are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nxm_deploy.sparsity.pattern import NMPattern

if TYPE_CHECKING:  # pragma: no cover
    from nxm_deploy.sparsity.mask import count_nm_violations, nm_mask, nm_project

__all__ = ["NMPattern", "nm_mask", "nm_project", "count_nm_violations"]

_LAZY = {"nm_mask", "nm_project", "count_nm_violations"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from nxm_deploy.sparsity import mask  # noqa: PLC0415 - imports torch

        return getattr(mask, name)
    raise AttributeError(f"module 'nxm_deploy.sparsity' has no attribute {name!r}")
