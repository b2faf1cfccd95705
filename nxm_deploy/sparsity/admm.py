"""ADMM n:m sparsification (NxMTransformer, Holmes et al., NeurIPS 2021), with the torch.ao sparsifier lifecycle.

Scaled-form ADMM on ``min f(W) s.t. W in S`` where ``S`` is the n:m set (method-notes 1.2):

* W-step (every optimizer step): minimise ``f(W) + rho/2 * ||W - Z + U||_F^2`` by ordinary optimizer steps.
  Two ways to apply the quadratic term (``penalty_mode``):

  - ``"gradient"`` (the authors' code, method-notes 1.3): :meth:`ADMMSparsifier.penalty` returns the quadratic
    term, so its gradient ``rho * (W - Z + U)`` joins the task gradient when it is added to the loss. Under Adam
    every coordinate then moves at most about ``lr`` per step whatever rho is, so on small tasks (80-120 steps
    per epoch at lr 1e-4) W cannot reach ``Z - U`` between updates and the dual inflates (the mask oscillates).
  - ``"proximal"`` (forward-backward splitting): the optimizer steps on the task loss only, then
    :meth:`ADMMSparsifier.proximal_step` applies the exact proximal operator of the quadratic term with the
    current learning rate ``eta``: ``W <- (W + eta*rho*(Z - U)) / (1 + eta*rho)``. The pull towards ``Z - U``
    is then independent of Adam's normalisation; rho is on another scale (eta*rho is the fraction pulled per
    step, e.g. rho 200 at lr 1e-4 pulls 2 % per step).
* Z-step (:meth:`ADMMSparsifier.step`): ``Z <- Proj_S(W + U)`` -- exact per-group top-``n_keep`` projection.
* U-step (same call): ``U <- U + W - Z``.
* End: :meth:`ADMMSparsifier.squash_mask` hard-projects ``W <- Proj_S(W)`` and returns the masks.

Lifecycle after ``torch.ao.pruning.BaseSparsifier``: ``prepare(model, config)`` -> (train, ``step()``)* ->
``squash_mask()``; ``state_dict()``/``load_state_dict()`` carry Z, U, rho, the update count and masks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from nxm_deploy.errors import ConfigError, PatternError
from nxm_deploy.sparsity.mask import nm_mask
from nxm_deploy.sparsity.pattern import DEFAULT_RHO, NMPattern


def _get_tensor(model: nn.Module, tensor_fqn: str) -> torch.Tensor:
    module_fqn, _, tensor_name = tensor_fqn.rpartition(".")
    try:
        module = model.get_submodule(module_fqn)
    except AttributeError as exc:
        raise ConfigError(f"tensor_fqn '{tensor_fqn}': module '{module_fqn}' not found in the model.") from exc
    tensor = getattr(module, tensor_name, None)
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"tensor_fqn '{tensor_fqn}': '{module_fqn}' has no tensor '{tensor_name}'.")
    return tensor


class ADMMSparsifier:
    """Optimizer-like ADMM n:m sparsifier.

    Args:
        pattern (NMPattern | str): the n:m pattern, e.g. ``"2:4"``; groups run along the last (input) axis of
            each ``[out, in]`` weight.
        rho (float): initial penalty weight. Defaults to :data:`DEFAULT_RHO` (4e-3, the recipe's default).
        rho_factor (float): rho is multiplied by this after every :meth:`step` (U is rescaled with it). 1.0 = constant
            rho.
        rho_max (float | None): cap for the increasing schedule. Defaults to no cap.
        u_init (str): ``"zero"`` (textbook scaled ADMM, U0 = 0) or ``"residual"`` (U0 = W0 - Proj(W0), what the
            authors' library does by running one iteration at construction).
        penalty_mode (str): ``"gradient"`` (add :meth:`penalty` to the loss; authors' code) or ``"proximal"``
            (call :meth:`proximal_step` after every optimizer step; see the module docstring).

    Raises:
        ConfigError: for a non-positive rho, a rho_factor below 1, an unknown ``u_init`` or ``penalty_mode``.
    """

    def __init__(
        self,
        pattern: NMPattern | str = "2:4",
        rho: float = DEFAULT_RHO,
        rho_factor: float = 1.0,
        rho_max: float | None = None,
        u_init: str = "zero",
        penalty_mode: str = "gradient",
    ):
        if rho <= 0:
            raise ConfigError(f"rho={rho} must be > 0.")
        if rho_factor < 1.0:
            raise ConfigError(f"rho_factor={rho_factor} must be >= 1 (1 = constant rho).")
        if u_init not in ("zero", "residual"):
            raise ConfigError(f"u_init={u_init!r} is not one of 'zero', 'residual'.")
        if penalty_mode not in ("gradient", "proximal"):
            raise ConfigError(f"penalty_mode={penalty_mode!r} is not one of 'gradient', 'proximal'.")
        self.penalty_mode = penalty_mode
        self.pattern = NMPattern.parse(pattern)
        self.rho = float(rho)
        self.rho_factor = float(rho_factor)
        self.rho_max = rho_max
        self.u_init = u_init
        self.model: nn.Module | None = None
        self.tensor_fqns: list[str] = []
        self.admm_z: dict[str, torch.Tensor] = {}
        self.admm_u: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self.history: list[dict] = []
        self.squashed = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, config: list[dict]) -> None:
        """Attach to ``model`` and initialise Z = Proj(W0) and U per ``u_init`` for each ``{"tensor_fqn": ...}``.

        Raises:
            PatternError: when a weight's last axis is not a multiple of ``m_group``.
            ConfigError: for an unknown tensor fqn or an empty config.
        """
        if not config:
            raise ConfigError("ADMMSparsifier.prepare got an empty config: no tensor to sparsify.")
        self.model = model
        self.tensor_fqns = [entry["tensor_fqn"] for entry in config]
        with torch.no_grad():
            for fqn in self.tensor_fqns:
                weight = _get_tensor(model, fqn)
                if weight.ndim != 2:
                    raise PatternError(f"{fqn}: ADMM n:m expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
                mask = nm_mask(weight, self.pattern)
                z = weight.detach() * mask
                self.admm_z[fqn] = z
                self.admm_u[fqn] = (weight.detach() - z) if self.u_init == "residual" else torch.zeros_like(weight)
                self.masks[fqn] = mask

    def _weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.model is None:
            raise ConfigError("ADMMSparsifier is not prepared: call prepare(model, config) first.")
        for fqn in self.tensor_fqns:
            yield fqn, _get_tensor(self.model, fqn)

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum_i ||W_i - Z_i + U_i||_F^2`` (scalar, differentiable in W; Z and U are constants).

        Add it to the task loss before ``backward()``: its gradient is ``rho * (W - Z + U)``.
        """
        total = None
        for fqn, weight in self._weights():
            z, u = self.admm_z[fqn], self.admm_u[fqn]
            term = (weight - z.to(weight.dtype) + u.to(weight.dtype)).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * self.rho * total

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        """Exact prox of ``rho/2 ||W - Z + U||^2`` with step ``lr``: ``W <- (W + c (Z - U)) / (1 + c)``, ``c = lr*rho``.

        The ``"proximal"`` W-step (forward-backward splitting: optimizer step on the task loss, then this);
        a no-op in ``"gradient"`` mode, where :meth:`penalty` carries the term.

        Raises:
            ConfigError: for a negative ``lr``.
        """
        if self.penalty_mode != "proximal":
            return
        if lr < 0:
            raise ConfigError(f"proximal_step: lr={lr} must be >= 0.")
        c = float(lr) * self.rho
        if c == 0.0:
            return
        for fqn, weight in self._weights():
            target = (self.admm_z[fqn] - self.admm_u[fqn]).to(device=weight.device, dtype=weight.dtype)
            weight.add_(target, alpha=c).div_(1.0 + c)

    @torch.no_grad()
    def step(self) -> dict:
        """One ADMM Z/U update: ``Z <- Proj(W + U)``, ``U <- U + W - Z``, then the rho schedule.

        When the schedule changes rho (``rho_factor`` > 1, up to ``rho_max``), U is rescaled by ``rho_old / rho_new``:
        U is the scaled dual ``Lambda / rho`` (method-notes 1.2), and a varying penalty must leave ``Lambda`` as it is
        (Boyd et al. 2011, "Distributed Optimization and Statistical Learning via ADMM", section 3.4.1). Without
        it, each increase of rho multiplies the dual, the W-step target ``Z - U`` overshoots, and the residual
        grows instead of shrinking.

        Returns:
            dict: ``primal_residual`` (sqrt of sum ||W - Z||_F^2), ``relative_residual`` (that over ||W||_F),
            ``mask_change`` (fraction of weights whose
            kept/pruned state changed since the previous update), ``rho`` (the value used by this update).
        """
        residual_sq, weight_sq, changed, total = 0.0, 0.0, 0, 0
        for fqn, weight in self._weights():
            w = weight.detach().float()
            target = w + self.admm_u[fqn]
            mask = nm_mask(target, self.pattern)
            z = target * mask
            self.admm_u[fqn] = self.admm_u[fqn] + w - z
            self.admm_z[fqn] = z
            residual_sq += float((w - z).pow(2).sum())
            weight_sq += float(w.pow(2).sum())
            changed += int((mask != self.masks[fqn]).sum())
            total += mask.numel()
            self.masks[fqn] = mask
        record = {
            "update": self.num_updates + 1,
            "rho": self.rho,
            "primal_residual": residual_sq**0.5,
            "relative_residual": (residual_sq / max(weight_sq, 1e-30)) ** 0.5,
            "mask_change": changed / max(total, 1),
        }
        self.num_updates += 1
        rho = self.rho * self.rho_factor
        if self.rho_max is not None:
            rho = min(rho, self.rho_max)
        if rho != self.rho:  # the scaled dual U = Lambda / rho follows rho, so the dual Lambda itself is unchanged
            for fqn in self.admm_u:
                self.admm_u[fqn] = self.admm_u[fqn] * (self.rho / rho)
        self.rho = rho
        self.history.append(record)
        return record

    @contextlib.contextmanager
    def hard_projected(self) -> Iterator[None]:
        """Context in which every target weight is ``Proj(W)`` (for evaluation); the dense W is restored on exit.

        Follows the authors' evaluation: the score reported during ADMM is that of the hard-projected model.
        """
        saved = {}
        with torch.no_grad():
            for fqn, weight in self._weights():
                saved[fqn] = weight.detach().clone()
                weight.mul_(nm_mask(weight, self.pattern).to(weight.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for fqn, weight in self._weights():
                    weight.copy_(saved[fqn])

    @torch.no_grad()
    def squash_mask(self) -> dict[str, torch.Tensor]:
        """Final hard projection ``W <- Proj(W)``; returns the bool masks (True = keep), keyed by tensor fqn.

        After this call Z and U are dropped; the masks must be enforced by the caller in any later training
        (see :func:`apply_masks_`).
        """
        for fqn, weight in self._weights():
            mask = nm_mask(weight, self.pattern)
            weight.mul_(mask.to(weight.dtype))
            self.masks[fqn] = mask
        self.admm_z.clear()
        self.admm_u.clear()
        self.squashed = True
        return dict(self.masks)

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """All ADMM state: pattern, rho schedule, update count, history, and Z, U, masks per tensor fqn."""
        return {
            "pattern": str(self.pattern),
            "rho": self.rho,
            "rho_factor": self.rho_factor,
            "rho_max": self.rho_max,
            "u_init": self.u_init,
            "penalty_mode": self.penalty_mode,
            "num_updates": self.num_updates,
            "history": list(self.history),
            "squashed": self.squashed,
            "tensor_fqns": list(self.tensor_fqns),
            "admm_z": {k: v.clone() for k, v in self.admm_z.items()},
            "admm_u": {k: v.clone() for k, v in self.admm_u.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (call after :meth:`prepare` on the same model layout).

        Raises:
            ConfigError: when the state's pattern or tensor set differs from this sparsifier's.
        """
        if state["pattern"] != str(self.pattern):
            raise ConfigError(f"ADMM state has pattern {state['pattern']}, this sparsifier uses {self.pattern}.")
        if self.tensor_fqns and set(state["tensor_fqns"]) != set(self.tensor_fqns):
            raise ConfigError("ADMM state targets a different set of tensors than this sparsifier was prepared with.")
        self.tensor_fqns = list(state["tensor_fqns"])
        self.rho = state["rho"]
        self.rho_factor = state["rho_factor"]
        self.rho_max = state["rho_max"]
        self.u_init = state["u_init"]
        self.penalty_mode = state.get("penalty_mode", "gradient")
        self.num_updates = state["num_updates"]
        self.history = list(state["history"])
        self.squashed = state["squashed"]
        self.admm_z = {k: v.clone() for k, v in state["admm_z"].items()}
        self.admm_u = {k: v.clone() for k, v in state["admm_u"].items()}
        self.masks = {k: v.clone() for k, v in state["masks"].items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """In place: ``W <- W * mask`` for every ``tensor_fqn -> bool mask``; pruned weights become exact zeros.

    Raises:
        ConfigError: when a mask's shape differs from its weight's.
    """
    for fqn, mask in masks.items():
        weight = _get_tensor(model, fqn)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(f"Mask for {fqn} must have shape {tuple(weight.shape)}, got {tuple(mask.shape)}.")
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))
