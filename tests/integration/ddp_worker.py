"""One ADMM ``ADMMTrainer`` run of a tiny BERT, for ``test_ddp.py``: under ``torchrun`` (gloo, CPU) or alone.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py OUT --per-device-batch 4``
(or ``python ddp_worker.py OUT --per-device-batch 8`` for the 1-process reference). Each rank runs two trainings,
``ddp_sync="check"`` (ranks must agree without help; raises otherwise) and ``ddp_sync="broadcast"``, and writes
``OUT/rank<r>_<mode>.safetensors`` (``z/<fqn>``, ``u/<fqn>``, ``mask/<fqn>`` before the hard projection,
``weight/<name>`` after it) and ``OUT/rank<r>_<mode>.json`` (history, world size, cross-rank checksum check).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

NUM_EXAMPLES, SEQ_LEN, EPOCHS = 32, 8, 2


def tiny_bert():
    """Tiny BERT classifier (2 layers, width 32) without dropout, so a DDP step equals a 1-process step."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_dataset() -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (NUM_EXAMPLES, SEQ_LEN), generator=gen)
    labels = (ids[:, 0] >= 32).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": labels[i]}
            for i in range(NUM_EXAMPLES)]


def _rank_checksum(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64)
    for name in sorted(tensors):
        t = tensors[name].detach().double().flatten()
        total[0] += t.sum()
        total[1] += (t * torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64)).sum()
    return total


def run(out: Path, per_device_batch: int, ddp_sync: str) -> dict[str, torch.Tensor]:
    """Train 2 epochs of ADMM 2:4 (Z/U update at each epoch end); return Z, U, masks and the final weights."""
    from transformers import TrainingArguments

    from nxm_deploy.integrations import ADMMCallback, ADMMTrainer

    model = tiny_bert()
    args = TrainingArguments(
        output_dir=str(out / f"trainer_{ddp_sync}"), per_device_train_batch_size=per_device_batch,
        num_train_epochs=EPOCHS, learning_rate=1e-3, use_cpu=True, report_to="none",
        disable_tqdm=True, save_strategy="steps", save_steps=4, logging_strategy="no", seed=0,
        # BERT's classification loss is a per-rank mean: without this the Trainer would scale it by the world
        # size (see ADMMTrainerMixin), and the 2-process run would not be the 1-process run.
        average_tokens_across_devices=False,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    admm = ADMMCallback(pattern="2:4", rho=0.2, rho_factor=1.5, squash_at_end=False, ddp_sync=ddp_sync)
    trainer = ADMMTrainer(model=model, args=args, train_dataset=tiny_dataset(), admm=admm)
    trainer.train()
    assert trainer.model is model  # the sparsifier holds the unwrapped model's tensors
    sp = admm.sparsifier
    result = {f"z/{k}": v.clone() for k, v in sp.admm_z.items()}
    result.update({f"u/{k}": v.clone() for k, v in sp.admm_u.items()})
    result.update({f"mask/{k}": v.clone() for k, v in sp.masks.items()})
    admm.finish()
    result.update({f"weight/{k}": v.detach().clone() for k, v in model.state_dict().items()})
    result["_history"] = sp.history  # popped by main()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-device-batch", type=int, required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    opts.out.mkdir(parents=True, exist_ok=True)
    for mode in ("check", "broadcast"):
        result = run(opts.out, opts.per_device_batch, mode)
        history = result.pop("_history")
        world = dist.get_world_size() if dist.is_initialized() else 1
        local = _rank_checksum(result)
        gathered = [torch.zeros_like(local) for _ in range(world)]
        if world > 1:
            dist.all_gather(gathered, local)
        else:
            gathered = [local]
        tensors = {k: v.contiguous().to(torch.uint8) if v.dtype == torch.bool else v.contiguous()
                   for k, v in result.items()}
        save_file(tensors, str(opts.out / f"rank{rank}_{mode}.safetensors"))
        (opts.out / f"rank{rank}_{mode}.json").write_text(json.dumps({
            "world_size": world, "history": history,
            "checksums": [g.tolist() for g in gathered],
            "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        }))
    # Tear the gloo group down explicitly: left to interpreter exit, a rank can abort in the
    # gloo destructor ("terminate called without an active exception", SIGABRT) - seen in CI.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
