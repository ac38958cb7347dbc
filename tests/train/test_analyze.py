"""train.analyze (layers, errors), train.report and the train.predict ensemble, on tiny exports
built here and on the CS224N files cut to their first rows."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minbert import BertConfig, BertModel, Tokenizer
from minbert.heads import HeadSpec, MultitaskBert, MultitaskSpec
from train import analyze, predict, report
from train.data import DATA_FILES, load_task
from train.figures import run_cli
from train.loop import save_multitask
from train.tasks import metric

REPO = Path(__file__).resolve().parents[2]
ROWS = {"train": 400, "dev": 120, "test": 40}  # rows kept per file of the cut data directory
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread is 3-30x faster than two on a busy 2-core
    machine (no threads spinning on cores that other work holds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_data")
    for task in ("sst", "quora", "sts"):
        for split, name in DATA_FILES[task].items():
            lines = (data_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)
            (out / name).write_text("".join(lines[:ROWS[split] + 1]), encoding="utf-8")
    return out


def make_export(directory: Path, spec: MultitaskSpec, seed: int, tokenizer: Tokenizer | None = None) -> Path:
    """A random 2-layer BERT with heads, saved as train/run.py exports its best model."""
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=128)
    model = MultitaskBert(BertModel(cfg), spec)
    save_multitask(model.state_dict(), cfg, spec, tokenizer or Tokenizer.from_pretrained(), directory,
                   extra={"train_config": {"tasks": {t: {"max_length": 32} for t in spec.tasks}}})
    return directory


CROSS = MultitaskSpec(tasks={"sst": HeadSpec(), "quora": HeadSpec(), "sts": HeadSpec()})
BI = MultitaskSpec(tasks={"sst": HeadSpec(pooling="mean"), "quora": HeadSpec("bi", "mean", "concat"),
                          "sts": HeadSpec("bi", "cls", "cosine")})


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {"cross": make_export(root / "cross", CROSS, 0), "bi": make_export(root / "bi", BI, 1)}


def _png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# ----------------------------------------------------------------------------- ensembles
def _predict(out: Path, data: Path, *args: str) -> Path:
    """Run train.predict; its printed JSON (the dev scores) is kept in ``out/printed.json``."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert predict.main([*args, "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    text = printed.getvalue()
    (out / "printed.json").write_text(text[text.index("{\n"):])  # after any "predict: ..." notes
    return out


def _rows(path: Path) -> dict[str, float]:
    lines = path.read_text().splitlines()[1:]
    return {a.strip(): float(b) for a, b in (line.split(" , ") for line in lines)}


