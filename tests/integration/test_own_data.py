"""Your own data: the whole pipeline on a CSV train file and a JSON Lines eval file that the test writes (text
pairs, string labels), then ``nxm-deploy predict`` answers with those labels. Bad files fail with one line (exit 2).
"""

from __future__ import annotations

import json
import random

import pytest
import yaml

from nxm_deploy.cli.main import main

LABELS = ("billing", "login", "shipping")
WORDS = {"billing": "invoice charge refund card payment", "login": "password account locked reset sign",
         "shipping": "parcel delivery courier tracking late"}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        words = WORDS[label].split()
        rows.append({"question": " ".join(rng.sample(words, 3)), "answer": f"ticket {i} " + rng.choice(words),
                     "label": label})
    return rows


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _recipe(tmp_path, tiny_recipe_dict, **task) -> str:
    data = tiny_recipe_dict
    data["name"] = "tickets"
    data["task"] = {"name": "tickets", "max_seq_length": 32, **task}
    data["engine"] = {"specs": []}
    data["train"].update(dense={"epochs": 2, "learning_rate": 1e-3},
                         admm={"epochs": 1, "learning_rate": 1e-4, "rho": 1e-2, "update_interval": 2,
                               "masked_finetune_epochs": 0.5})
    path = tmp_path / "tickets.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def tickets_run(tmp_path_factory, tiny_recipe_dict_module):
    tmp = tmp_path_factory.mktemp("own_data")
    _write_csv(tmp / "train.csv", _rows(96, 0))
    _write_jsonl(tmp / "eval.jsonl", _rows(24, 1))
    recipe = _recipe(tmp, tiny_recipe_dict_module, train_file=str(tmp / "train.csv"),
                     eval_file=str(tmp / "eval.jsonl"), text_columns=["question", "answer"])
    rc = main(["-q", "run", recipe, "--runs-root", str(tmp / "runs")])
    return rc, tmp / "runs" / "tickets"


