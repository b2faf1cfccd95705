"""The n:m mask methods: how the sparse stage finds its mask. One module per method, one registration here.

A method is a :class:`MaskMethod`: its recipe name (``sparsity.method``), its report label, its source, the
method-only recipe keys it reads, the pip extra it needs, and ``find``, a ``"module:function"`` called with a
:class:`MaskSearch` that returns a :class:`MaskResult`. The sparse stage (:func:`nxm_deploy.training.stage.train_admm`)
calls ``find``, then runs the same KD masked fine-tune for every method (``train.admm.epochs +
masked_finetune_epochs`` epochs in all, less the epochs the method trained itself), then the same QAT.

Adding a method: write a module with ``find_masks(search) -> MaskResult`` and register it in :data:`METHODS`. The
recipe validates ``sparsity.method`` against this registry, the stage key leaves out the method-only keys another
method does not read (:func:`unread_keys`), and the benchmark tables take their labels from it.

This module imports neither torch nor the methods (the recipe schema reads it); :meth:`MaskMethod.function` imports
one method when it runs.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nxm_deploy.errors import ConfigError, MissingDependencyError

#: recipe keys that only some methods read (the ADMM iteration; the calibration of the data-aware masks). A stage's
#: key leaves out those its method does not read, so a change of one method's settings reruns that method's cells only.
ADMM_KEYS = tuple(f"train.admm.{k}" for k in ("rho", "rho_factor", "rho_max", "update_interval", "u_init",
                                              "penalty_mode"))
CALIBRATION_KEYS = ("sparsity.calibration_batches",)
METHOD_KEYS = ADMM_KEYS + CALIBRATION_KEYS


@dataclass
class MaskSearch:
    """What a method's ``find`` is called with (the sparse stage builds it).

    Attributes:
        recipe (Recipe): the run's recipe (``sparsity``, ``train.admm``, ``train`` sections).
        run_dir (Path): the run directory (a method that trains checkpoints under it).
        student (nn.Module): a copy of the dense fine-tuned model, on the CPU; the method may change its weights
            (ADMM trains it, SparseGPT reconstructs the kept weights); the stage then zeroes the pruned weights.
        teacher (nn.Module): the dense model itself (unchanged; the KD teacher).
        data (TaskData): the task's encoded train/dev sets.
        targets (list[str]): module fqns of the ``nn.Linear`` layers to sparsify (the stage's target selection).
        pattern (NMPattern): the n:m pattern (n kept in every m consecutive weights along the input axis).
        kd (dict): Trainer keywords of distillation from the teacher (empty without KD).
        calibration (Callable[[nn.Module], None]): ``forward_loop(model)``: runs the first
            ``sparsity.calibration_batches`` training batches (the Trainer's first-epoch order) through ``model``.
        device (torch.device): the device the stage trains on (where ``calibration`` puts the batches).
        fingerprint (Callable[[str], str]): a checkpoint fingerprint of a training phase, by phase name.
    """

    recipe: Any
    run_dir: Any
    student: Any
    teacher: Any
    data: Any
    targets: list[str]
    pattern: Any
    kd: dict
    calibration: Callable[[Any], None]
    device: Any
    fingerprint: Callable[[str], str]


@dataclass
class MaskResult:
    """What a method returns.

    Attributes:
        masks (dict[str, torch.Tensor]): ``"<module>.weight" -> bool [out, in]`` (True = keep), exactly n:m along
            the input axis, one per target.
        epochs (float): training epochs the method itself used (ADMM's epochs; 0 for one-shot masks); the masked
            fine-tune gets the rest of the stage's budget.
        candidate (dict | None): a model the method ends with that competes with the masked fine-tune's epochs
            under ``train.select: best`` (ADMM: its hard projection; ``{"label", "epoch"}``); None: the masked
            epochs are the only candidates.
        stats (dict | None): the method's training statistics (``train_resumable``'s dict), if it trained.
        history (list): the method's iteration record (ADMM: one entry per Z/U update).
        details (dict): anything else the stage manifest records (calibration, timings, library versions).
    """

    masks: dict
    epochs: float = 0.0
    candidate: dict | None = None
    stats: dict | None = None
    history: list = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MaskMethod:
    """One registered mask method.

    Attributes:
        name: its ``sparsity.method`` value.
        label: its name in reports, e.g. ``"2:4 magnitude"`` is ``f"{pattern} {label}"``.
        source: the paper (and equation) it implements.
        find: ``"module:function"``, ``function(MaskSearch) -> MaskResult``.
        reads: the keys of :data:`METHOD_KEYS` it reads.
        extra: the ``pip install nxm-deploy[<extra>]`` it needs (None: the base install).
        module: the import that :meth:`check_available` tries for ``extra``.
    """

    name: str
    label: str
    source: str
    find: str
    reads: tuple[str, ...] = ()
    extra: str | None = None
    module: str | None = None

    def function(self) -> Callable[[MaskSearch], MaskResult]:
        """The ``find`` function (imports its module).

        Raises:
            MissingDependencyError: the method's extra is not installed (CLI exit 3).
        """
        self.check_available()
        module, _, attr = self.find.partition(":")
        return getattr(importlib.import_module(module), attr)

    def check_available(self) -> None:
        """Raise when the method's optional dependency is missing.

        Raises:
            MissingDependencyError: ``module`` cannot be imported (one line, with the install command).
        """
        if self.module is None:
            return
        try:
            with warnings.catch_warnings():  # version chatter at import (ModelOpt: "transformers X is not tested")
                warnings.simplefilter("ignore")
                importlib.import_module(self.module)
        except ImportError as exc:
            raise MissingDependencyError(
                f"sparsity.method {self.name} needs {self.module} ({exc.name or exc}), which is not installed.",
                hint=f"pip install 'nxm-deploy[{self.extra}]' (or -e '.[{self.extra}]' in a checkout), or choose "
                     f"another sparsity.method: {', '.join(METHODS)}.") from None


METHODS: dict[str, MaskMethod] = {m.name: m for m in (
    MaskMethod("magnitude", "magnitude",
               "ASP (Mishra et al. 2021, 'Accelerating Sparse Deep Neural Networks'): keep the n largest |w| of "
               "every m", "nxm_deploy.sparsity.methods.magnitude:find_masks"),
    MaskMethod("admm", "ADMM",
               "NxMTransformer (Holmes et al., NeurIPS 2021), Eq. 4-7: ADMM with KD, then the hard projection",
               "nxm_deploy.training.stage:admm_masks", reads=ADMM_KEYS),
    MaskMethod("wanda", "Wanda",
               "Wanda (Sun et al., ICLR 2024, 'A Simple and Effective Pruning Approach for LLMs'), Eq. 1: score "
               "|W_ij| * ||X_j||_2, n:m groups along the input axis, block by block",
               "nxm_deploy.sparsity.methods.wanda:find_masks", reads=CALIBRATION_KEYS),
    MaskMethod("sparsegpt", "SparseGPT",
               "SparseGPT (Frantar & Alistarh, ICML 2023), Alg. 1, through NVIDIA ModelOpt's "
               "mts.sparsify(mode='sparsegpt'): the OBS mask from calibration Hessians (ModelOpt keeps the mask only)",
               "nxm_deploy.sparsity.methods.sparsegpt:find_masks", reads=CALIBRATION_KEYS, extra="modelopt",
               module="modelopt.torch.sparsity"),
)}


def get_method(name: str) -> MaskMethod:
    """The registered method called ``name``.

    Raises:
        ConfigError: unknown name (the registered ones are listed).
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"sparsity.method {name!r} is not a mask method; the methods are {', '.join(METHODS)}.",
                          hint="e.g. --set sparsity.method=wanda (nxm_deploy/sparsity/methods registers them).") from None


def unread_keys(name: str) -> frozenset[str]:
    """The method-only recipe keys (:data:`METHOD_KEYS`) that method ``name`` does not read."""
    return frozenset(k for k in METHOD_KEYS if k not in get_method(name).reads)