@pytest.fixture(scope="module")
def predictions(exports, small_data, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("predictions")
    a, b = str(exports["cross"]), str(exports["bi"])
    return {
        "a": _predict(tmp / "a", small_data, "--checkpoint", a),
        "b": _predict(tmp / "b", small_data, "--checkpoint", b),
        "aa": _predict(tmp / "aa", small_data, "--checkpoint", a, "--checkpoint", a),
        "ab": _predict(tmp / "ab", small_data, "--checkpoint", a, "--checkpoint", b),
        "a_only": _predict(tmp / "a_only", small_data, "--checkpoint", a, "--checkpoint", b,
                           "--weights", "1", "0"),
    }


FILES = [f"{s}-{split}-output.csv" for s in ("sst", "para", "sts") for split in ("dev", "test")]


@pytest.mark.parametrize("ensemble", ["aa", "a_only"])
def test_ensemble_of_a_model_with_itself_or_weighted_to_one_member_is_that_model(predictions, ensemble):
    for name in FILES:
        assert (predictions[ensemble] / name).read_text() == (predictions["a"] / name).read_text(), name


def test_ensemble_averages_the_members_scores(predictions):
    """Members of different forms (cross-encoder, bi-encoder cosine): the ensemble's STS output is
    the mean of the members' similarities (the files hold 4 decimals)."""
    a, b, ab = (_rows(predictions[k] / "sts-dev-output.csv") for k in ("a", "b", "ab"))
    assert set(ab) == set(a)
    assert max(abs(ab[i] - (a[i] + b[i]) / 2) for i in ab) <= 1.01e-4
    assert any(abs(a[i] - b[i]) > 0.1 for i in ab)  # the members differ, so the check above can fail


def test_ensemble_prints_member_and_ensemble_dev_scores(predictions):
    single = json.loads((predictions["a"] / "printed.json").read_text())["dev"]
    dev = json.loads((predictions["aa"] / "printed.json").read_text())["dev"]
    members = list(dev["members"].values())
    assert len(members) == 2 and members[0] == members[1] == dev["ensemble"] == single
    assert dev["weights"] == [0.5, 0.5]
    assert set(single) == {"sst", "quora", "sts", "overall"}
    weighted = json.loads((predictions["a_only"] / "printed.json").read_text())["dev"]
    assert weighted["weights"] == [1.0, 0.0] and weighted["ensemble"] == single


def test_ensemble_members_must_share_tokenizer_and_tasks(exports, tmp_path, small_data, capsys):
    vocab = Tokenizer.from_pretrained().backend.get_vocab()
    words = sorted(vocab, key=vocab.get)[:1000]  # the specials are among the first 1000 ids
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(words) + "\n")
    other_tok = make_export(tmp_path / "other_tok", CROSS, 2, Tokenizer.from_pretrained(tmp_path / "vocab"))
    sst_only = make_export(tmp_path / "sst_only", MultitaskSpec(tasks={"sst": HeadSpec()}), 3)
    a = str(exports["cross"])
    for other, needle in ((other_tok, "need the same tokenizer"), (sst_only, "need the same tasks")):
        rc = predict.main(["--checkpoint", a, "--checkpoint", str(other), "--data", str(small_data),
                           "--out", str(tmp_path / "out"), "--no-progress"])
        _one_line_error(rc, capsys.readouterr().err, needle, str(other))
    rc = predict.main(["--checkpoint", a, "--checkpoint", a, "--weights", "1", "--data", str(small_data),
                       "--out", str(tmp_path / "out"), "--no-progress"])
    _one_line_error(rc, capsys.readouterr().err, "--weights needs one non-negative number per --checkpoint")
    rc = predict.main(["--checkpoint", str(tmp_path / "missing"), "--data", str(small_data),
                       "--out", str(tmp_path / "out"), "--no-progress"])
    _one_line_error(rc, capsys.readouterr().err, "does not exist", "missing")


# ----------------------------------------------------------------------------- errors
def test_errors_confusion_matrices_scatter_and_hard_cases(exports, small_data, predictions, tmp_path):
    out = tmp_path / "errors"
    assert run_cli(analyze.main, ["errors", "--checkpoint", str(exports["cross"]), "--data", str(small_data),
                                  "--out", str(out), "--top", "5", "--no-progress"]) == 0
    result = json.loads((out / "errors.json").read_text())
    for task, stem, n in (("sst", "sst", 5), ("quora", "para", 2)):
        r = result["tasks"][task]
        _png(out / r["figure"])
        dev = load_task(task, "dev", small_data, warn=False).examples
        counts = torch.tensor(r["confusion"])
        assert counts.shape == (n, n) and int(counts.sum()) == len(dev) == r["n"]
        # The counts are those of train.predict's dev file against the gold labels.
        written = _rows(predictions["a"] / f"{stem}-dev-output.csv")
        expected = torch.zeros(n, n, dtype=torch.long)
        for e in dev:
            expected[e.label, int(written[e.id])] += 1
        assert torch.equal(counts, expected)
        norm = torch.tensor(r["confusion_normalised"])
        for c in range(n):
            support = int(counts[c].sum())
            assert r["per_class"][c]["support"] == support
            if support:
                assert float(norm[c].sum()) == pytest.approx(1.0)
                assert r["per_class"][c]["recall"] == pytest.approx(float(norm[c, c]))
        assert r["accuracy"] == pytest.approx(float(counts.trace()) / len(dev))
        assert f"{r['accuracy']:.3f}" in r["title"]
        wrong = r["most_confident_errors"]
        assert 0 < len(wrong) <= 5 and all(e["gold"] != e["predicted"] for e in wrong)
        assert [e["confidence"] for e in wrong] == sorted((e["confidence"] for e in wrong), reverse=True)
    sts = result["tasks"]["sts"]
    _png(out / sts["figure"])
    gold = [e.label for e in load_task("sts", "dev", small_data, warn=False).examples]
    assert sts["points"]["gold"] == gold
    assert sts["pearson"] == pytest.approx(metric("sts", torch.tensor(sts["points"]["predicted"]), gold))
    assert f"Pearson {sts['pearson']:.3f}" in sts["title"]
    md = (out / "errors.md").read_text()
    assert "| class | precision | recall | F1 | support |" in md
    assert result["tasks"]["sst"]["most_confident_errors"][0]["id"] in md


