"""Every architecture of the registry (:mod:`nxm_deploy.architectures`) through the whole tiny pipeline on real RTE
(sequence classification; decoder models pool their last non-pad token): targets by role, layers left dense with
their reason, INT8 attention where the architecture allows it (grouped-query attention included), and the
exported graph verified 2:4 layer by layer under the torch module names."""

from __future__ import annotations

import json

import pytest
import yaml

from nxm_deploy.cli.main import main
from tiny_models import TINY_CONFIGS, save_tiny_model_dir

#: model type -> (INT8 attention placed, Linears left dense inside the blocks with a reason, n:m targets)
EXPECTED = {"bert": (True, 0, 12), "roberta": (True, 0, 12), "electra": (True, 0, 12), "distilbert": (True, 0, 12),
            "mpnet": (False, 0, 12), "deberta-v2": (False, 4, 12), "opt": (True, 0, 12),
            "llama": (True, 0, 14),  # Llama: q, k, v, o, gate, up, down
            "gpt2": (False, 0, 8)}  # GPT-2: fused c_attn, c_proj, c_fc, mlp.c_proj (Conv1D, loaded as Linear)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_architecture_end_to_end(model_type, tmp_path, tiny_recipe_dict, glue_dir):
    source = save_tiny_model_dir(model_type, tmp_path / "model")
    data = tiny_recipe_dict
    data["model"] = {"source": str(source), "random_init": {}}
    data["engine"] = {"specs": []}
    data["task"].update(max_train_examples=64, max_eval_examples=32)
    data["validate"].update(latency_shapes=[[1, 64]], timed_runs=3, warmup_runs=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["-q", "run", str(recipe), "--glue-dir", str(glue_dir), "--runs-root", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / data["name"]
    sparse = json.loads((run / "sparse" / "manifest.json").read_text())
    attention, n_dense, n_targets = EXPECTED[model_type]
    assert len(sparse["targets"]) == n_targets  # 2 blocks x (q, k, v, o, up, down[, gate])
    left_dense = [d for d in sparse["layers"] if not d["target"] and "left dense" in d["reason"]]
    assert len(left_dense) == n_dense, left_dense
    if n_dense:
        assert all("pos_" in d["module"] and "relative-position" in d["reason"] for d in left_dense)
    placement = json.loads((run / "qat" / "quant.json").read_text())["placement"]
    assert len(placement["attention"]) == (2 if attention else 0)
    assert ("attention_skipped" in placement) is not attention
    onnx = json.loads((run / "onnx" / "manifest.json").read_text())
    assert onnx["sparsity_check"]["ok"] and onnx["parity"]["ok"]
    assert set(sparse["targets"]) <= set(onnx["layer_map"].values())  # verified under the torch module names
    # DistilBERT's forward takes no token types, DeBERTa-v2 (type_vocab_size 0) ignores them: not graph inputs
    assert ("token_type_ids" in onnx["inputs"]) is (model_type in ("bert", "roberta", "electra", "gpt2"))
