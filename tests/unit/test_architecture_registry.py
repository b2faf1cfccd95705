"""The architecture registry's target choice (no training): roles, dense rules with reasons, the fallback."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from torch import nn

from nxm_deploy.architectures import architecture_of, supported_model_types
from nxm_deploy.sparsity import NMPattern
from nxm_deploy.sparsity.targets import require_targets, select_targets, target_names
from tiny_models import tiny_classifier

PATTERN = NMPattern.parse("2:4")


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "distilbert"])
def test_registry_picks_the_six_projections_of_every_block(model_type):
    model = tiny_classifier(model_type)
    decisions = select_targets(model, PATTERN)
    targets = target_names(decisions)
    assert len(targets) == 12
    roles = {architecture_of(model_type).role_of(t) for t in targets}
    assert roles == {"q", "k", "v", "o", "up", "down"}
    skipped = [d for d in decisions if not d.target]
    assert skipped and all("not an attention or MLP projection" in d.reason for d in skipped)  # pooler, heads


def test_recipe_globs_still_override_the_registry():
    model = tiny_classifier("bert")
    only_ffn = target_names(select_targets(model, PATTERN, include=["*.intermediate.dense", "*.output.dense"],
                                           exclude=["*.attention.output.dense"]))
    assert len(only_ffn) == 4 and all("attention" not in t for t in only_ffn)


def test_unknown_architecture_falls_back_to_every_block_linear_with_a_warning(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in, self.proj_out = nn.Linear(8, 16), nn.Linear(16, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="my-arch")
            self.layers = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 2)

    with caplog.at_level(logging.WARNING, logger="nxm_deploy.sparsity"):
        decisions = require_targets(Net(), PATTERN)
    assert target_names(decisions) == ["layers.0.proj_in", "layers.0.proj_out", "layers.1.proj_in", "layers.1.proj_out"]
    assert "'my-arch' is not in the architecture registry" in caplog.text and "layers.0.proj_in" in caplog.text
    head = next(d for d in decisions if d.module == "head")
    assert not head.target and "outside the blocks" in head.reason


def test_supported_types_are_listed():
    assert {"bert", "roberta", "distilbert", "electra", "mpnet", "deberta-v2", "opt", "llama", "gpt2"} <= set(
        supported_model_types())


def test_int8_attention_is_skipped_with_the_reason_where_the_architecture_has_no_hook(tmp_path):
    from tiny_models import save_tiny_model_dir
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from nxm_deploy.quantization import quantize_model_
    from nxm_deploy.quantization.placement import place_quantizers_

    config = AutoConfig.from_pretrained(save_tiny_model_dir("mpnet", tmp_path / "m"), num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    names = target_names(select_targets(model, PATTERN))
    quantize_model_(model, names)
    placed = place_quantizers_(model, names, gemm_outputs=True, attention=True)
    assert placed["attention"] == [] and "MPNet" in placed["attention_skipped"]
    assert len(placed["gemm_outputs"]) == 12  # Q/K/V outputs get output quantizers instead
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (2, 8)))


def test_gpt2_conv1d_becomes_the_equal_linear_and_saves_back_in_conv1d_layout(tmp_path):
    """GPT-2's Conv1D projections ([in, out]) are loaded as nn.Linear ([out, in]): same outputs, n:m groups along
    the reduction axis; the saved directory keeps Conv1D's layout, so plain from_pretrained still loads it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from nxm_deploy.models import conv1d_to_linear_, embedded_model_dir, load_saved_model, save_model_dir

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100,
                                                     pad_token_id=0)).eval()
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        converted = conv1d_to_linear_(model)
        assert converted == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                             "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)
    c_fc = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(c_fc, nn.Linear) and tuple(c_fc.weight.shape) == (128, 32)  # [out, in]
    assert len(target_names(select_targets(model, PATTERN))) == 4  # c_attn (fused Q/K/V), c_proj, c_fc, c_proj
    save_model_dir(model, AutoTokenizer.from_pretrained(embedded_model_dir()), tmp_path / "m")
    plain = GPT2ForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    again, _ = load_saved_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-6)
        assert torch.allclose(again.eval()(input_ids=ids).logits, ref, atol=1e-6)