def test_errors_needs_an_export_and_existing_paths(small_data, embedded_dir, tmp_path, capsys):
    rc = run_cli(analyze.main, ["errors", "--checkpoint", str(embedded_dir), "--data", str(small_data),
                                "--out", str(tmp_path)])
    _one_line_error(rc, capsys.readouterr().err, "holds no multitask.json")
    rc = run_cli(analyze.main, ["errors", "--checkpoint", str(tmp_path / "nope"), "--data", str(small_data),
                                "--out", str(tmp_path)])
    _one_line_error(rc, capsys.readouterr().err, "does not exist", "nope")
    rc = run_cli(analyze.main, ["layers", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path)])
    _one_line_error(rc, capsys.readouterr().err, "data directory", "nodata")


# ----------------------------------------------------------------------------- layers
def test_layers_on_the_embedded_checkpoint_sts_grows_with_depth(small_data, tmp_path):
    out = tmp_path / "layers"
    assert run_cli(analyze.main, ["layers", "--tasks", "sts", "--data", str(small_data), "--out", str(out),
                                  "--max-train", "400", "--max-eval", "120", "--no-progress"]) == 0
    _png(out / "layers.png")
    r = json.loads((out / "layers.json").read_text())
    assert r["kind"] == "encoder" and r["layers"] == ["embeddings", "1", "2", "3", "4", "5", "6"]
    sts = r["tasks"]["sts"]
    assert sts["train_examples"] == 400 and sts["eval_examples"] == 120
    assert len(sts["scores"]) == 7
    assert sts["scores"][0] < sts["scores"][-1] - 0.1, sts["scores"]


def test_layers_on_an_export_uses_its_heads(exports, small_data, tmp_path):
    out = tmp_path / "layers"
    r = analyze.layers(exports["bi"], small_data, out, ["sst", "quora", "sts"], epochs=2, max_train=64,
                       max_eval=32, progress=False)
    _png(out / "layers.png")
    assert json.loads((out / "layers.json").read_text()) == r
    assert r["kind"] == "export" and len(r["layers"]) == 3
    assert {t: v["probe"]["features"] for t, v in r["tasks"].items()} == {"sst": 64, "quora": 256, "sts": 1}
    assert r["tasks"]["sts"]["probe"] == {"form": "bi", "pooling": "cls", "head": "cosine", "features": 1}
    for t, v in r["tasks"].items():
        assert len(v["scores"]) == 3 and v["max_length"] == 32 and v["eval_examples"] == 32
        assert all(0.0 <= s <= 1.0 for s in v["scores"]) if t != "sts" else True