@pytest.mark.slow
def test_pipeline_on_own_csv_and_jsonl_then_predict_the_labels(tickets_run, capsys):
    rc, run = tickets_run
    assert rc == 0
    config = json.loads((run / "dense" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(3)] == list(LABELS)  # inferred from the train file, sorted
    validation = json.loads((run / "validation.json").read_text())
    assert validation["task"] == "tickets" and validation["dev_examples"] == 24
    assert set(validation["metrics"]["sparse_int8"]) == {"accuracy"}
    onnx = json.loads((run / "onnx" / "manifest.json").read_text())
    assert onnx["sparsity_check"]["ok"]
    capsys.readouterr()
    assert main(["predict", str(run), "refund card invoice", "ticket 7 charge"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["label"] in LABELS and set(out["scores"]) == set(LABELS)
    assert main(["predict", str(run), "refund card invoice"]) == 2  # a pair task: one text is refused
    assert "pair" in capsys.readouterr().err


def test_recipe_rules_for_own_data(tmp_path, tiny_recipe_dict):
    from nxm_deploy.config.recipe import load_recipe
    from nxm_deploy.errors import ConfigError

    _write_csv(tmp_path / "t.csv", _rows(6, 0))
    ok = load_recipe(_recipe(tmp_path, dict(tiny_recipe_dict), train_file=str(tmp_path / "t.csv"),
                             eval_file=str(tmp_path / "t.csv"), text_columns=["question"]))
    spec = ok.task.spec()
    assert spec.label_list == LABELS and not spec.is_pair and spec.primary_metric == "accuracy"
    cases = [({"name": "rte", "train_file": "t.csv", "eval_file": "t.csv", "text_columns": ["q"]}, "GLUE preset"),
             ({"name": "tickets", "train_file": "t.csv", "text_columns": ["q"]}, "task.eval_file"),
             ({"name": "rte", "text_columns": ["q"]}, "neither task.train_file nor task.dataset"),
             ({"name": "x", "train_file": "t.csv", "eval_file": "t.csv", "text_columns": ["q"], "metric": "pearson",
               "labels": ["a", "b"]}, "regression metric"),
             # causal language modelling (tests/integration/test_causal_lm.py)
             ({"name": "causal_lm"}, "needs your text"),
             ({"name": "causal_lm", "train_file": "a.txt", "eval_file": "b.txt", "labels": ["x", "y"]},
              "do not apply to causal_lm"),
             ({"name": "causal_lm", "train_file": "a.txt", "eval_file": "b.txt", "metric": "accuracy"},
              "do not apply to causal_lm"),
             ({"name": "tickets", "train_file": "a.csv", "eval_file": "b.csv", "text_columns": ["q"],
               "metric": "perplexity"}, "belongs to causal language modelling"),
             ({"name": "causal_lm", "dataset": "wikitext", "eval_file": "b.txt"}, "task.eval_split")]
    for task, message in cases:
        data = dict(tiny_recipe_dict)
        data["task"] = task
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message):
            load_recipe(path)


@pytest.mark.parametrize("problem", ["missing column", "unknown eval label", "empty", "not utf-8",
                                     "string labels with a regression metric"])
def test_bad_data_files_are_one_line_exit_2(problem, tmp_path, tiny_recipe_dict, capsys):
    train, evalf = tmp_path / "train.csv", tmp_path / "eval.csv"
    _write_csv(train, _rows(12, 0))
    rows = _rows(6, 1)
    task = {"train_file": str(train), "eval_file": str(evalf), "text_columns": ["question", "answer"]}
    expected = {"missing column": "no column 'answer2'", "unknown eval label": "row 3: label 'refunds'",
                "empty": "is empty", "not utf-8": "not UTF-8", "string labels with a regression metric": "not a number"}
    if problem == "missing column":
        task["text_columns"] = ["question", "answer2"]
        _write_csv(evalf, rows)
    elif problem == "unknown eval label":
        rows[2]["label"] = "refunds"
        _write_csv(evalf, rows)
    elif problem == "empty":
        evalf.write_text("")
    elif problem == "not utf-8":
        evalf.write_bytes("question,answer,label\ncaf\xe9,x,login\n".encode("latin-1"))
    else:
        task["metric"] = "pearson"
        _write_csv(evalf, rows)
    recipe = _recipe(tmp_path, dict(tiny_recipe_dict), **task)
    assert main(["run", recipe, "--runs-root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected[problem] in err, err


def test_changed_data_file_is_another_run(tmp_path, tiny_recipe_dict):
    from nxm_deploy.config.recipe import load_recipe

    train = tmp_path / "t.csv"
    _write_csv(train, _rows(6, 0))
    path = _recipe(tmp_path, dict(tiny_recipe_dict), train_file=str(train), eval_file=str(train),
                   text_columns=["question"])
    before = load_recipe(path).sha256()
    assert load_recipe(path).sha256() == before
    _write_csv(train, _rows(6, 1))
    assert load_recipe(path).sha256() != before  # `run` then refuses the old run directory (or --overwrite)


def test_hugging_face_dataset_route(tmp_path, tiny_recipe_dict):
    """``task.dataset`` names a Hugging Face dataset (here a local folder, the offline form of a hub name): the
    splits come from ``train_split`` / ``eval_split``, and a ``ClassLabel`` column's names keep the dataset's class
    order (not sorted)."""
    import datasets

    from nxm_deploy.config.recipe import load_recipe
    from nxm_deploy.data import load_task_split
    from nxm_deploy.errors import DataError

    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["shipping", "billing", "login"])})
    folder = tmp_path / "tickets_ds"
    folder.mkdir()
    for split, seed in (("train", 0), ("test", 1)):
        rows = _rows(12, seed)
        table = {k: [r[k] for r in rows] for k in ("question", "answer")}
        table["label"] = [features["label"].str2int(r["label"]) for r in rows]
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(folder / f"{split}.parquet"))
    path = _recipe(tmp_path, dict(tiny_recipe_dict), dataset=str(folder), eval_split="test",
                   text_columns=["question", "answer"])
    spec = load_recipe(path).task.spec()
    assert spec.label_list == ("shipping", "billing", "login") and spec.is_pair
    dev = load_task_split(spec, "dev")
    expected = [("shipping", "billing", "login").index(r["label"]) for r in _rows(12, 1)]
    assert dev.labels.tolist() == expected and dev.texts_a[0] == _rows(12, 1)[0]["question"]
    bad = _recipe(tmp_path, dict(tiny_recipe_dict), dataset=str(folder), eval_split="validation",
                  text_columns=["question"])
    with pytest.raises(DataError, match="split 'validation'|validation"):
        load_task_split(load_recipe(bad).task.spec(), "dev")
