"""train.data: the shipped CS224N files, and malformed input written into tmp_path."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from train.data import (DATA_FILES, SPLITS, TASKS, LoadedSplit, MalformedRowWarning, PairExample,
                        SentenceExample, load_all, load_file, load_task)

# task, split -> (examples kept, line numbers skipped)
EXPECTED = {
    ("sst", "train"): (8544, []), ("sst", "dev"): (1101, []), ("sst", "test"): (2210, []),
    ("sts", "train"): (6040, []), ("sts", "dev"): (863, []), ("sts", "test"): (1725, []),
    ("quora", "train"): (15999, [15624]), ("quora", "dev"): (2000, []), ("quora", "test"): (2213, [1428]),
    ("cfimdb", "train"): (1707, []), ("cfimdb", "dev"): (245, []), ("cfimdb", "test"): (488, []),
}


def load_quietly(task: str, split: str, data_dir) -> LoadedSplit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedRowWarning)
        return load_task(task, split, data_dir)


# ---------------------------------------------------------------------- the shipped files
@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_shipped_counts(data_dir, task, split):
    kept, skipped_lines = EXPECTED[task, split]
    loaded = load_quietly(task, split, data_dir)
    assert len(loaded) == kept
    assert [line for line, _ in loaded.skipped] == skipped_lines
    assert loaded.path == Path(data_dir) / DATA_FILES[task][split]
    assert (loaded.task, loaded.split) == (task, split)
    kind = SentenceExample if task in ("sst", "cfimdb") else PairExample
    assert all(type(ex) is kind for ex in loaded)
    ids = [ex.id for ex in loaded]
    assert len(set(ids)) == len(ids) and all(ids)
    texts = [ex.sentence for ex in loaded] if kind is SentenceExample else \
        [t for ex in loaded for t in (ex.sentence1, ex.sentence2)]
    assert all(t and t == t.strip() for t in texts)
    if split == "test":
        assert all(ex.label is None for ex in loaded)


@pytest.mark.parametrize("task,label_type,values", [
    ("sst", int, {0, 1, 2, 3, 4}), ("cfimdb", int, {0, 1}), ("quora", int, {0, 1}), ("sts", float, None)])
@pytest.mark.parametrize("split", ["train", "dev"])
def test_shipped_labels(data_dir, task, split, label_type, values):
    labels = [ex.label for ex in load_quietly(task, split, data_dir)]
    assert all(type(label) is label_type for label in labels)
    if values is None:
        assert all(0.0 <= label <= 5.0 for label in labels)
        assert min(labels) == 0.0 and max(labels) == 5.0
    else:
        assert set(labels) == values


def test_quora_malformed_rows_are_reported(data_dir):
    expected = r"quora-train\.csv: skipped 1 malformed row\(s\) at line\(s\) 15624"
    with pytest.warns(MalformedRowWarning, match=expected):
        train = load_task("quora", "train", data_dir)
    assert train.skipped == [(15624, "label is missing")]
    assert "ad118c967d683c93883bf072d" not in {ex.id for ex in train}
    assert train.skipped_ids == ["ad118c967d683c93883bf072d"]

    with pytest.warns(MalformedRowWarning, match=r"quora-test-student\.csv: .* 1428"):
        test = load_task("quora", "test", data_dir)
    assert test.skipped == [(1428, "empty sentence2")]
    assert "9054345d02cd6c5642a4904dc" not in {ex.id for ex in test}
    assert test.skipped_ids == ["9054345d02cd6c5642a4904dc"]


def test_clean_files_do_not_warn(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task("sts", "dev", data_dir)
        load_task("quora", "dev", data_dir)


def test_student_test_header_is_read_by_name(data_dir):
    # ids-sst-test-student.csv's header is "0<TAB><TAB>id<TAB>sentence": an extra leading column.
    first = load_task("sst", "test", data_dir)[0]
    assert first == SentenceExample("b7573736a6ddf7be102b7fee0", "Effective but too-tepid biopic", None)
    assert load_task("cfimdb", "test", data_dir)[0].id == "c916d7750936543cf3a109be1"


def test_load_all(data_dir):
    loaded = load_all("dev", data_dir)
    assert list(loaded) == ["sst", "quora", "sts"]
    assert [len(loaded[t]) for t in loaded] == [1101, 2000, 863]


# ---------------------------------------------------------------------- small files in tmp_path
def write(directory: Path, name: str, lines: list[str]) -> Path:
    path = directory / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_csv_quoting_and_one_record_per_line(tmp_path):
    write(tmp_path, "quora-dev.csv", [
        "\tid\tsentence1\tsentence2\tis_duplicate",
        '0\ta1\t"""text """"quoted"""" more"""\tplain\t1.0',
        '1\ta2\t"spans\ntwo lines"\t  padded  \t0.0',  # lines 3-4: a record across two lines
        "2\ta3\tx\ty\t0",
        "3\ta4\tx\t\t1.0",  # line 6: empty sentence2
    ])
    loaded = load_task("quora", "dev", tmp_path, warn=False)
    assert loaded.examples == [
        PairExample("a1", '"text ""quoted"" more"', "plain", 1),
        PairExample("a3", "x", "y", 0),
    ]
    assert [line for line, _ in loaded.skipped] == [3, 4, 6]
    assert loaded.skipped[0][1].startswith("unbalanced quote")
    assert loaded.skipped[1:] == [(4, "3 fields, expected 5"), (6, "empty sentence2")]
    assert loaded.skip_counts() == {"unbalanced quote": 1, "wrong number of fields": 1, "empty sentence": 1}