# ----------------------------------------------------------------------------- report
def _fake_run(path: Path, seed: int, lr: float, dev: list[float]) -> Path:
    path.mkdir(parents=True)
    config = {"name": "cpu_smoke", "seed": seed, "optim": {"lr": lr, "head_lr": 1e-3},
              "tasks": {"sst": {"max_length": 64}}}
    (path / "config.json").write_text(json.dumps(config))
    records = [{"stage": "simcse", "step": 1, "loss": 0.1, "lr": 1.0}]
    tasks = ["sst", "quora", "sts"]
    for step in range(1, 13):
        records.append({"step": step, "epoch": (step - 1) // 6 + 1, "loss": {tasks[step % 3]: 1.0 / step + seed},
                        "lr": lr * (1 - step / 12), "samples_per_s": 30.0 + step, "tokens_per_s": 900.0})
        if step % 6 == 0:
            e = step // 6
            records.append({"epoch": e, "step": step, "dev": {"sst": 0.3 + dev[e - 1] / 10, "quora": 0.7,
                                                               "sts": 0.5, "overall": dev[e - 1]}})
    records.insert(4, {"step": 4, "epoch": 1, "loss": {"quora": 99.0}, "lr": 0.0, "samples_per_s": 1.0,
                       "tokens_per_s": 1.0})  # overwritten by the later record of step 4 (a resume)
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_curves_and_table(tmp_path):
    a = _fake_run(tmp_path / "run_a", 0, 1e-4, [0.60, 0.62])
    b = _fake_run(tmp_path / "run_b", 1, 2e-4, [0.65, 0.61])
    out = tmp_path / "report"
    assert run_cli(report.main, [str(a), str(b), "--out", str(out)]) == 0
    _png(out / "report.png")
    r = json.loads((out / "report.json").read_text())
    assert r["config_differences"] == ["optim.lr", "seed"]
    run_a, run_b = r["runs"]
    assert run_a["name"] == "run_a" and run_b["config"] == {"optim.lr": 2e-4, "seed": 1}
    assert run_a["series"]["loss/quora"]["x"] == [1, 4, 7, 10]
    assert run_a["series"]["loss/quora"]["y"] == [1.0, 0.25, 1 / 7, 0.1]  # step 4: the later record
    assert run_a["series"]["lr"]["x"] == list(range(1, 13))
    assert run_b["series"]["dev/overall"] == {"x": [1, 2], "y": [0.65, 0.61], "x_label": "epoch"}
    assert run_a["best"]["epoch"] == 2 and run_b["best"]["epoch"] == 1
    assert {p["series"] for p in r["panels"]} >= {"loss/sst", "lr", "samples_per_s", "dev/sts"}
    md = (out / "report.md").read_text()
    assert "| run | best epoch | overall | SST acc | Quora acc | STS Pearson | steps | optim.lr | seed |" in md
    assert "| run_b | 1 | 0.6500 | 0.3650 | 0.7000 | 0.5000 | 12 | 0.0002 | `1` |" in md


def test_report_bad_run_directories_fail_in_one_line(tmp_path):
    (tmp_path / "empty_run").mkdir()
    for path, needle in ((tmp_path / "empty_run", "holds no log.jsonl"), (tmp_path / "nope", "does not exist")):
        proc = subprocess.run([sys.executable, "-m", "train.report", str(path), "--out", str(tmp_path / "r")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        _one_line_error(proc.returncode, proc.stderr, needle, str(path))


def test_report_counts_a_missing_key_as_its_default(tmp_path):
    """A run written before a config key existed is compared with the key's default: a newer run
    that states the default explicitly does not differ, one that changes it does."""
    a = _fake_run(tmp_path / "old", 0, 1e-4, [0.60, 0.62])
    b = _fake_run(tmp_path / "new", 0, 1e-4, [0.60, 0.62])
    c = _fake_run(tmp_path / "changed", 0, 1e-4, [0.60, 0.62])
    for run, patience in ((b, 0), (c, 2)):
        config = json.loads((run / "config.json").read_text())
        config.update(early_stopping_patience=patience, model={"lora": {"r": 0}})
        (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "report"
    assert run_cli(report.main, [str(a), str(b), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["config_differences"] == []
    assert run_cli(report.main, [str(a), str(c), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["config_differences"] == ["early_stopping_patience"]
