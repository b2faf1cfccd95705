"""Causal language modelling (``task.name: causal_lm``) for the decoder-only architectures of the registry: the tiny
recipe on a text file the test writes, through dense fine-tune, 2:4 ADMM, INT8 QAT with KD on logits and hidden
states, ONNX export (``input_ids, attention_mask -> logits [B, L, vocab]``) verified 2:4 under the torch module
names, and validation (perplexity of every runner, latency). Bad input fails with one line, exit 2."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import onnx
import pytest
import yaml

from nxm_deploy.cli.main import main
from tiny_models import TINY_VOCAB, save_tiny_model_dir

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs of spring".split()
BLOCK = 32


def _write_text(path, documents: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(documents)]
    lines.insert(3, "")  # a blank line (wikitext's paragraph break) is skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _recipe(tmp_path, tiny_recipe_dict, source, **task) -> str:
    data = tiny_recipe_dict
    data["name"] = "lm"
    data["model"] = {"source": str(source), "random_init": {}}
    data["task"] = {"name": "causal_lm", "max_seq_length": BLOCK, **task}
    data["engine"] = {"specs": []}
    data["validate"].update(latency_shapes=[[1, BLOCK]], timed_runs=3, warmup_runs=1)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama"])
def test_causal_lm_end_to_end(model_type, tmp_path, tiny_recipe_dict, capsys):
    """Each decoder on a word-level tokenizer of the test's language (32 tokens), where the LM head and the perplexity
    passes cost little; the real 30k-token tokenizer reads causal-LM data in the bad-input tests below."""
    vocab = TINY_VOCAB
    source = save_tiny_model_dir(model_type, tmp_path / "model", words=WORDS)
    _write_text(tmp_path / "train.txt", 200, 0)
    _write_text(tmp_path / "valid.txt", 40, 1)
    recipe = _recipe(tmp_path, tiny_recipe_dict, source, train_file=str(tmp_path / "train.txt"),
                     eval_file=str(tmp_path / "valid.txt"))
    assert main(["-q", "run", recipe, "--runs-root", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "lm"
    dense = json.loads((run / "dense" / "manifest.json").read_text())
    assert set(dense["metrics"]) == {"perplexity"}
    # a tiny random model on the test's 18-word language: training must beat the uniform guess over the vocabulary
    assert dense["metrics"]["perplexity"] < vocab
    onnx_manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert onnx_manifest["inputs"] == ["input_ids", "attention_mask"]  # one token stream: no token types
    assert onnx_manifest["sparsity_check"]["ok"] and onnx_manifest["parity"]["ok"]
    targets = json.loads((run / "sparse" / "manifest.json").read_text())["targets"]
    assert targets and set(targets) <= set(onnx_manifest["layer_map"].values())  # verified under the torch names
    graph = onnx.load(str(run / "onnx" / "sparse_int8_qdq.onnx"), load_external_data=False).graph
    dims = graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch_size", "sequence_length", vocab]
    validation = json.loads((run / "validation.json").read_text())
    assert validation["primary_metric"] == "perplexity"
    ppl = {name: m["perplexity"] for name, m in validation["metrics"].items()}
    assert {"dense_fp32", "sparse_int8"} <= set(ppl) and all(math.isfinite(v) and v > 1 for v in ppl.values())
    # the deployed INT8 graph scores like its PyTorch twin (QAT stage's fake-quant evaluation)
    qat = json.loads((run / "qat" / "manifest.json").read_text())
    assert ppl["sparse_int8"] == pytest.approx(qat["metrics"]["perplexity"], rel=0.02)
    assert validation["latency"][0]["sequence_length"] == BLOCK
    # a TensorRT engine spec fits the decoder graph: its sequence range comes from the block size (task.max_seq_length)
    from nxm_deploy.engine.spec import load_engine_spec
    from nxm_deploy.engine.stage import prepare_inputs

    spec_path = tmp_path / "engine.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "lm_sparse", "run_dir": str(run), "onnx": "sparse_int8_qdq.onnx",
                                         "precision": "int8-qdq", "sparse_weights": True,
                                         "batch_size": {"min": 1, "opt": 4, "max": 8},
                                         "sequence_length": {"min": 8, "opt": "auto", "max": "auto"}}))
    profile = prepare_inputs(load_engine_spec(spec_path), run, spec_path).profile
    assert set(profile) == {"input_ids", "attention_mask"}
    assert profile["input_ids"]["max"] == [8, BLOCK] and profile["input_ids"]["opt"] == [4, BLOCK]
    capsys.readouterr()
    assert main(["predict", str(run), "the cat"]) == 2  # the client classifies: a causal LM is refused
    assert "causal language model" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["encoder model", "empty", "not utf-8", "shorter than a block"])
def test_bad_causal_lm_input_is_one_line_exit_2(problem, tmp_path, tiny_recipe_dict, capsys):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    _write_text(train, 50, 0)
    _write_text(valid, 20, 1)
    source = save_tiny_model_dir("bert" if problem == "encoder model" else "gpt2", tmp_path / "model")
    expected = {"encoder model": "needs a decoder-only language model", "empty": "is empty",
                "not utf-8": "not UTF-8", "shorter than a block": "fewer than one block"}
    if problem == "empty":
        valid.write_text("")
    elif problem == "not utf-8":
        valid.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    elif problem == "shorter than a block":
        valid.write_text("the cat\n")
    recipe = _recipe(tmp_path, tiny_recipe_dict, source, train_file=str(train), eval_file=str(valid))
    assert main(["run", recipe, "--runs-root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected[problem] in err, err


def test_causal_lm_dataset_route_spec(tmp_path, tiny_recipe_dict):
    """The online route's spec (wikitext); the refused causal-LM task sections are cases of
    test_own_data.test_recipe_rules_for_own_data."""
    from nxm_deploy.config.recipe import load_recipe

    data = dict(tiny_recipe_dict)
    data["task"] = {"name": "causal_lm", "dataset": "wikitext", "dataset_config": "wikitext-103-raw-v1"}
    path = tmp_path / "wikitext.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_recipe(path).task.spec()  # the online route: nothing is read until a stage runs
    assert spec.is_causal_lm and not spec.greater_is_better and spec.source == "dataset"
    assert (spec.train_file, spec.dev_file, spec.text_a_col) == ("train", "validation", "text")


def test_perplexity_is_the_models_own_next_token_loss():
    """lm_nll_sums reproduces Hugging Face's causal-LM loss (shifted cross entropy, -100 ignored), and the
    perplexity of a split weights every scored token alike, whatever the batch split."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from nxm_deploy.data.metrics import compute_metrics, lm_nll_sums
    from nxm_deploy.data.tasks import TaskSpec

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[1, 5:] = -100  # a shorter sequence
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hf = [float(model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss) for i in range(3)]
    sums = lm_nll_sums(logits, labels)
    assert sums[:, 1].tolist() == [11, 4, 11]
    assert (sums[:, 0] / sums[:, 1]).tolist() == pytest.approx(hf, rel=1e-5)
    task = TaskSpec(name="lm", glue_dir_name="", hf_config="", label_list=None, metrics=("perplexity",),
                    primary_metric="perplexity", dev_file="", has_header=True, text_a_col="text", text_b_col=None,
                    label_col="label", source="files")
    expected = math.exp(sum(h * n for h, n in zip(hf, [11, 4, 11])) / 26)
    whole = compute_metrics(task, logits.numpy(), labels.numpy())["perplexity"]
    parts = np.concatenate([lm_nll_sums(logits[:1].numpy(), labels[:1].numpy()),
                            lm_nll_sums(logits[1:].numpy(), labels[1:].numpy())])
    assert whole == pytest.approx(expected, rel=1e-5)
    assert compute_metrics(task, parts, labels.numpy())["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_on_token_logits():
    """For [B, L, V] logits every scored next-token position is one example: the hard term is the model's own
    shifted cross entropy, and positions whose label is -100 do not count."""
    import torch
    import torch.nn.functional as F

    from nxm_deploy.config.recipe import DistillationConfig
    from nxm_deploy.distillation.losses import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 4:] = -100
    cfg = DistillationConfig(alpha=1.0, beta=0.0, gamma=0.0)
    loss, _ = distillation_loss(student, teacher, labels, cfg)
    expected = F.cross_entropy(student[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    changed = teacher.clone()
    changed[0, 4] += 5.0  # predicts label[0, 5] = -100: not scored
    soft = DistillationConfig(alpha=0.0, beta=1.0, gamma=1.0)
    assert float(distillation_loss(student, teacher, labels, soft)[0]) == pytest.approx(
        float(distillation_loss(student, changed, labels, soft)[0]))
    changed[1, 2] += 5.0  # a scored position
    assert float(distillation_loss(student, changed, labels, soft)[0]) != pytest.approx(
        float(distillation_loss(student, teacher, labels, soft)[0]))
