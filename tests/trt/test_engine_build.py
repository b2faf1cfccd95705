"""TensorRT builds of the two demo engines (needs TensorRT and an NVIDIA GPU; skipped with the reason otherwise).

The run is synthetic but shaped like the demo model (MiniLM-L6: hidden 384, 12 heads, FFN 1536; 2 layers to
keep the build short), 2:4 pruned, INT8 fake-quantized and exported by the project's own code
(``demo_run.make_run``). The specs are the checked-in ``engines/minilm_mrpc_sparse_int8.yaml`` and
``engines/minilm_mrpc_dense_fp16.yaml``. Set ``NXM_DEMO_RUN_DIR`` to a real demo run directory to also build
from it.
"""

import json
import os
from pathlib import Path

import pytest

from nxm_deploy.fileio import read_json, sha256_file
from nxm_deploy.engine.trt import probe_environment

ENV = probe_environment()
REASON = ENV.reason
pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and an NVIDIA GPU: {REASON}"),
]

ROOT = Path(__file__).resolve().parents[2]
SPARSE_SPEC = ROOT / "engines" / "minilm_mrpc_sparse_int8.yaml"
DENSE_SPEC = ROOT / "engines" / "minilm_mrpc_dense_fp16.yaml"


def _build(specs, run_dir, show_layers=False) -> int:
    """``nxm-deploy build-engine``'s exit code for these specs (the CLI's table, nxm_deploy.errors.EXIT_CODES)."""
    from nxm_deploy.engine.stage import build_engines

    return build_engines(specs, run_dir, show_layers=show_layers).exit_code()


def _manifests(run_dir: Path) -> dict[str, dict]:
    status = read_json(run_dir / "engines" / "status.json")["engines"]
    return {r["name"]: read_json(run_dir / "engines" / r["manifest"]) for r in status if r.get("manifest")}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from demo_run import make_run

    run_dir = tmp_path_factory.mktemp("runs") / "minilm_like"
    make_run(run_dir, hidden=384, layers=2, heads=12, intermediate=1536, vocab=1000, max_seq=128)
    return run_dir


@pytest.fixture(scope="module")
def built(demo_run):
    code = _build([SPARSE_SPEC, DENSE_SPEC], run_dir=demo_run, show_layers=True)
    return code, _manifests(demo_run)


def test_both_demo_engines_build(built, demo_run):
    code, manifests = built
    assert code == 0, {name: m.get("check", {}).get("errors") for name, m in manifests.items()}
    assert set(manifests) == {"minilm_mrpc_2of4_int8", "minilm_mrpc_dense_fp16"}
    for name, manifest in manifests.items():
        plan = demo_run / "engines" / manifest["engine"]
        kind = "sparse" if manifest["sparse_weights"] else "dense"
        assert plan.name == f"{name}__trt{ENV.tensorrt_version}__sm{ENV.gpu.sm}__{kind}.plan"
        assert manifest["engine_sha256"] == sha256_file(plan) and manifest["status"] == "built"
        assert manifest["tensorrt"] == ENV.tensorrt_version and manifest["gpu"]["sm"] == ENV.gpu.sm
        assert manifest["flags"]["strongly_typed"] and manifest["flags"]["profiling_verbosity"] == "DETAILED"
        assert manifest["profiles"][0]["input_ids"]["max"] == [64, 128]
        assert (demo_run / "engines" / manifest["layers_file"]).is_file()
        assert manifest["flags"]["builder_flags_set"] == (["SPARSE_WEIGHTS"] if kind == "sparse" else [])
    dense = manifests["minilm_mrpc_dense_fp16"]
    assert dense["graph_onnx"]["file"] == "dense_fp16.onnx" and dense["fp16_conversion"]["parity"]["ok"]


def test_sparse_engine_runs_the_ffn_layers_sparse(built):
    rows = built[1]["minilm_mrpc_2of4_int8"]["check"]["rows"]
    ffn = [r for r in rows if r["module"] and (r["module"].endswith("intermediate.dense")
                                              or (r["module"].endswith(".output.dense") and ".attention." not in r["module"]))]
    assert len(ffn) == 4
    assert all(r["ran_sparse"] for r in ffn), [(r["module"], r["sparse_reason"]) for r in ffn]


def test_int8_engine_layers_are_int8(built):
    rows = built[1]["minilm_mrpc_2of4_int8"]["check"]["rows"]
    quantized = [r for r in rows if r["expected_precision"] == "INT8"]
    assert len(quantized) == 12  # 6 Linear layers x 2 encoder layers
    assert all(r["precision"] == "INT8" for r in quantized), [(r["module"], r["precision"]) for r in quantized]


def test_fp16_engine_layers_are_fp16(built):
    check = built[1]["minilm_mrpc_dense_fp16"]["check"]
    assert check["ok"] and not check["other_mismatches"]
    assert all(r["precision"] == "FP16" for r in check["rows"] if r["engine_layer"])


def test_second_build_is_up_to_date(built, demo_run, capsys):
    before = {n: (m["engine_sha256"], m["built_at"]) for n, m in built[1].items()}
    capsys.readouterr()
    assert _build([SPARSE_SPEC, DENSE_SPEC], run_dir=demo_run) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    after = {n: (m["engine_sha256"], m["built_at"]) for n, m in _manifests(demo_run).items()}
    assert after == before


def test_parser_errors_are_listed(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from nxm_deploy.engine.trt import build_serialized_engine
    from nxm_deploy.errors import EngineBuildError

    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])
    node = helper.make_node("NoSuchOp", ["input_ids"], ["logits"], name="bad_node", domain="nxm.test")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("nxm.test", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    profile = {"input_ids": {"min": [1, 8], "opt": [2, 8], "max": [4, 8]}}
    with pytest.raises(EngineBuildError, match=r"rejected bad\.onnx \(\d+ errors\): 1\) .*bad_node"):
        build_serialized_engine(path, profile=profile, sparse_weights=False, workspace_bytes=1 << 28,
                                builder_optimization_level=0, timing_cache=tmp_path / "t.cache")


@pytest.mark.parametrize("sparse_weights", [True, False])
def test_fp32_build_records_the_sparse_flag(tmp_path, sparse_weights):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from nxm_deploy.engine.spec import EngineSpec
    from nxm_deploy.engine.stage import build_engine
    from nxm_deploy.export.onnx import export_model

    run_dir = tmp_path / "run"
    model = BertForSequenceClassification(BertConfig(vocab_size=128, num_hidden_layers=1, hidden_size=256,
                                                     num_attention_heads=4, intermediate_size=1024)).eval()
    sample = {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    export_model(model, sample, run_dir / "onnx" / "m.onnx")
    (run_dir / "onnx" / "manifest.json").write_text(json.dumps({"inputs": list(sample)}))
    spec = EngineSpec(name="t", onnx="m.onnx", precision="fp32", sparse_weights=sparse_weights,
                      batch_size={"min": 1, "opt": 2, "max": 4}, sequence_length={"min": 8, "opt": 16, "max": 32})
    record = build_engine(spec, run_dir)
    assert record["status"] == "built" and record["sparse_weights"] is sparse_weights
    assert (run_dir / "engines" / record["engine"]).stat().st_size > 0


@pytest.mark.skipif(not os.environ.get("NXM_DEMO_RUN_DIR"), reason="set NXM_DEMO_RUN_DIR to a demo run directory")
def test_real_demo_run_builds():
    run_dir = Path(os.environ["NXM_DEMO_RUN_DIR"])
    assert _build([SPARSE_SPEC, DENSE_SPEC], run_dir=run_dir, show_layers=True) == 0
