"""Which ``nn.Linear`` weights are sparsified: glob rules over module names, every skip recorded."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from torch import nn

from nxm_deploy.errors import ConfigError
from nxm_deploy.sparsity.pattern import NMPattern

#: Default rule: every Linear inside the transformer layer stack, i.e. Q, K, V, attention output, FFN1 and
#: FFN2 of each encoder layer (BERT/RoBERTa/ELECTRA ``*.encoder.layer.<i>.*``, DistilBERT
#: ``*.transformer.layer.<i>.*``). Pooler and classifier stay dense (NxMTransformer Fig. 1).
DEFAULT_INCLUDE = ("*.layer.*",)


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


def select_targets(
    model: nn.Module,
    pattern: NMPattern,
    include: tuple[str, ...] | list[str] = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] | list[str] = (),
) -> list[LayerDecision]:
    """Decide, for every ``nn.Linear`` in ``model``, whether it gets the n:m pattern.

    A Linear is a target when its fqn matches an ``include`` glob, matches no ``exclude`` glob, and its
    ``in_features`` (the reduction axis) is a multiple of ``pattern.m_group``. Every other Linear is
    listed with the reason it was skipped: nothing is skipped silently.

    Args:
        model (nn.Module): the model to scan.
        pattern (NMPattern): the pattern (only ``m_group`` matters here).
        include, exclude: ``fnmatch`` globs over module fqns.

    Returns:
        list[LayerDecision]: in module order, targets and skips alike.
    """
    decisions = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        shape = (module.out_features, module.in_features)
        matched = next((g for g in include if fnmatch.fnmatchcase(name, g)), None)
        excluded = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
        if matched is None:
            decisions.append(LayerDecision(name, shape, False, f"skipped: matches no include rule {list(include)}"))
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
            decisions.append(LayerDecision(name, shape, True, f"target: matches '{matched}'"))
    return decisions


def require_targets(
    model: nn.Module,
    pattern: NMPattern,
    include: tuple[str, ...] | list[str] = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] | list[str] = (),
) -> list[LayerDecision]:
    """:func:`select_targets`, refusing rules that cannot be what the user meant.

    Raises:
        ConfigError: an include or exclude glob matches no ``nn.Linear`` of the model (a typo, or rules written
            for another architecture), or no Linear is eligible at all (every one skipped; the reasons are listed).
    """
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for kind, globs in (("include", include), ("exclude", exclude)):
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
            f"No nn.Linear of {type(model).__name__} is eligible for {pattern} (include {list(include)}, "
            f"exclude {list(exclude)}): {'; '.join(reasons)}.",
            hint="Loosen the exclude rules, or pick a pattern whose group size divides the layers' in_features.",
        )
    return decisions


def target_names(decisions: list[LayerDecision]) -> list[str]:
    """Module fqns of the targets among ``decisions``."""
    return [d.module for d in decisions if d.target]
