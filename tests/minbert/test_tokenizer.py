"""minbert.tokenizer: ids identical to transformers' BertTokenizerFast on the CS224N data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minbert.tokenizer import BatchEncoding, Tokenizer
from train.data import load_task

transformers = pytest.importorskip("transformers")

FIELDS = ("input_ids", "token_type_ids", "attention_mask")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def hf(embedded_dir):
    return transformers.BertTokenizerFast.from_pretrained(str(embedded_dir))


@pytest.fixture(scope="module")
def sst_dev(data_dir) -> list[str]:
    return [ex.sentence for ex in load_task("sst", "dev", data_dir)]


@pytest.fixture(scope="module")
def quora_dev(data_dir) -> tuple[list[str], list[str]]:
    examples = load_task("quora", "dev", data_dir).examples
    return [ex.sentence1 for ex in examples], [ex.sentence2 for ex in examples]


@pytest.fixture(scope="module")
def vocab_only_dir(embedded_dir, tmp_path_factory) -> Path:
    """The embedded checkpoint's tokenizer without tokenizer.json: built from vocab.txt."""
    directory = tmp_path_factory.mktemp("vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        shutil.copy(embedded_dir / name, directory / name)
    return directory


def assert_same(ours: BatchEncoding, theirs) -> None:
    for name in FIELDS:
        a, b = ours[name], theirs[name]
        assert a.dtype == torch.long, name
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        rows = (a != b).any(1).nonzero().flatten().tolist() if a.shape == b.shape else []
        assert torch.equal(a, b.to(torch.long)), f"{name} differs in rows {rows[:10]}"


def hf_encode(hf, texts, pairs=None, max_length=512):
    return hf(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


# ---------------------------------------------------------------------- parity with transformers
def test_embedded_defaults(tok):
    assert tok.max_length == 512  # model_max_length and max_position_embeddings of the checkpoint
    assert tok.vocab_size == 30522
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)


@pytest.mark.parametrize("max_length", [None, 16])
def test_sst_dev_matches_hf(tok, hf, sst_dev, max_length):
    assert len(sst_dev) == 1101
    ours = tok(sst_dev, max_length=max_length)
    assert_same(ours, hf_encode(hf, sst_dev, max_length=max_length or 512))
    assert (ours.input_ids[:, 0] == tok.cls_token_id).all()
    assert (ours.token_type_ids == 0).all()
    if max_length:
        assert ours.input_ids.shape[1] == max_length


@pytest.mark.parametrize("max_length", [None, 16])
def test_quora_dev_pairs_match_hf(tok, hf, quora_dev, max_length):
    first, second = quora_dev
    assert len(first) == 2000
    ours = tok(first, second, max_length=max_length)
    assert_same(ours, hf_encode(hf, first, second, max_length=max_length or 512))
    lengths = ours.attention_mask.sum(1)
    # Segment B starts after the first [SEP]: token types are 0...0 1...1 then 0 on padding.
    assert ((ours.input_ids == tok.sep_token_id) & (ours.attention_mask == 1)).sum(1).eq(2).all()
    assert ((ours.token_type_ids == 1) <= (ours.attention_mask == 1)).all()
    if max_length:
        assert lengths.max() == max_length
        assert ours.input_ids.shape[1] == max_length


def test_small_max_length_truncates_both_segments(tok, hf, quora_dev):
    # (Truncating to a few tokens is slow in the tokenizers library itself: 200 pairs only.)
    first, second = quora_dev[0][:200], quora_dev[1][:200]
    assert_same(tok(first, second, max_length=5), hf_encode(hf, first, second, max_length=5))

    a = "the quick brown fox jumps over the lazy dog again and again"
    b = "a short one"
    ours = tok([a, b], [b, a], max_length=12)
    assert_same(ours, hf_encode(hf, [a, b], [b, a], max_length=12))
    # longest_first trims the longer sentence first: the short one (3 tokens) survives whole.
    assert tok.decode(ours.input_ids[0]) == "the quick brown fox jumps over a short one"
    assert tok.decode(ours.input_ids[1]) == "a short one the quick brown fox jumps over"
    both_long = tok(a, a, max_length=12)
    assert both_long.token_type_ids.tolist() == [[0] * 6 + [1] * 6]  # 4 + 4 tokens, then [SEP]s


def test_vocab_txt_only_matches(vocab_only_dir, hf, sst_dev, quora_dev):
    tok = Tokenizer.from_pretrained(vocab_only_dir)
    assert tok.max_length == 512 and tok.vocab_size == 30522
    assert_same(tok(sst_dev), hf_encode(hf, sst_dev))
    first, second = quora_dev
    assert_same(tok(first, second), hf_encode(hf, first, second))
    assert_same(tok(first, second, max_length=16), hf_encode(hf, first, second, max_length=16))
    assert_same(tok(["[CLS] Hello [SEP] wörld [MASK]"]), hf_encode(hf, ["[CLS] Hello [SEP] wörld [MASK]"]))


def test_tokenizer_json_truncation_and_padding_are_dropped(tok, hf):
    # The embedded tokenizer.json asks for truncation and fixed padding at 128 tokens.
    long_text = "word " * 300
    ours = tok([long_text, "short"])
    assert ours.input_ids.shape == (2, 302)
    assert_same(ours, hf_encode(hf, [long_text, "short"]))
    assert tok("short").input_ids.shape == (1, 3)
    assert tok(long_text * 2).input_ids.shape == (1, 512)


# ---------------------------------------------------------------------- API
def test_batch_encoding_api(tok):
    batch = tok("Hello world!")
    assert batch["input_ids"] is batch.input_ids
    assert batch.input_ids.tolist() == [[101, 7592, 2088, 999, 102]]
    assert set(batch) == set(FIELDS) and len(batch) == 3
    assert dict(**batch).keys() == set(FIELDS)
    moved = batch.to("cpu")
    assert isinstance(moved, BatchEncoding) and torch.equal(moved.attention_mask, batch.attention_mask)
    with pytest.raises(KeyError):
        batch["labels"]

    lists = tok(["a b c", "d"], return_tensors=False)
    assert lists.input_ids == [[101, 1037, 1038, 1039, 102], [101, 1040, 102, 0, 0]]
    assert lists.attention_mask == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert lists.to("cpu").input_ids == lists.input_ids

    empty = tok([])
    assert empty.input_ids.shape == (0, 0) and empty.input_ids.dtype == torch.long


def test_decode(tok):
    batch = tok(["Hello, World!", "x"], ["Second one", "y"])
    assert tok.decode(batch.input_ids[0]) == "hello, world! second one"
    with_specials = tok.decode(batch.input_ids[1].tolist(), skip_special_tokens=False)
    assert with_specials == "[CLS] x [SEP] y [SEP] [PAD] [PAD] [PAD] [PAD]"
    assert tok.batch_decode(batch.input_ids) == ["hello, world! second one", "x y"]
    assert tok.tokenize("Tokenization") == ["token", "##ization"]


def test_max_length_from_config(vocab_only_dir, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(vocab_only_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    assert Tokenizer.from_pretrained(tmp_path).max_length == 128
    assert Tokenizer.from_pretrained(tmp_path, max_length=64).max_length == 64
    (tmp_path / "config.json").unlink()
    assert Tokenizer.from_pretrained(tmp_path).max_length == 512  # model_max_length only


# ---------------------------------------------------------------------- errors
def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        Tokenizer.from_pretrained(missing)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "vocab.txt" in message


def test_pairs_length_mismatch(tok):
    with pytest.raises(ValueError, match="pairs has 1 .* texts has 2"):
        tok(["a", "b"], ["c"])


def test_bad_inputs(tok):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["a", 3])
    with pytest.raises(ValueError, match="at least 4"):
        tok("a", "b", max_length=3)  # the tokenizers library would silently not truncate
    with pytest.raises(ValueError, match="at least 3"):
        tok("a", max_length=2)


# ---------------------------------------------------------------------- saving
def test_save_pretrained_round_trip(tok, quora_dev, tmp_path):
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "vocab.txt", "tokenizer_config.json"}
    assert json.loads((out / "tokenizer.json").read_text())["padding"] is None

    first, second = quora_dev[0][:500], quora_dev[1][:500]
    expected = tok(first, second, max_length=32)
    reloaded_hf = transformers.BertTokenizerFast.from_pretrained(str(out))
    assert_same(expected, hf_encode(reloaded_hf, first, second, max_length=32))
    assert reloaded_hf.model_max_length == 512

    ours_again = Tokenizer.from_pretrained(out)
    assert ours_again.max_length == 512
    assert_same(expected, ours_again(first, second, max_length=32))

    (out / "tokenizer.json").unlink()  # vocab.txt + tokenizer_config.json alone still load
    assert_same(expected, Tokenizer.from_pretrained(out)(first, second, max_length=32))
