"""Which ``nn.Linear`` weights are sparsified: the architecture registry's roles (default) or glob rules over module
names (a recipe's ``sparsity.include``), every skip recorded."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass

from torch import nn

from nxm_deploy.architectures import FALLBACK_BLOCKS, architecture_of
from nxm_deploy.errors import ConfigError
from nxm_deploy.sparsity.pattern import NMPattern

log = logging.getLogger("nxm_deploy.sparsity")

#: ``include=None``: the architecture registry decides (Q, K, V, attention output, MLP up and down of every block;
#: embeddings, pooler, classifier and the registry's dense rules stay dense, NxMTransformer Fig. 1).
DEFAULT_INCLUDE = None


@dataclass(frozen=True)
class LayerDecision:
    """One ``nn.Linear`` and whether it is an n:m target.

    Attributes:
        module (str): module fqn, e.g. ``bert.encoder.layer.0.attention.self.query``.
        shape (tuple[int, int]): weight shape ``[out_features, in_features]``.
        target (bool): True when the weight is sparsified.
        reason (str): why it was included or skipped.
    """

    module: str
    shape: tuple[int, int]
    target: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def select_targets(
    model: nn.Module,
    pattern: NMPattern,
    include: tuple[str, ...] | list[str] | None = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] | list[str] = (),
) -> list[LayerDecision]:
    """Decide, for every ``nn.Linear`` in ``model``, whether it gets the n:m pattern.

    With ``include=None`` a Linear is a target when the architecture registry (:mod:`nxm_deploy.architectures`,
    by ``model.config.model_type``) gives it a role (q, k, v, o, up, down) and no dense rule; a model type without
    an entry takes every Linear inside its blocks (:data:`~nxm_deploy.architectures.FALLBACK_BLOCKS`) and logs a
    warning listing them. With ``include`` globs, a Linear is a target when its fqn matches one. Either way it must
    match no ``exclude`` glob, and its ``in_features`` (the reduction axis) must be a multiple of
    ``pattern.m_group``. Every other Linear is listed with the reason it was skipped: nothing is skipped silently.

    Args:
        model (nn.Module): the model to scan.
        pattern (NMPattern): the pattern (only ``m_group`` matters here).
        include: ``fnmatch`` globs over module fqns, or None for the registry.
        exclude: ``fnmatch`` globs over module fqns.

    Returns:
        list[LayerDecision]: in module order, targets and skips alike.
    """
    arch = architecture_of(_model_type(model)) if include is None else None
    fallback = include is None and arch is None
    decisions = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        shape = (module.out_features, module.in_features)
        if arch is not None:
            role, dense = arch.role_of(name), arch.dense_reason(name)
            matched = f"{role} of {arch.name}" if role and not dense else None
            skip = (f"skipped: left dense ({arch.name}): {dense}" if dense else
                    f"skipped: not an attention or MLP projection of a {arch.name} block")
        else:
            globs = FALLBACK_BLOCKS if fallback else include
            probe = "." + name if fallback else name  # a bare model's "layers.0.fc" is inside "*.layers.*" too
            glob = next((g for g in globs if fnmatch.fnmatchcase(probe, g)), None)
            matched = None if glob is None else f"matches '{glob}'"
            skip = (f"skipped: outside the blocks {list(FALLBACK_BLOCKS)} of an unknown architecture" if fallback
                    else f"skipped: matches no include rule {list(include)}")
        excluded = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
        if matched is None:
            decisions.append(LayerDecision(name, shape, False, skip))
        elif excluded is not None:
            decisions.append(LayerDecision(name, shape, False, f"skipped: excluded by rule '{excluded}'"))
        elif module.in_features % pattern.m_group:
            decisions.append(
                LayerDecision(
                    name, shape, False,
                    f"skipped: in_features {module.in_features} not a multiple of m_group {pattern.m_group}",
                )
            )
        else:
            decisions.append(LayerDecision(name, shape, True, f"target: {matched}"))
    if fallback:
        chosen = [d.module for d in decisions if d.target]
        log.warning("model type %r is not in the architecture registry: every Linear inside its blocks is an n:m "
                    "target (%d: %s%s); set sparsity.include to choose", _model_type(model), len(chosen),
                    ", ".join(chosen[:6]), " ..." if len(chosen) > 6 else "")
    return decisions


def require_targets(
    model: nn.Module,
    pattern: NMPattern,
    include: tuple[str, ...] | list[str] | None = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] | list[str] = (),
) -> list[LayerDecision]:
    """:func:`select_targets`, refusing rules that cannot be what the user meant.

    Raises:
        ConfigError: an include or exclude glob matches no ``nn.Linear`` of the model (a typo, or rules written
            for another architecture), or no Linear is eligible at all (every one skipped; the reasons are listed).
    """
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for kind, globs in (("include", include or ()), ("exclude", exclude)):
        unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in linear_names)]
        if unmatched:
            raise ConfigError(
                f"sparsity.{kind} glob(s) {unmatched} match no nn.Linear module of {type(model).__name__}: every "
                f"{kind} rule must select at least one layer.",
                hint=f"Globs are fnmatch patterns over module names, e.g. '*.layer.*'; this model's Linear modules "
                f"include {linear_names[:3]}{' ...' if len(linear_names) > 3 else ''}.",
            )
    decisions = select_targets(model, pattern, include, exclude)
    if not target_names(decisions):
        reasons = sorted({d.reason for d in decisions}) or ["the model has no nn.Linear module"]
        raise ConfigError(
            f"No nn.Linear of {type(model).__name__} is eligible for {pattern} (include "
            f"{'the architecture registry' if include is None else list(include)}, exclude {list(exclude)}): "
            f"{'; '.join(reasons)}.",
            hint="Loosen the exclude rules, or pick a pattern whose group size divides the layers' in_features.",
        )
    return decisions


def target_names(decisions: list[LayerDecision]) -> list[str]:
    """Module fqns of the targets among ``decisions``."""
    return [d.module for d in decisions if d.target]
