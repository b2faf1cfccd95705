"""The executor's up-to-date rule (:mod:`nxm_deploy.stages`): the one rule (:func:`recorded_up_to_date`) on files
written here, and the ``engines`` stage's key, which follows this machine's TensorRT version and GPU. The machine
is given as a probe result (:class:`~nxm_deploy.engine.trt.Environment`); nothing here imports or imitates
TensorRT."""

import hashlib
import json
import logging

import pytest

from nxm_deploy.config.recipe import recipe_from_dict
from nxm_deploy.engine import trt
from nxm_deploy.engine.trt import Environment, GpuInfo
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.stages import (
    StageContext, get_stage, is_up_to_date, read_ledger, recorded_up_to_date, run_stages, stage_key,
)

CPU = Environment(tensorrt_error="No module named 'tensorrt'", gpu_error="libcuda.so.1 not found")


def _gpu_env(tensorrt_version="10.13.0.35", compute_capability="9.0") -> Environment:
    gpu = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability=compute_capability, driver="550.54.15",
                  cuda_driver_api="12.4", cuda_runtime="12.4")
    return Environment(tensorrt_version=tensorrt_version, gpu=gpu)


def _machine(monkeypatch, env: Environment) -> list[int]:
    """This machine is ``env`` for the stage key (and the engine stage); returns the list of probe calls."""
    calls = []

    def probe():
        calls.append(1)
        return env

    monkeypatch.setattr(trt, "probe_environment", probe)
    return calls


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- the one rule


def test_recorded_up_to_date_on_key_and_file_hashes(tmp_path):
    """The answers of the engine builder's former check: same key and plan bytes -> skip; other key -> rebuild;
    plan bytes changed, plan missing or no hash recorded -> rebuild."""
    plan = tmp_path / "a.plan"
    plan.write_bytes(b"plan bytes as written by a build")
    recorded = _sha(plan.read_bytes())
    assert recorded_up_to_date("k1", "k1", {plan: recorded}) is True
    assert recorded_up_to_date("k1", "k2", {plan: recorded}) is False  # spec / ONNX / TensorRT / SM / profile
    assert recorded_up_to_date(None, "k1", {plan: recorded}) is False  # a record without key
    assert recorded_up_to_date("k1", "k1", {plan: None}) is False  # a record without the file's hash
    plan.write_bytes(b"another plan")
    assert recorded_up_to_date("k1", "k1", {plan: recorded}) is False
    plan.unlink()
    assert recorded_up_to_date("k1", "k1", {plan: recorded}) is False


def test_recorded_up_to_date_checks_the_files_a_stage_manifest_records(tmp_path, caplog):
    stage_dir = tmp_path / "dense"
    stage_dir.mkdir()
    (stage_dir / "model.bin").write_bytes(b"weights")
    manifest = stage_dir / "manifest.json"
    manifest.write_text(json.dumps({"files": {"model.bin": _sha(b"weights")}}))
    files = {manifest: _sha(manifest.read_bytes())}
    assert recorded_up_to_date("k", "k", files, stage_dir=stage_dir, what="stage dense")
    (stage_dir / "model.bin").write_bytes(b"other weights")
    with caplog.at_level(logging.WARNING, logger="nxm_deploy.stages"):
        assert not recorded_up_to_date("k", "k", files, stage_dir=stage_dir, what="stage dense")
    assert "stage dense: " in caplog.text and "model.bin" in caplog.text and "it runs again" in caplog.text


# ------------------------------------------------------------------------------------------- the engines stage key


@pytest.fixture
def ctx(tmp_path, tiny_recipe_dict):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return StageContext(recipe=recipe_from_dict(tiny_recipe_dict), run_dir=run_dir, engine_specs=[])


def test_engines_stage_key_follows_this_machines_tensorrt_and_gpu(monkeypatch, ctx):
    engines = get_stage("engines")
    keys = {}
    for label, env in [("cpu", CPU), ("h100", _gpu_env()), ("other trt", _gpu_env(tensorrt_version="10.14.1.48")),
                       ("other gpu", _gpu_env(compute_capability="8.0"))]:
        _machine(monkeypatch, env)
        keys[label] = stage_key(engines, ctx)
        assert stage_key(engines, ctx) == keys[label]  # the same machine gives the same key
    assert len(set(keys.values())) == 4, keys
    calls = _machine(monkeypatch, _gpu_env())
    for name in ("dense", "export", "validate"):  # only the engines stage asks the machine
        stage_key(get_stage(name), ctx)
    assert calls == []


def test_engines_skipped_on_a_cpu_machine_run_again_on_a_gpu_machine(monkeypatch, ctx):
    """A run directory resumed on another machine reruns its engines stage there; on the same machine it is up to
    date (a run that names no spec: the stage writes status.json without touching ONNX or TensorRT)."""
    engines = get_stage("engines")
    _machine(monkeypatch, CPU)
    assert run_stages(ctx, ["engines"])["engines"]["status"] == "ran"
    assert run_stages(ctx, ["engines"])["engines"]["status"] == "up to date"
    cpu_key = read_ledger(ctx.run_dir)["engines"]["key"]

    _machine(monkeypatch, _gpu_env())
    assert not is_up_to_date(engines, ctx)
    assert run_stages(ctx, ["engines"])["engines"]["status"] == "ran"
    assert read_ledger(ctx.run_dir)["engines"]["key"] != cpu_key
    assert run_stages(ctx, ["engines"])["engines"]["status"] == "up to date"
    assert run_stages(ctx, ["engines"], force=["engines"])["engines"]["status"] == "ran"

    status = RunLayout(ctx.run_dir).engine_status  # the manifest the ledger records must be the one written
    status.write_text(status.read_text() + "\n")
    assert run_stages(ctx, ["engines"])["engines"]["status"] == "ran"
