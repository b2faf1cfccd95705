"""The n:m sparsity pattern type.

``NMPattern(n_keep=2, m_group=4)`` means **2 nonzeros kept in every 4 consecutive weights** along the
reduction (input) axis, as NVIDIA writes "2:4". Strings are parsed only by :meth:`NMPattern.parse`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nxm_deploy.errors import ConfigError

#: Default ADMM penalty weight rho of the gradient form (NxMTransformer's sweep {1e-3, 4e-3, 1e-2}): the one
#: default of the recipe, :class:`~nxm_deploy.sparsity.admm.ADMMSparsifier` and the Trainer callback.
DEFAULT_RHO = 4e-3

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_MAX_GROUP = 16


@dataclass(frozen=True)
class NMPattern:
    """An n:m pattern: ``n_keep`` nonzeros in every ``m_group`` consecutive weights.

    Args:
        n_keep (int): nonzeros kept per group, ``1 <= n_keep < m_group``.
        m_group (int): group size, a power of two from 2 to 16.

    Raises:
        ConfigError: when the pair is not a legal pattern.
    """

    n_keep: int
    m_group: int

    def __post_init__(self) -> None:
        n_keep, m_group = self.n_keep, self.m_group
        if not isinstance(n_keep, int) or not isinstance(m_group, int):
            raise ConfigError(f"n:m pattern needs integers, got n_keep={n_keep!r}, m_group={m_group!r}.")
        if m_group < 2 or m_group > _MAX_GROUP or (m_group & (m_group - 1)) != 0:
            raise ConfigError(
                f"Pattern '{n_keep}:{m_group}': group size {m_group} is not a power of two from 2 to {_MAX_GROUP}.",
                hint="Use e.g. 2:4, 1:4, 2:8, 4:8 or 4:16.",
            )
        if n_keep >= m_group:
            raise ConfigError(
                f"Pattern '{n_keep}:{m_group}' keeps {n_keep} of every {m_group}: nothing would be pruned.",
                hint=f"did you mean '{m_group}:{n_keep}' ({m_group} nonzeros per {n_keep})?"
                if m_group < n_keep
                else "use a kept count below the group size, e.g. '2:4'.",
            )
        if n_keep < 1:
            raise ConfigError(f"Pattern '{n_keep}:{m_group}' keeps no weight; n_keep must be >= 1.")

    @classmethod
    def parse(cls, text: "str | NMPattern") -> "NMPattern":
        """Parse NVIDIA's ``"n:m"`` string form (``"2:4"``); an :class:`NMPattern` passes through.

        Raises:
            ConfigError: for a malformed string or an illegal pattern such as ``"4:2"``.
        """
        if isinstance(text, NMPattern):
            return text
        match = _PATTERN_RE.match(str(text))
        if not match:
            raise ConfigError(
                f"Pattern {text!r} is not of the form 'n:m'.",
                hint="Write the kept count first, as NVIDIA does: '2:4' keeps 2 nonzeros in every 4.",
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        """Fraction of weights kept, ``n_keep / m_group``."""
        return self.n_keep / self.m_group

    @property
    def sparsity(self) -> float:
        """Fraction of weights that are zero, ``1 - density``."""
        return 1.0 - self.density

    @property
    def slug(self) -> str:
        """File-name form without a colon, e.g. ``"2of4"``."""
        return f"{self.n_keep}of{self.m_group}"

    def __str__(self) -> str:
        return f"{self.n_keep}:{self.m_group}"

    def describe(self) -> str:
        """Display form, e.g. ``"2:4 (2 nonzeros per 4)"``."""
        return f"{self} ({self.n_keep} nonzeros per {self.m_group})"
