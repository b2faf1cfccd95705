"""Engine stage and the build-engine command on a CPU machine: FP16 graph + ONNX Runtime parity, profile
from the run's recipe, skipped records in a pipeline run, exit codes (3 here: no TensorRT / GPU), engine
naming, manifest and the up-to-date decision. Nothing here imports or imitates TensorRT."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_models import demo_run_module

from nxm_deploy.fileio import read_json, sha256_file
from nxm_deploy.engine.spec import EngineSpec
from nxm_deploy.cli.main import main as cli_main
from nxm_deploy.engine.stage import (
    EngineInputs, build_engine, build_key, build_prepared, engine_paths,
    engine_stage, make_manifest, prepare_inputs, status_record, up_to_date, update_status,
)
from nxm_deploy.engine.trt import Environment, GpuInfo, probe_environment, tensorrt_unavailable_reason
from nxm_deploy.errors import ConfigError, MissingDependencyError, RunDirError

ROOT = Path(__file__).resolve().parents[2]
REASON = tensorrt_unavailable_reason()
no_trt = pytest.mark.skipif(REASON is None, reason="this machine has TensorRT and a GPU (exit 3 is for machines without)")




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    manifest = demo_run_module().make_run(run_dir, max_seq=48)
    return run_dir, manifest


def _write_spec(tmp_path, name, **fields) -> Path:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **fields}))
    return path


SPARSE = dict(onnx="sparse_int8_qdq.onnx", precision="int8-qdq", sparse_weights=True,
              batch_size={"min": 1, "opt": 4, "max": 8})
DENSE16 = dict(onnx="dense_fp32.onnx", precision="fp16", batch_size={"min": 1, "opt": 4, "max": 8})


# ------------------------------------------------------------------------------------------- FP16 graph


def test_fp16_graph_matches_fp32_in_onnxruntime(run):
    import onnx
    import onnxruntime as ort

    from nxm_deploy.engine.fp16 import FP16_PARITY_ATOL, FP16_PARITY_RTOL, convert_to_fp16, parity_feeds

    run_dir, _ = run
    src = run_dir / "onnx" / "dense_fp32.onnx"
    result = convert_to_fp16(src)
    target = run_dir / "onnx" / "dense_fp16.onnx"
    assert result.file == "dense_fp16.onnx" and target.is_file() and result.parity["ok"]
    model = onnx.load(str(target))
    onnx.checker.check_model(model)
    floats = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for init in model.graph.initializer:
        if init.data_type in floats and len(init.dims) == 2:
            floats[init.data_type] += 1
    assert floats[onnx.TensorProto.FLOAT16] >= 6 and floats[onnx.TensorProto.FLOAT] == 0  # all GEMM weights FP16
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:  # LayerNorm and Softmax read FP32 (a Cast to FLOAT in front)
        if node.op_type in ("LayerNormalization", "Softmax"):
            cast = producers[node.input[0]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
            assert node.name in result.fp32_nodes
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # logits stay FP32

    # our own comparison, on other inputs than the converter's check (more padding, longer rows)
    feeds = parity_feeds(src, batch=4, seq=40, seed=7)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    new = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    assert new.dtype == np.float32 and np.all(np.isfinite(new))
    np.testing.assert_allclose(new, ref, atol=FP16_PARITY_ATOL, rtol=FP16_PARITY_RTOL)
    assert np.abs(new - ref).max() > 0  # it really is another graph

    again = convert_to_fp16(src)  # idempotent: nothing rewritten
    assert again.reused and again.sha256 == result.sha256 == sha256_file(target)


def test_fp16_conversion_redone_when_source_changes(tmp_path, run):
    import shutil

    from nxm_deploy.engine.fp16 import convert_to_fp16

    src = tmp_path / "dense_fp32.onnx"
    shutil.copy(run[0] / "onnx" / "dense_fp32.onnx", src)
    first = convert_to_fp16(src, check_parity=False)
    shutil.copy(run[0] / "onnx" / "sparse_int8_qdq.onnx", src)  # another model under the same name
    second = convert_to_fp16(src, check_parity=False)
    assert not second.reused and second.source_sha256 != first.source_sha256


# ------------------------------------------------------------------------------------------- inputs


def test_prepare_inputs_derives_profile_from_the_runs_recipe(tmp_path, run):
    run_dir, manifest = run
    spec = EngineSpec(**SPARSE, name="s")
    inputs = prepare_inputs(spec, run_dir)
    assert inputs.input_names == manifest["inputs"]
    assert inputs.profile["input_ids"] == {"min": [1, 8], "opt": [4, 48], "max": [8, 48]}  # recipe max_seq 48
    assert inputs.graph_onnx.name == "sparse_int8_qdq_fp16.onnx" and inputs.sparse_modules == manifest["sparse_modules"]
    assert inputs.layer_map == manifest["layer_map"]
    dense = prepare_inputs(EngineSpec(**DENSE16, name="d"), run_dir)
    assert dense.graph_onnx.name == "dense_fp16.onnx" and dense.fp16["parity"]["ok"]
    assert dense.layer_map is None and dense.sparse_modules == []  # the dense export was not trained sparse

    with pytest.raises(RunDirError, match="not found"):
        prepare_inputs(EngineSpec(name="x", onnx="missing.onnx", precision="fp32"), run_dir)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        prepare_inputs(EngineSpec(**{**SPARSE, "sequence_length": {"min": 8, "opt": 64, "max": 4096}}, name="s"), run_dir)
    bare = tmp_path / "bare"  # an ONNX file without recipe/manifest: inputs from the graph, no 'auto'
    (bare / "onnx").mkdir(parents=True)
    (bare / "onnx" / "m.onnx").write_bytes((run_dir / "onnx" / "dense_fp32.onnx").read_bytes())
    with pytest.raises(ConfigError, match="auto"):
        prepare_inputs(EngineSpec(name="m", onnx="m.onnx", precision="fp32"), bare)
    fixed = prepare_inputs(EngineSpec(name="m", onnx="m.onnx", precision="fp32",
                                      sequence_length={"min": 8, "opt": 16, "max": 32}), bare)
    assert fixed.input_names == ["input_ids", "attention_mask", "token_type_ids"]


def test_require_sparse_is_checked_against_the_graphs_sparse_int8_eligibility(tmp_path, run):
    run_dir, manifest = run
    spec = EngineSpec(**SPARSE, name="s", require_sparse=["eligible"])
    inputs = prepare_inputs(spec, run_dir)
    assert inputs.eligible == sorted(manifest["sparse_modules"])  # INT8-out GEMMs: every n:m layer qualifies
    assert spec.requires_sparse(manifest["sparse_modules"][0], inputs.eligible)
    assert not spec.requires_sparse(manifest["sparse_modules"][0])  # 'eligible' is not a glob

    plain = tmp_path / "plain"  # no GEMM output quantizers: only Q/K/V (quantized as INT8 attention inputs) qualify
    demo_run_module().make_run(plain, max_seq=48, gemm_outputs=False)
    eligible = prepare_inputs(EngineSpec(**SPARSE, name="s", require_sparse=["eligible"]), plain).eligible
    assert eligible == sorted(m for m in manifest["sparse_modules"] if ".attention.self." in m) and eligible
    with pytest.raises(ConfigError, match=r"intermediate\.dense.*no QuantizeLinear on the output") as exc:
        prepare_inputs(EngineSpec(**SPARSE, name="s", require_sparse=["*.intermediate.dense"]), plain)
    assert "gemm_outputs" in exc.value.hint


def test_int8_graph_gets_an_fp16_remainder_that_keeps_the_sparse_int8_layout(run):
    import onnx

    from nxm_deploy.export.qdq_lint import lint_qdq

    run_dir, manifest = run
    inputs = prepare_inputs(EngineSpec(**SPARSE, name="s"), run_dir)  # remainder: fp16 is the default
    assert inputs.graph_onnx.name == "sparse_int8_qdq_fp16.onnx" and inputs.source_onnx.name == "sparse_int8_qdq.onnx"
    record = inputs.fp16
    assert record["int8"] and record["parity"]["ok"] and record["parity"]["rule"].startswith("int8")
    model = onnx.load(str(inputs.graph_onnx))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in model.graph.initializer}
    scale_types = {(consts.get(n.input[1]) or inits.get(n.input[1])).data_type
                   for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert scale_types == {onnx.TensorProto.FLOAT16}  # every DequantizeLinear outputs FP16, no Cast before a GEMM
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert set(record["fp32_nodes"]) >= {n.name for n in model.graph.node if n.op_type == "LayerNormalization"}
    report = lint_qdq(inputs.graph_onnx, layer_map=manifest["layer_map"], expected=manifest["sparse_modules"])
    assert report.ok and all(g.eligible for g in report.gemms)  # still INT8-in/INT8-out everywhere
    plain = prepare_inputs(EngineSpec(**SPARSE, name="s", remainder="fp32"), run_dir)
    assert plain.graph_onnx == plain.source_onnx and plain.fp16 is None


def test_range_check_keeps_out_of_fp16_range_nodes_in_fp32(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nxm_deploy.engine.fp16 import FP16_PARITY_ATOL, convert_to_fp16, range_check

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "big"], ["h"], name="blow_up"),
         helper.make_node("Div", ["h", "big"], ["y0"], name="shrink"),
         helper.make_node("Add", ["y0", "x"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.array(1e5, np.float32), "big")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = {"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}
    assert set(range_check(path, feeds)) == {"blow_up"}  # |h| reaches 1e5 > 16384; y stays small
    conversion = convert_to_fp16(path)
    assert conversion.range_fp32_nodes.keys() == {"blow_up"} and "blow_up" in conversion.fp32_nodes
    assert not conversion.int8 and conversion.parity["max_abs_diff"] <= FP16_PARITY_ATOL


# ------------------------------------------------------------------------------------------- naming, manifest, idempotence


def test_manifest_and_up_to_date_decision(tmp_path, run):
    run_dir, _ = run
    spec_path = _write_spec(tmp_path, "demo_sparse", **SPARSE)
    from nxm_deploy.engine.spec import load_engine_spec

    spec = load_engine_spec(spec_path)
    inputs = prepare_inputs(spec, run_dir, spec_path)
    gpu = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", driver="550.54.15",
                  cuda_driver_api="12.4", cuda_runtime="12.4")
    plan, manifest_path, layers = engine_paths(spec, tmp_path / "out", "10.13.0.35", gpu.sm)
    assert plan.name == "demo_sparse__trt10.13.0.35__sm90__sparse.plan"
    assert manifest_path.name == "demo_sparse__trt10.13.0.35__sm90__sparse.json"
    key = build_key(inputs, "10.13.0.35", gpu.sm)
    assert key == build_key(prepare_inputs(spec, run_dir, spec_path), "10.13.0.35", "90")  # deterministic
    assert key != build_key(inputs, "10.14.1.48", "90") != build_key(inputs, "10.13.0.35", "89")

    # The up-to-date decision only looks at files: a plan file with its recorded hash and the same key.
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan bytes as written by a build")
    layers.write_text("{}")
    assert up_to_date(manifest_path, plan, key) is None  # no manifest yet
    check = {"ok": True, "summary": "6/6 GEMMs at requested precision", "errors": [], "warnings": []}
    manifest = make_manifest(inputs, plan=plan, layers_path=layers, key=key, tensorrt_version="10.13.0.35",
                             gpu={"name": gpu.name, "compute_capability": "9.0", "sm": gpu.sm, "driver": gpu.driver,
                                  "cuda_driver_api": "12.4", "cuda_runtime": "12.4"},
                             flags={"strongly_typed": True, "sparse_weights": True}, build_s=12.5,
                             sparsity_log=[], check=check, timing_cache=tmp_path / "t.cache")
    manifest_path.write_text(json.dumps(manifest))
    for field in ("tensorrt", "gpu", "onnx_sha256", "spec_sha256", "flags", "profiles", "build_s", "engine_sha256"):
        assert manifest[field] not in (None, "", [], {}), field
    assert manifest["status"] == "built" and manifest["engine_sha256"] == sha256_file(plan)
    assert manifest["onnx_sha256"] == sha256_file(run_dir / "onnx" / "sparse_int8_qdq.onnx")
    assert manifest["spec_sha256"] == spec.sha256() and manifest["spec"]["file_sha256"] == sha256_file(spec_path)
    assert manifest["profiles"] == [inputs.profile]
    assert up_to_date(manifest_path, plan, key) == manifest
    assert up_to_date(manifest_path, plan, build_key(inputs, "10.13.0.35", "80")) is None  # other GPU
    plan.write_bytes(b"a different plan")  # replaced / corrupted plan
    assert up_to_date(manifest_path, plan, key) is None

    record = status_record(manifest, "built")
    assert record["status"] == "built" and record["engine"] == plan.name and record["sm"] == "90"
    failed = make_manifest(inputs, plan=plan, layers_path=layers, key=key, tensorrt_version="10.13.0.35",
                           gpu=manifest["gpu"], flags={}, build_s=1.0, sparsity_log=[], timing_cache=tmp_path / "t",
                           check={"ok": False, "errors": ["x runs FP32, the spec requests INT8"]})
    assert failed["status"] == "check failed: x runs FP32, the spec requests INT8"


def _inputs(tmp_path, spec: EngineSpec, batch_max: int = 8) -> EngineInputs:
    """The inputs of a build as :func:`prepare_inputs` returns them, without an ONNX file (never read here)."""
    onnx_file = tmp_path / "onnx" / spec.onnx
    shape = {"min": [1, 16], "opt": [4, 16], "max": [batch_max, 16]}
    return EngineInputs(spec=spec, spec_path=None, run_dir=tmp_path, source_onnx=onnx_file, source_sha256="a" * 64,
                        graph_onnx=onnx_file, graph_sha256="a" * 64, input_names=["input_ids"],
                        profile={"input_ids": shape}, layer_map=None, sparse_modules=[], pattern="2:4", fp16=None)


def _write_built_engine(inputs: EngineInputs, env: Environment) -> dict:
    """A plan file and the manifest a build writes for it (the fields the up-to-date path reads)."""
    version, gpu = env.tensorrt_version, env.gpu
    plan, manifest_path, _ = engine_paths(inputs.spec, inputs.run_dir, version, gpu.sm)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(f"plan of {inputs.spec.name}".encode())
    manifest = {"name": inputs.spec.name, "status": "built", "engine": plan.name, "engine_sha256": sha256_file(plan),
                "build_key": build_key(inputs, version, gpu.sm), "precision": inputs.spec.precision,
                "sparse_weights": inputs.spec.sparse_weights, "onnx_sha256": inputs.source_sha256,
                "tensorrt": version, "gpu": {"name": gpu.name, "sm": gpu.sm}, "build_s": 1.0,
                "check": {"summary": "ok"}}
    manifest_path.write_text(json.dumps(manifest))
    return manifest


def test_build_prepared_decides_up_to_date_per_engine(tmp_path, caplog):
    """build-engine skips each engine by the run's rule on its own manifest and plan: a changed spec rebuilds that
    engine alone, a changed plan file is rebuilt, --force rebuilds. A rebuild here stops at the TensorRT import."""
    gpu = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", driver="550.54.15",
                  cuda_driver_api="12.4", cuda_runtime="12.4")
    env = Environment(tensorrt_version="10.13.0.35", gpu=gpu)
    a = _inputs(tmp_path, EngineSpec(**SPARSE, name="a"))
    b = _inputs(tmp_path, EngineSpec(**DENSE16, name="b"))
    written = {i.spec.name: _write_built_engine(i, env) for i in (a, b)}
    with caplog.at_level("INFO", logger="nxm_deploy.engine"):
        for inputs in (a, b):
            record = build_prepared(inputs, env)
            assert record["action"] == "up to date"
            assert record["engine_sha256"] == written[inputs.spec.name]["engine_sha256"]
    assert f"engine a: up to date ({written['a']['engine']})" in caplog.text
    assert f"engine b: up to date ({written['b']['engine']})" in caplog.text

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: a rebuild would build (tests/trt covers it)")
    changed_b = _inputs(tmp_path, EngineSpec(**{**DENSE16, "batch_size": {"min": 1, "opt": 4, "max": 16}}, name="b"),
                        batch_max=16)
    assert build_prepared(a, env)["action"] == "up to date"  # a's spec did not change
    with pytest.raises(MissingDependencyError):
        build_prepared(changed_b, env)  # b's did: its key differs, so it is built
    with pytest.raises(MissingDependencyError):
        build_prepared(a, env, force=True)
    plan = tmp_path / "engines" / written["a"]["engine"]
    plan.write_bytes(b"a replaced plan")
    with pytest.raises(MissingDependencyError):
        build_prepared(a, env)  # the plan no longer has the hash its manifest records
    assert plan.read_bytes() == b"a replaced plan"  # nothing written by a build that did not run


def test_status_records_are_merged_and_read_by_the_client(tmp_path):
    from nxm_deploy.run.reader import engine_for_onnx

    run_dir = tmp_path / "run"
    (run_dir / "engines").mkdir(parents=True)
    plan = run_dir / "engines" / "a__trt10.13.0.35__sm90__sparse.plan"
    plan.write_bytes(b"x")
    update_status(run_dir, [{"name": "a", "status": "skipped: no GPU"}, {"name": "b", "status": "skipped: no GPU"}])
    update_status(run_dir, [{"name": "a", "status": "built", "engine": plan.name, "onnx_sha256": "abc",
                             "sparse_weights": True, "engine_sha256": sha256_file(plan)}])
    records = read_json(run_dir / "engines" / "status.json")["engines"]
    assert [(r["name"], r["status"]) for r in records] == [("b", "skipped: no GPU"), ("a", "built")]
    found = engine_for_onnx(run_dir, "abc", prefer_sparse=True)
    assert found is not None and Path(found["plan_path"]) == plan


# ------------------------------------------------------------------------------------------- without TensorRT


def test_environment_probe_is_one_line_with_install_hint():
    env = probe_environment()
    if env.reason is None:
        pytest.skip("this machine has TensorRT and a GPU")
    assert "\n" not in env.reason and "nxm-deploy[trt]" in env.reason
    assert (env.tensorrt_error or env.gpu_error) in env.reason


@no_trt
def test_pipeline_stage_records_skipped_and_still_makes_the_fp16_graph(tmp_path, run):
    run_dir, _ = run
    specs = [_write_spec(tmp_path, "s", **SPARSE), _write_spec(tmp_path, "d", **DENSE16)]
    status = engine_stage(run_dir, specs)
    records = {r["name"]: r for r in status["engines"]}
    assert set(records) >= {"s", "d"}
    for record in records.values():
        assert record["status"] == f"skipped: {REASON}"
    assert records["d"]["fp16_onnx"] == "dense_fp16.onnx" and records["d"]["fp16_parity"]["ok"]
    assert (run_dir / "onnx" / "dense_fp16.onnx").is_file()
    assert not list((run_dir / "engines").glob("*.plan"))
    assert build_engine(EngineSpec(**SPARSE, name="s"), run_dir)["status"].startswith("skipped: ")


@no_trt
def test_build_command_exits_3_with_one_line(tmp_path, run, capsys):
    spec = _write_spec(tmp_path, "s", **SPARSE, run_dir=str(run[0]))
    assert cli_main(["build-engine", "--spec", str(spec)]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: cannot build TensorRT engines here: ") and "pip install 'nxm-deploy[trt]'" in err
    assert not list(run[0].glob("engines/*.plan"))  # nothing built, nothing half-written


def test_build_command_bad_spec_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: e\nonnx: x.onnx\nprecision: int4\n")
    assert cli_main(["build-engine", "--spec", str(bad)]) == 2
    assert cli_main(["build-engine", "--spec", str(tmp_path / "missing.yaml")]) == 2
    assert cli_main(["build-engine"]) == 2
    twice = _write_spec(tmp_path, "same", **SPARSE)
    assert cli_main(["build-engine", "--spec", str(twice), "--spec", str(twice)]) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "not found" in err and "repeat" in err


def _script_env():
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    return env


@no_trt
def test_build_engines_script_exits_3_on_this_machine():
    proc = subprocess.run(["bash", str(ROOT / "tools" / "build_engines.sh")], capture_output=True, text=True,
                          env=_script_env(), timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot build TensorRT engines here" in lines[0] and "nxm-deploy[trt]" in lines[0]


def test_build_engines_script_rejects_a_bad_spec(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: e\nprecision: fp16\n")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "build_engines.sh"), str(bad)], capture_output=True,
                          text=True, env=_script_env(), timeout=120)
    assert proc.returncode == 2 and "onnx" in proc.stderr


def test_build_engine_help_lists_the_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "nxm_deploy.cli", "build-engine", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal width
    assert proc.returncode == 0 and "exit codes: 0 built or up to date;" in text
    assert "4 a TensorRT engine build failed" in text and "5 a built engine failed its post-build check" in text


@pytest.mark.parametrize("facts,needles", [
    ({"driver_api": "12.4", "runtime": "13.0", "tensorrt_wheel_cuda": 13, "cuda_python": "13.0.1"},
     ["CUDA 13 runtime", "supports CUDA 12.4", "nxm-deploy[trt-cu12]"]),
    ({"driver_api": "13.0", "runtime": "12.8", "tensorrt_wheel_cuda": 13, "cuda_python": "12.8.0"},
     ["targets CUDA 13", "cuda-python is 12.8.0", "nxm-deploy[trt-cu13]"]),
])
def test_probe_refuses_a_cuda_mismatch_with_one_line(facts, needles):
    from nxm_deploy.engine.trt import Environment, GpuInfo, cuda_mismatch

    message = cuda_mismatch(**facts)
    assert message and "\n" not in message and all(n in message for n in needles), message
    gpu = GpuInfo(name="NVIDIA H100", compute_capability="9.0", driver="550.54", cuda_driver_api=facts["driver_api"],
                  cuda_runtime=facts["runtime"])
    env = Environment(tensorrt_version="10.13.0", gpu=gpu, cuda=facts, cuda_error=message)
    assert env.reason == f"cannot build TensorRT engines here: {message}"


@pytest.mark.parametrize("facts", [
    {"driver_api": "13.0", "runtime": "12.8", "tensorrt_wheel_cuda": 12, "cuda_python": "12.8.0"},  # older runtime
    {"driver_api": "12.4", "runtime": "12.8", "tensorrt_wheel_cuda": 12, "cuda_python": "12.9.0"},  # minor compat
    {"driver_api": "12.4", "runtime": None, "tensorrt_wheel_cuda": None, "cuda_python": None},  # nothing installed
])
def test_probe_accepts_matching_cuda(facts):
    from nxm_deploy.engine.trt import cuda_mismatch

    assert cuda_mismatch(**facts) is None


def test_probe_records_cuda_versions_here():
    env = probe_environment()
    assert set(env.cuda) == {"driver_api", "runtime", "tensorrt_wheel_cuda", "cuda_python"}
    assert env.to_dict()["cuda"] == env.cuda