def test_unbalanced_quote_spoils_only_its_own_line(tmp_path):
    """The drill of the issue: a quote that never closes used to swallow the rows after it into
    one long "sentence" full of tabs and newlines. Every other row must come through unmerged,
    and the report must count each reason with its line numbers."""
    rows = [f"{i}\tq{i}\tQuestion number {i}?\tAnother question {i}?\t{i % 2}" for i in range(40)]
    rows[3] = '3\tq3\t"Why do quotes never close?\tWhat happens then?\t1'  # line 5
    rows[20] = '20\tq20\t"a quoted\ttab"\tsecond\t0'  # line 22: a tab inside a field
    rows[30] = '30\tq30\tfirst\tsecond\t7'  # line 32: label out of range
    write(tmp_path, "quora-train.csv", ["\tid\tsentence1\tsentence2\tis_duplicate", *rows])
    with pytest.warns(MalformedRowWarning) as record:
        loaded = load_task("quora", "train", tmp_path)
    assert [line for line, _ in loaded.skipped] == [5, 22, 32]
    assert loaded.skipped_ids == ["q3", "q20", "q30"]
    good = [f"q{i}" for i in range(40) if i not in (3, 20, 30)]
    assert [e.id for e in loaded.examples] == good  # no row merged into another, none lost
    assert all(e.sentence1 == f"Question number {e.id[1:]}?" for e in loaded.examples)
    assert all("\t" not in s and "\n" not in s for e in loaded.examples for s in (e.sentence1, e.sentence2))
    message = str(record[0].message)
    assert "skipped 3 malformed row(s)" in message
    for part in ("1 unbalanced quote (line 5)", "1 tab or line break inside a field (line 22)",
                 "1 label out of range (line 32)"):
        assert part in message, message


def test_columns_in_any_order(tmp_path):
    write(tmp_path, "sts-train.csv", ["similarity\tsentence2\tid\tsentence1\t", "2.5\tb\tq1\ta\t7"])
    assert load_task("sts", "train", tmp_path).examples == [PairExample("q1", "a", "b", 2.5)]


