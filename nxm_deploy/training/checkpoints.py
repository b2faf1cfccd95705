"""Trainer checkpoints of a training phase: whose they are (a fingerprint of the recipe keys and inputs) and which one a
resume can use (the newest complete one: a kill while saving leaves the newest folder incomplete)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME  # the Trainer's last write in a checkpoint; on_save comes after
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from nxm_deploy.errors import RunDirError
from nxm_deploy.ranks import is_main_process, world_size

log = logging.getLogger("nxm_deploy.training")

FINGERPRINT_FILE = "nxm_fingerprint.json"


def check_fingerprint(output_dir: str | os.PathLike, fingerprint: str) -> None:
    """Refuse checkpoints in ``output_dir`` written by another recipe or world size; record ours otherwise.

    Raises:
        RunDirError: ``output_dir`` holds checkpoints of another fingerprint or world size.
    """
    path = os.path.join(output_dir, FINGERPRINT_FILE)
    mine = {"fingerprint": fingerprint, "world_size": world_size()}
    if os.path.isfile(path):
        with open(path) as fh:
            theirs = json.load(fh)
        if theirs != mine:
            what = ("another world size" if theirs.get("fingerprint") == fingerprint
                    else "a run with other settings")
            raise RunDirError(
                f"Checkpoints in {output_dir} were written by {what} (fingerprint {theirs.get('fingerprint')}, "
                f"{theirs.get('world_size')} process(es); this run {fingerprint}, {mine['world_size']}); resuming "
                "from them would mix two trainings.",
                hint=f"Delete {output_dir} to start this stage over, or rerun with the recipe and world size that "
                "wrote it.",
            )
        return
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(mine, fh)
        os.replace(tmp, path)


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def _checkpoint_complete(path: Path, required: Iterable[str]) -> bool:
    """The Trainer wrote ``trainer_state.json`` (its last write, after model, optimizer, scheduler and RNG states)
    whole, and every file that callbacks write in ``on_save`` (``required``) exists."""
    try:
        TrainerState.load_from_json(str(path / TRAINER_STATE_NAME))
    except (OSError, ValueError, TypeError):  # absent, or cut short by a kill while it was written
        return False
    return all((path / name).is_file() for name in required)


def last_complete_checkpoint(output_dir: str | os.PathLike, required: Iterable[str] = (), *,
                             remove_incomplete: bool = False) -> str | None:
    """The newest ``checkpoint-<step>`` in ``output_dir`` that a resume can use; None when there is none.

    A process killed while the Trainer saves (``kill -9``, out of memory, a preempted node) leaves the newest folder
    without ``trainer_state.json`` (the Trainer writes it after the weights, optimizer and RNG states), with a
    truncated one, or without a file that a callback writes in ``on_save`` afterwards (``required``, e.g.
    :data:`ADMM_STATE_NAME`). Such a folder is skipped with a warning, and the next older complete one is used: its
    step is redone, to the same result. Where none is complete, the phase starts over.

    Args:
        output_dir: a training phase's checkpoint directory (``args.output_dir``).
        required: file names that a complete checkpoint holds besides ``trainer_state.json``.
        remove_incomplete: delete the skipped folders (the main process only; the choice of the complete folder
            does not depend on whether they are gone yet); else they are left for the Trainer to overwrite.

    Returns:
        str | None: the checkpoint folder's path.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    required = tuple(required)
    found = sorted(((step, path) for path in output_dir.iterdir()
                    if path.is_dir() and (step := _checkpoint_step(path)) is not None), reverse=True)
    for step, path in found:
        if _checkpoint_complete(path, required):
            return str(path)
        log.warning("checkpoint %s is incomplete (the run was killed while saving it): %s", path,
                    "removed; resuming from the one before" if remove_incomplete else "skipped")
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None
