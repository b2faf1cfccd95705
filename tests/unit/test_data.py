"""Tests of nxm_deploy.data: task registry, GLUE readers (TSV + HF route), metrics and loaders."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from nxm_deploy.data import (
    TASKS,
    TaskExamples,
    TaskSpec,
    compute_metrics,
    get_task,
    load_task_split,
    register_task,
    resolve_glue_dir,
)
from nxm_deploy.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _write(root: Path, task_dir: str, name: str, lines: list[str], *, bom: bool = False) -> Path:
    d = root / task_dir
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    text = "".join(line + "\n" for line in lines)
    path.write_bytes(("\ufeff" if bom else "").encode("utf-8") + text.encode("utf-8"))
    return path


def _real_glue_dir() -> Path:
    env = os.environ.get("NXM_GLUE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"


REAL_GLUE = _real_glue_dir()
needs_real_glue = pytest.mark.skipif(
    not (REAL_GLUE / "RTE" / "train.tsv").is_file(), reason=f"real GLUE data not found at {REAL_GLUE}"
)

MNLI_DEV_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
)


def _mnli_row(i: int, s1: str, s2: str, gold: str, n_votes: int) -> str:
    return "\t".join([str(i), "31193", f"{i}n", "government", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2]
                     + [gold] * n_votes + [gold])  # fmt: skip


# Each case: task, folder, file, lines, BOM?, expected texts_a, expected texts_b, expected labels.
# Texts hold unbalanced '"' characters: with quoting on, the csv module would merge the rows after them.
LAYOUT_CASES = [
    pytest.param(
        "cola", "CoLA", "train.tsv",
        ["gj04\t1\t\tOur friends won't buy this \"analysis, let alone the next one.",
         "gj04\t0\t*\tThey drank the pub.",
         "cj99\t1\t\tThe more you eat, the less you want."],
        False,
        ["Our friends won't buy this \"analysis, let alone the next one.", "They drank the pub.",
         "The more you eat, the less you want."],
        None, [1, 0, 1], id="cola-no-header",
    ),
    pytest.param(
        "sst2", "SST-2", "dev.tsv",
        ["sentence\tlabel", "it 's a \" charming journey \t1", "contains no wit , only labored gags \t0"],
        False,
        ["it 's a \" charming journey ", "contains no wit , only labored gags "], None, [1, 0], id="sst2",
    ),
    pytest.param(
        "mrpc", "MRPC", "train.tsv",
        ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
         "1\t702876\t702977\tAmrozi called him \" the witness .\tReferring to him as \" the witness \" .",
         "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 ."],
        True,
        ["Amrozi called him \" the witness .", "Yucaipa owned Dominick 's ."],
        ["Referring to him as \" the witness \" .", "Yucaipa bought Dominick 's in 1995 ."], [1, 0], id="mrpc-bom",
    ),
    pytest.param(
        "stsb", "STS-B", "dev.tsv",
        ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
         "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t\"A plane is taking off.\tAn air plane.\t5.000",
         "1\tmain-news\theadlines\t2013\t0004\tnone\tnone\tA man plays.\tA flute.\t0.600"],
        False,
        ["\"A plane is taking off.", "A man plays."], ["An air plane.", "A flute."], [5.0, 0.6], id="stsb",
    ),
    pytest.param(
        "qqp", "QQP", "dev.tsv",
        ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
         "0\t1\t2\t\"How do I learn?\tWhy learn?\t0",
         "7\t13\t14\tthis row lost its second question and label",
         "1\t3\t4\tWhat is x?\tWhat's x?\t1"],
        False,
        ["\"How do I learn?", "What is x?"], ["Why learn?", "What's x?"], [0, 1], id="qqp-malformed",
    ),
    pytest.param(
        "mnli", "MNLI", "dev_matched.tsv",
        [MNLI_DEV_HEADER,
         _mnli_row(0, "\"The new rights are nice.", "Everyone likes them.", "neutral", 5),
         _mnli_row(1, "This site is legal.", "It is illegal.", "contradiction", 5),
         _mnli_row(2, "He came.", "He arrived.", "entailment", 5)],
        False,
        ["\"The new rights are nice.", "This site is legal.", "He came."],
        ["Everyone likes them.", "It is illegal.", "He arrived."], [1, 2, 0], id="mnli-dev-matched",
    ),
    pytest.param(
        "qnli", "QNLI", "dev.tsv",
        ["index\tquestion\tsentence\tlabel",
         "0\t\"What came first?\tThe egg came first.\tentailment",
         "1\tWho won?\tIt rained.\tnot_entailment"],
        False,
        ["\"What came first?", "Who won?"], ["The egg came first.", "It rained."], [0, 1], id="qnli",
    ),
    pytest.param(
        "rte", "RTE", "dev.tsv",
        ["index\tsentence1\tsentence2\tlabel",
         "0\t\"No Weapons Found in Iraq Yet.\tWeapons Found in Iraq.\tnot_entailment",
         "1\tA place of sorrow.\tPope Benedict XVI is the new leader.\tentailment"],
        False,
        ["\"No Weapons Found in Iraq Yet.", "A place of sorrow."],
        ["Weapons Found in Iraq.", "Pope Benedict XVI is the new leader."], [1, 0], id="rte",
    ),
    pytest.param(
        "wnli", "WNLI", "train.tsv",
        ["index\tsentence1\tsentence2\tlabel",
         "0\tI stuck a pin through a \"carrot.\tThe carrot had a hole.\t1",
         "1\tJohn couldn't see.\tJohn was short.\t0"],
        False,
        ["I stuck a pin through a \"carrot.", "John couldn't see."],
        ["The carrot had a hole.", "John was short."], [1, 0], id="wnli",
    ),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# task registry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [("RTE", "rte"), ("sst-2", "sst2"), ("SST2", "sst2"), ("sts-b", "stsb"), ("STS_B", "stsb"), ("CoLA", "cola"),
     ("MNLI", "mnli"), (" qqp ", "qqp")],
)  # fmt: skip
def test_get_task_aliases(alias: str, name: str) -> None:
    assert get_task(alias).name == name


def test_get_task_passes_spec_through() -> None:
    spec = get_task("rte")
    assert get_task(spec) is spec


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("squad")
    msg = str(info.value)
    assert "squad" in msg
    for known in ("cola", "mnli", "rte", "stsb", "wnli"):
        assert known in msg


def test_registry_holds_the_nine_glue_tasks() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    for spec in TASKS.values():
        assert spec.primary_metric == spec.metrics[0]


# Class names of the ClassLabel features of HF "nyu-mll/glue", and the TSV string each name is written as.
HF_CLASS_NAMES = {
    "cola": [("unacceptable", "0"), ("acceptable", "1")],
    "sst2": [("negative", "0"), ("positive", "1")],
    "mrpc": [("not_equivalent", "0"), ("equivalent", "1")],
    "qqp": [("not_duplicate", "0"), ("duplicate", "1")],
    "mnli": [("entailment", "entailment"), ("neutral", "neutral"), ("contradiction", "contradiction")],
    "qnli": [("entailment", "entailment"), ("not_entailment", "not_entailment")],
    "rte": [("entailment", "entailment"), ("not_entailment", "not_entailment")],
    "wnli": [("not_entailment", "0"), ("entailment", "1")],
}


@pytest.mark.parametrize("task", sorted(HF_CLASS_NAMES))
def test_label_order_matches_hf_classlabel(task: str) -> None:
    spec = get_task(task)
    assert spec.label_list == tuple(tsv for _, tsv in HF_CLASS_NAMES[task])
    assert spec.num_labels == len(HF_CLASS_NAMES[task])
    assert not spec.is_regression


def test_stsb_is_regression() -> None:
    spec = get_task("stsb")
    assert spec.is_regression and spec.num_labels == 1 and spec.label_list is None


def test_register_task_rejects_duplicates() -> None:
    with pytest.raises(ConfigError, match="already registered"):

        @register_task("rte")
        def _again() -> TaskSpec:
            return get_task("rte")


def test_taskspec_rejects_primary_metric_not_first() -> None:
    with pytest.raises(ConfigError, match="primary_metric"):
        TaskSpec(name="x", glue_dir_name="X", hf_config="x", label_list=("0", "1"), metrics=("f1", "accuracy"),
                 primary_metric="accuracy", dev_file="dev.tsv", has_header=True, text_a_col="a",
                 text_b_col=None, label_col="label")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# TSV route
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "folder", "fname", "lines", "bom", "want_a", "want_b", "want_y"), LAYOUT_CASES)
def test_tsv_layouts(tmp_path, task, folder, fname, lines, bom, want_a, want_b, want_y) -> None:
    _write(tmp_path, folder, fname, lines, bom=bom)
    split = "train" if fname == "train.tsv" else "dev"
    ex = load_task_split(task, split, glue_dir=tmp_path)
    assert ex.texts_a == want_a
    assert ex.texts_b == want_b
    assert len(ex) == len(want_y)
    if get_task(task).is_regression:
        assert ex.labels.dtype == np.float32
        np.testing.assert_allclose(ex.labels, want_y, rtol=0, atol=1e-6)
    else:
        assert ex.labels.dtype == np.int64
        assert ex.labels.tolist() == want_y
    assert ex.skipped_rows == (1 if task == "qqp" else 0)


def test_mnli_train_uses_train_tsv_with_its_own_header(tmp_path) -> None:
    header = MNLI_DEV_HEADER.replace("\tlabel2\tlabel3\tlabel4\tlabel5", "")
    _write(tmp_path, "MNLI", "train.tsv", [header, _mnli_row(0, "A.", "B.", "contradiction", 1)])
    ex = load_task_split("MNLI", "train", glue_dir=tmp_path)
    assert (ex.texts_a, ex.texts_b, ex.labels.tolist()) == (["A."], ["B."], [2])
    # dev must read dev_matched.tsv, which is absent here.
    with pytest.raises(DataError, match="dev_matched.tsv"):
        load_task_split("mnli", "dev", glue_dir=tmp_path)


def test_max_examples_keeps_first_rows(tmp_path) -> None:
    lines = ["sentence\tlabel"] + [f"s{i}\t{i % 2}" for i in range(10)]
    _write(tmp_path, "SST-2", "train.tsv", lines)
    ex = load_task_split("sst2", "train", glue_dir=tmp_path, max_examples=3)
    assert ex.texts_a == ["s0", "s1", "s2"] and ex.labels.tolist() == [0, 1, 0]
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="max_examples"):
            load_task_split("sst2", "train", glue_dir=tmp_path, max_examples=bad)


def test_bad_split(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'test'"):
        load_task_split("rte", "test", glue_dir=tmp_path)


def test_missing_glue_dir(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_task_split("rte", "train", glue_dir=missing)
    assert str(missing) in str(info.value)
    assert info.value.hint and "--glue-dir" in info.value.hint


def test_missing_task_folder(tmp_path) -> None:
    with pytest.raises(DataError) as info:
        load_task_split("rte", "train", glue_dir=tmp_path)
    assert str(tmp_path / "RTE") in str(info.value)


def test_missing_file(tmp_path) -> None:
    _write(tmp_path, "RTE", "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(DataError) as info:
        load_task_split("rte", "dev", glue_dir=tmp_path)
    assert str(tmp_path / "RTE" / "dev.tsv") in str(info.value)


def test_unknown_label_names_file_line_value_and_allowed(tmp_path) -> None:
    path = _write(tmp_path, "RTE", "dev.tsv",
                  ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tc\td\tmaybe"])  # fmt: skip
    with pytest.raises(DataError) as info:
        load_task_split("rte", "dev", glue_dir=tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "'maybe'" in msg
    assert "not_entailment" in msg


def test_malformed_row_is_an_error_outside_qqp(tmp_path) -> None:
    _write(tmp_path, "RTE", "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tonly two"])
    with pytest.raises(DataError, match="line 3.*2 columns"):
        load_task_split("rte", "dev", glue_dir=tmp_path)


def test_bad_regression_score(tmp_path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    _write(tmp_path, "STS-B", "dev.tsv", [header, "0\tg\tf\ty\t1\tn\tn\ta\tb\thigh"])
    with pytest.raises(DataError, match="'high'"):
        load_task_split("stsb", "dev", glue_dir=tmp_path)


def test_tsv_not_utf8_names_file_offset_and_line_even_past_max_examples(tmp_path) -> None:
    lines = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\tcafe {i}\tb\tentailment" for i in range(5)]
    path = _write(tmp_path, "RTE", "train.tsv", lines, bom=True)
    data = path.read_bytes()
    offset = data.index(b"cafe 4") + 3
    path.write_bytes(data[:offset] + b"\xe9" + data[offset + 1:])  # Latin-1 'é' in the last row
    for limit in (1, None):  # preflight reads one row; the whole file is checked anyway
        with pytest.raises(DataError) as info:
            load_task_split("rte", "train", glue_dir=tmp_path, max_examples=limit)
        err = info.value
        assert str(path) in err.message and "not UTF-8" in err.message, err.message
        assert f"byte offset {offset} (line 6)" in err.message and "0xe9" in err.message, err.message
        assert "iconv -f latin1 -t utf-8" in err.hint


def test_check_utf8_joins_characters_cut_by_a_chunk(tmp_path) -> None:
    from nxm_deploy.fileio import check_utf8

    path = tmp_path / "t.txt"
    text = "a\u00e9\u20ac\U0001d11e\n" * 50  # 1-, 2-, 3- and 4-byte characters
    path.write_text(text, encoding="utf-8")
    for chunk in (1, 2, 3, 5, 64):
        check_utf8(path, chunk_bytes=chunk)
    data = text.encode("utf-8")
    offset = len("a\u00e9\u20ac\U0001d11e\n".encode("utf-8")) * 7 + 4  # the 2nd byte of a 3-byte character
    path.write_bytes(data[:offset] + b"\xff" + data[offset + 1:])
    for chunk in (1, 2, 3, 5, 64, 1 << 20):
        with pytest.raises(DataError, match=rf"the first bad byte, 0xe2, is at byte offset {offset - 1} \(line 8\)"):
            check_utf8(path, chunk_bytes=chunk)


def test_own_data_file_checked_whole_for_utf8(tmp_path) -> None:
    """Past the first MiB too, and a character cut by the 1 MiB boundary is no error."""
    pytest.importorskip("datasets")
    from nxm_deploy.data.files import read_columns

    head = "text,label\n"
    row = "caf\u00e9 au lait,x\n"
    rows = (1 << 20) // len(row.encode("utf-8")) + 10
    path = tmp_path / "big.csv"
    cut = 0
    for shift in range(len(row.encode("utf-8"))):
        data = (head + "y" * shift + row * rows).encode("utf-8")
        if data[1 << 20] & 0xC0 != 0x80:  # keep the shift that puts an 'é' across byte 1 MiB
            continue
        cut += 1
        path.write_bytes(data)
        assert len(read_columns(path)["text"]) == rows
    assert cut == 1
    offset = data.rindex(b"caf") + 3
    path.write_bytes(data[:offset] + b"\xe9" + data[offset + 2:])  # Latin-1 'é' in the last row
    with pytest.raises(DataError, match=rf"big.csv is not UTF-8 text: the first bad byte, 0xe9, is at byte offset "
                                        rf"{offset} \(line {rows + 1}\)"):
        read_columns(path)


def test_env_glue_dir(tmp_path, monkeypatch) -> None:
    _write(tmp_path, "RTE", "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tx\ty\tnot_entailment"])
    monkeypatch.setenv("NXM_GLUE_DIR", str(tmp_path))
    assert resolve_glue_dir(None) == tmp_path
    assert resolve_glue_dir(tmp_path / "other") == tmp_path / "other"  # explicit wins
    ex = load_task_split("rte", "train")
    assert ex.texts_a == ["x"] and ex.labels.tolist() == [1]
    monkeypatch.delenv("NXM_GLUE_DIR")
    assert resolve_glue_dir(None) is None


def test_env_glue_dir_missing_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NXM_GLUE_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="NXM_GLUE_DIR"):
        load_task_split("rte", "train")


def test_task_examples_length_mismatch() -> None:
    with pytest.raises(DataError, match="different lengths"):
        TaskExamples(["a", "b"], ["c"], np.array([0, 1]))


# --------------------------------------------------------------------------------------------------
# Hugging Face route (datasets replaced by a fake module: no network)
# --------------------------------------------------------------------------------------------------


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["label"])

    def __getitem__(self, key: str) -> list:
        return self.columns[key]

    def select(self, indices) -> _FakeDataset:
        idx = list(indices)
        return _FakeDataset({k: [v[i] for i in idx] for k, v in self.columns.items()})


def test_hf_route_maps_columns_and_split(monkeypatch) -> None:
    monkeypatch.delenv("NXM_GLUE_DIR", raising=False)
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return _FakeDataset({"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [2, 0, 1]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ex = load_task_split("mnli", "dev", max_examples=2)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert (ex.texts_a, ex.texts_b, ex.labels.tolist(), ex.labels.dtype) == (["p0", "p1"], ["h0", "h1"], [2, 0], np.int64)


def test_hf_route_rejects_test_split_labels(monkeypatch) -> None:
    monkeypatch.delenv("NXM_GLUE_DIR", raising=False)
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: _FakeDataset({"sentence": ["a"], "label": [-1]}))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="-1"):
        load_task_split("sst2", "train")


def test_hf_route_offline_error_has_hint(monkeypatch) -> None:
    monkeypatch.delenv("NXM_GLUE_DIR", raising=False)

    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError) as info:
        load_task_split("rte", "train")
    assert "no network" in str(info.value) and "NXM_GLUE_DIR" in (info.value.hint or "")


def test_hf_route_without_datasets_package(monkeypatch) -> None:
    monkeypatch.delenv("NXM_GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="datasets"):
        load_task_split("rte", "dev")


def test_importing_data_package_stays_light() -> None:
    code = "import sys, nxm_deploy.data; print('torch' in sys.modules, 'transformers' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _logits(classes: list[int], num_labels: int = 2) -> np.ndarray:
    out = np.zeros((len(classes), num_labels), dtype=np.float32)
    out[np.arange(len(classes)), classes] = 3.0
    return out


def test_accuracy_three_of_four() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])  # argmax 0, 1, 0, 1
    assert compute_metrics("sst2", logits, np.array([0, 1, 1, 1])) == {"accuracy": 0.75}


# preds  = 1 1 1 0 0 0 1
# labels = 1 1 0 1 0 0 0
# TP=2 (rows 0,1), FP=2 (rows 2,6), FN=1 (row 3), TN=2 (rows 4,5)
# F1  = 2TP / (2TP + FP + FN) = 4/7;  accuracy = (TP+TN)/7 = 4/7
# MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4-2)/sqrt(4*3*4*3) = 2/12 = 1/6
PREDS = [1, 1, 1, 0, 0, 0, 1]
GOLD = np.array([1, 1, 0, 1, 0, 0, 0])


def test_f1_and_accuracy_by_hand() -> None:
    out = compute_metrics("mrpc", _logits(PREDS), GOLD)
    assert set(out) == {"f1", "accuracy"}
    assert out["f1"] == pytest.approx(4 / 7)
    assert out["accuracy"] == pytest.approx(4 / 7)


def test_mcc_by_hand() -> None:
    out = compute_metrics("cola", _logits(PREDS), GOLD)
    assert set(out) == {"matthews_corr"}
    assert out["matthews_corr"] == pytest.approx(1 / 6)


def test_three_class_argmax() -> None:
    out = compute_metrics("mnli", _logits([0, 2, 1, 2], 3), np.array([0, 2, 2, 2]))
    assert out == {"accuracy": 0.75}


def test_correlations() -> None:
    y = np.array([0.0, 1.2, 2.5, 3.1, 4.9], dtype=np.float32)
    out = compute_metrics("stsb", 2 * y + 1, y)
    assert set(out) == {"pearson", "spearman"}
    assert out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
    monotone = compute_metrics("stsb", np.exp(y)[:, None], y)  # [B, 1] accepted
    assert monotone["spearman"] == pytest.approx(1.0)
    assert monotone["pearson"] < 0.99
    assert compute_metrics("stsb", -y, y)["pearson"] == pytest.approx(-1.0)


def test_constant_regression_prediction_gives_nan() -> None:
    out = compute_metrics("stsb", np.ones(4), np.array([0.0, 1.0, 2.0, 3.0]))
    assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])


@pytest.mark.parametrize(
    ("task", "preds", "labels"),
    [
        ("sst2", np.zeros((4, 3)), np.zeros(4)),  # wrong class count
        ("sst2", np.zeros(4), np.zeros(4)),  # class ids instead of logits
        ("sst2", np.zeros((4, 2)), np.zeros(3)),  # batch mismatch
        ("stsb", np.zeros((4, 2)), np.zeros(4)),  # regression with 2 outputs
        ("stsb", np.zeros(4), np.zeros(5)),
    ],
)
def test_metric_shape_mismatch(task, preds, labels) -> None:
    with pytest.raises(ConfigError):
        compute_metrics(task, preds, labels)


# --------------------------------------------------------------------------------------------------
# real GLUE data
# --------------------------------------------------------------------------------------------------


@needs_real_glue
@pytest.mark.parametrize(
    ("task", "split", "n", "counts"),
    [("rte", "train", 2490, {0: 1249, 1: 1241}), ("rte", "dev", 277, {0: 146, 1: 131}),
     ("mrpc", "dev", 408, {0: 129, 1: 279}), ("sst2", "dev", 872, {0: 428, 1: 444})],
)  # fmt: skip
def test_real_glue_counts(task, split, n, counts) -> None:
    ex = load_task_split(task, split, glue_dir=REAL_GLUE)
    assert len(ex) == n
    values, freq = np.unique(ex.labels, return_counts=True)
    assert dict(zip(values.tolist(), freq.tolist())) == counts
    assert all(a.strip() for a in ex.texts_a)
    if ex.texts_b is not None:
        assert all(b.strip() for b in ex.texts_b)


@needs_real_glue
def test_real_stsb_dev_scores() -> None:
    ex = load_task_split("sts-b", "dev", glue_dir=REAL_GLUE)
    assert len(ex) == 1500 and ex.labels.dtype == np.float32
    assert ex.labels.min() >= 0.0 and ex.labels.max() <= 5.0
    assert len(np.unique(ex.labels)) > 10


# --------------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", ".", '"']


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizerFast.from_pretrained(str(d))
    assert tok.convert_tokens_to_ids("cat") == VOCAB.index("cat")  # the vocab file was really used
    return tok


def _pair_examples(n: int = 20) -> TaskExamples:
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    texts_a = [" ".join(words[: 1 + i % 8]) for i in range(n)]
    texts_b = [" ".join(words[i % 3 :]) for i in range(n)]
    return TaskExamples(texts_a, texts_b, np.arange(n, dtype=np.int64))


def test_loader_batches_and_dynamic_padding(tokenizer) -> None:
    from nxm_deploy.data import make_dataloader

    ex = _pair_examples()
    dl = make_dataloader(tokenizer, ex, batch_size=6, max_seq_length=32, shuffle=False)
    widths, seen = set(), []
    for batch in dl:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            assert str(batch[key].dtype) == "torch.int64"
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(dim=1)
        assert ids.shape[1] == int(lengths.max()) < 32  # padded to the longest row of this batch only
        assert (ids[mask == 0] == tokenizer.pad_token_id).all()
        assert (batch["token_type_ids"] == 1).any()  # second segment present
        widths.add(ids.shape[1])
        seen.extend(batch["labels"].tolist())
    assert seen == list(range(20))  # no shuffle: file order
    assert len(widths) > 1  # dynamic padding: batches differ in width

    fixed = make_dataloader(tokenizer, ex, batch_size=6, max_seq_length=12, shuffle=False, pad_to_max_length=True)
    assert {b["input_ids"].shape[1] for b in fixed} == {12}


def test_loader_regression_labels_and_single_sentence(tokenizer) -> None:
    from nxm_deploy.data import make_dataloader

    ex = TaskExamples(["the cat", "a dog ran"], None, np.array([0.5, 4.25], dtype=np.float32))
    (batch,) = list(make_dataloader(tokenizer, ex, batch_size=4, max_seq_length=8, shuffle=False))
    assert str(batch["labels"].dtype) == "torch.float32"
    assert batch["labels"].tolist() == [0.5, 4.25]
    assert (batch["token_type_ids"] == 0).all()
    assert batch["input_ids"][1].tolist()[:5] == [2, 10, 11, 12, 3]  # [CLS] a dog ran [SEP]


def test_loader_truncates(tokenizer) -> None:
    from nxm_deploy.data import make_dataloader

    ex = TaskExamples(["the cat sat on the mat " * 5], ["a dog ran " * 5], np.array([1]))
    (batch,) = list(make_dataloader(tokenizer, ex, batch_size=1, max_seq_length=9, shuffle=False))
    assert batch["input_ids"].shape == (1, 9) and int(batch["attention_mask"].sum()) == 9


def test_loader_shuffle_is_seeded(tokenizer) -> None:
    from nxm_deploy.data import make_dataloader

    def order(seed: int) -> list[int]:
        dl = make_dataloader(tokenizer, _pair_examples(), batch_size=4, max_seq_length=16, shuffle=True, seed=seed)
        return [y for b in dl for y in b["labels"].tolist()]

    a, b, c = order(3), order(3), order(4)
    assert a == b
    assert a != c
    assert sorted(a) == list(range(20)) and a != list(range(20))


def test_loader_rejects_bad_arguments(tokenizer) -> None:
    from nxm_deploy.data import make_dataloader

    with pytest.raises(ConfigError, match="batch_size"):
        make_dataloader(tokenizer, _pair_examples(), batch_size=0, max_seq_length=8, shuffle=False)
    with pytest.raises(DataError):
        make_dataloader(tokenizer, TaskExamples([], None, np.array([], dtype=np.int64)),
                        batch_size=2, max_seq_length=8, shuffle=False)  # fmt: skip


def test_encode_fixed_cycles_and_pads(tokenizer) -> None:
    from nxm_deploy.data import encode_fixed

    ex = TaskExamples(["the cat", "a dog ran", "the mat"], ["sat", "on", "."], np.array([0, 1, 0]))
    out = encode_fixed(tokenizer, ex, max_seq_length=7, batch_size=5)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    for arr in out.values():
        assert arr.dtype == np.int64 and arr.shape == (5, 7)
    ids = out["input_ids"]
    np.testing.assert_array_equal(ids[3], ids[0])
    np.testing.assert_array_equal(ids[4], ids[1])
    assert ids[0].tolist() == [2, 5, 6, 3, 7, 3, 0]  # [CLS] the cat [SEP] sat [SEP] [PAD]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0]