@pytest.mark.parametrize("task,split,header,rows,expected_lines", [
    # wrong label: out of range, not a number, missing, not an integer
    ("sst", "train", "\tid\tsentence\tsentiment",
     ["0\ts1\tgood\t3", "1\ts2\tbad\t5", "2\ts3\tugly\tabc", "3\ts4\tmeh\t", "4\ts5\tok\t2.5",
      "5\ts6\tfine\t4.0"],
     [3, 4, 5, 6]),
    ("cfimdb", "dev", "\tid\tsentence\tsentiment",
     ["0\tc1\tgood\t1", "1\tc2\tbad\t2", "2\tc3\tbad\t-1"], [3, 4]),
    ("quora", "train", "\tid\tsentence1\tsentence2\tis_duplicate",
     ["0\tq1\ta\tb\t1.0", "1\tq2\ta\tb\t2.0", "2\tq3\ta\tb\tnan", "3\tq4\ta\tb\t0.0"], [3, 4]),
    ("sts", "dev", "\tid\tsentence1\tsentence2\tsimilarity",
     ["0\tt1\ta\tb\t5.0", "1\tt2\ta\tb\t5.01", "2\tt3\ta\tb\t-0.5", "3\tt4\ta\tb\tinf",
      "4\tt5\ta\tb\t0"], [3, 4, 5]),
    # empty sentence / id (whitespace only counts as empty)
    ("sst", "dev", "\tid\tsentence\tsentiment", ["0\ts1\t   \t1", "1\t\tgood\t1", "2\ts3\tgood\t1"], [2, 3]),
    # wrong field count: too few, too many, and an unbalanced quote swallowing the next fields
    ("sts", "train", "\tid\tsentence1\tsentence2\tsimilarity",
     ["0\tt1\ta\tb", "1\tt2\ta\tb\t1.0\textra", "2\tt3\ta\tb\t1.0"], [2, 3]),
    # test split: no label column needed, labels None
    ("sst", "test", "0\t\tid\tsentence", ["1\t0.0\tx1\t hello ", "2\t1.0\tx2\t", "3\t2.0\tx3"], [3, 4]),
])
def test_malformed_rows_are_skipped(tmp_path, task, split, header, rows, expected_lines):
    write(tmp_path, DATA_FILES[task][split], [header, *rows])
    with pytest.warns(MalformedRowWarning, match=DATA_FILES[task][split]) as record:
        loaded = load_task(task, split, tmp_path)
    assert [line for line, _ in loaded.skipped] == expected_lines
    message = str(record[0].message)
    assert f"skipped {len(expected_lines)} malformed row(s)" in message
    # every reason is counted in the report, not only the first
    assert sum(loaded.skip_counts().values()) == len(expected_lines)
    for kind, n in loaded.skip_counts().items():
        assert f"{n} {kind} (line" in message, message
    assert len(loaded) + len(loaded.skipped) <= len(rows)
    if split == "test":
        assert all(ex.label is None for ex in loaded)


def test_unbalanced_quote_at_the_end_keeps_the_rows_after_it(tmp_path):
    write(tmp_path, "ids-sst-dev.csv", [
        "\tid\tsentence\tsentiment",
        "0\ts1\tfine\t4",
        '1\ts2\t"never closed\t1',  # line 3: csv would run this quote to the end of the file
        "2\ts3\tkept\t2",
        "3\ts4\tkept too\t3",
    ])
    loaded = load_task("sst", "dev", tmp_path, warn=False)
    assert [ex.id for ex in loaded] == ["s1", "s3", "s4"]
    assert [line for line, _ in loaded.skipped] == [3] and loaded.skipped_kinds == ["unbalanced quote"]


def test_warning_lists_first_ten_lines(tmp_path):
    rows = [f"{i}\ts{i}\tx\t9" for i in range(12)]  # label 9: out of range
    write(tmp_path, "ids-sst-train.csv", ["\tid\tsentence\tsentiment", *rows])
    with pytest.warns(MalformedRowWarning) as record:
        loaded = load_task("sst", "train", tmp_path)
    assert len(loaded) == 0 and len(loaded.skipped) == 12
    expected = "skipped 12 malformed row(s) at line(s) 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ..."
    assert expected in str(record[0].message)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ids-sst-dev.csv"):
        load_task("sst", "dev", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        load_file(tmp_path / "nothing.csv", "sts", "train")


def test_missing_data_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_task("sts", "train", tmp_path / "no_data_here")
    message = str(info.value)
    assert "no_data_here" in message and "does not exist" in message and "quora-train.csv" in message


def test_default_data_dir_is_relative_data(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", "sts-test-student.csv", ["\tid\tsentence1\tsentence2", "0\tz1\ta\tb"])
    monkeypatch.chdir(tmp_path)
    assert load_task("sts", "test").examples == [PairExample("z1", "a", "b", None)]


def test_missing_column(tmp_path):
    write(tmp_path, "ids-sst-train.csv", ["\tid\tsentence\tlabel", "0\ts1\tgood\t3"])
    with pytest.raises(ValueError) as info:
        load_task("sst", "train", tmp_path)
    message = str(info.value)
    assert "ids-sst-train.csv" in message and "'sentiment'" in message
    assert "columns found: '', 'id', 'sentence', 'label'" in message


def test_empty_file(tmp_path):
    write(tmp_path, "sts-dev.csv", [])
    with pytest.raises(ValueError, match="empty"):
        load_task("sts", "dev", tmp_path)


def test_unknown_task_or_split(tmp_path):
    with pytest.raises(ValueError, match="sst, quora, sts, cfimdb"):
        load_task("squad", "train", tmp_path)
    with pytest.raises(ValueError, match="train, dev, test"):
        load_task("sst", "validation", tmp_path)


def test_file_table_covers_every_task_and_split():
    assert set(DATA_FILES) == set(TASKS)
    assert all(set(files) == set(SPLITS) for files in DATA_FILES.values())
    assert all(files["test"].endswith("-test-student.csv") for files in DATA_FILES.values())
