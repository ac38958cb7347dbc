"""The SimCSE stage's pieces without DeepSpeed: its data, metrics, pooling and config checks.
The stage itself (2 ranks vs 1 process, gathered negatives, export) is in test_training.py."""
from __future__ import annotations

import math
import random

import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.heads import mean_pool
from train.config import ConfigError, SimCSEConfig, TrainConfig, from_dict
from train.data import load_task
from train.simcse import (SentenceEncoder, average_ranks, gather_rows, pearson, spearman,
                          sup_triples, unsup_sentences)


def test_unsup_sentences_are_every_distinct_training_sentence(data_dir):
    sentences = unsup_sentences(data_dir, warn=False)
    expected = set()
    for task in ("sst", "quora", "sts"):
        for e in load_task(task, "train", data_dir, warn=False).examples:
            expected |= {e.sentence} if task == "sst" else {e.sentence1, e.sentence2}
    assert len(sentences) == len(set(sentences)) == len(expected)
    assert set(sentences) == expected
    subset = unsup_sentences(data_dir, seed=1, limit=500, warn=False)
    assert len(subset) == 500 and set(subset) <= expected
    assert subset == unsup_sentences(data_dir, seed=1, limit=500, warn=False)  # seeded
    assert subset != unsup_sentences(data_dir, seed=2, limit=500, warn=False)


def test_sup_triples_positives_and_hard_negatives(data_dir):
    triples, counts = sup_triples(data_dir, seed=0, sts_threshold=4.0, warn=False)
    quora = load_task("quora", "train", data_dir, warn=False).examples
    sts = load_task("sts", "train", data_dir, warn=False).examples
    positives = {(e.sentence1, e.sentence2) for e in quora if e.label == 1}
    positives |= {(e.sentence1, e.sentence2) for e in sts if e.label >= 4.0}
    non_duplicates = [e for e in quora if e.label == 0]
    negatives = {s for e in non_duplicates for s in (e.sentence1, e.sentence2)}
    assert {(t.anchor, t.positive) for t in triples} == positives
    assert counts["quora_positives"] == sum(e.label == 1 for e in quora)
    assert counts["sts_positives"] == sum(e.label >= 4.0 for e in sts)
    assert counts["triples"] == len(triples) == counts["quora_positives"] + counts["sts_positives"]
    assert all(t.negative in negatives and t.negative not in (t.anchor, t.positive) for t in triples)
    # a pair whose anchor has a non-duplicate partner gets that partner as its hard negative
    partners = {}
    for e in non_duplicates:
        partners.setdefault(e.sentence1, set()).add(e.sentence2)
        partners.setdefault(e.sentence2, set()).add(e.sentence1)
    matched = [t for t in triples if t.anchor in partners or t.positive in partners]
    assert len(matched) == counts["matched_negatives"] > 0
    assert all(t.negative in partners.get(t.anchor, set()) | partners.get(t.positive, set()) for t in matched)
    # a higher threshold keeps fewer STS pairs; limits are seeded subsets
    _, c5 = sup_triples(data_dir, sts_threshold=5.0, warn=False)
    assert c5["sts_positives"] == sum(e.label >= 5.0 for e in sts) < counts["sts_positives"]
    some, _ = sup_triples(data_dir, seed=0, limit=100, warn=False)
    assert len(some) == 100 and set(some) < set(triples)
    assert some == sup_triples(data_dir, seed=0, limit=100, warn=False)[0]
    assert some != sup_triples(data_dir, seed=1, limit=100, warn=False)[0]


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    assert average_ranks([3.0]).tolist() == [1.0]


def test_spearman_and_pearson():
    rng = random.Random(0)
    x = [rng.random() for _ in range(50)]
    assert spearman(x, [math.exp(5 * v) for v in x]) == pytest.approx(1.0, abs=1e-12)  # monotonic
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0, abs=1e-12)
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0, abs=1e-12)
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    a, b = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert spearman(a, b) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # ties: the Pearson correlation of the average ranks, by hand
    ra, rb = [1, 2, 3, 4], [1.5, 1.5, 3, 4]
    ma, mb = 2.5, 2.5
    num = sum((p - ma) * (q - mb) for p, q in zip(ra, rb))
    den = math.sqrt(sum((p - ma) ** 2 for p in ra) * sum((q - mb) ** 2 for q in rb))
    assert spearman([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(num / den)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # a constant: no correlation, not NaN


def test_gather_rows_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_rows(x) is x


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_encoder_pools_like_the_multitask_heads(pooling):
    torch.manual_seed(0)
    bert = BertModel(BertConfig.preset("debug")).eval()
    enc = SentenceEncoder(bert, pooling).eval()
    ids = torch.randint(5, 200, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    types = torch.zeros_like(ids)
    out = bert(ids, attention_mask=mask, token_type_ids=types)
    expected = out.pooler_output if pooling == "cls" else mean_pool(out.last_hidden_state, mask)
    torch.testing.assert_close(enc(ids, mask, types), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooling"):
        SentenceEncoder(bert, "max")


@pytest.mark.parametrize("changes, message", [
    ({"temperature": 0.0}, "simcse.temperature must be > 0"),
    ({"global_batch": 1}, "simcse.global_batch must be >= 2"),
    ({"mode": "supervised"}, "simcse.mode must be one of"),
    ({"max_steps": 0}, "simcse.max_steps must be >= 1"),
    ({"sts_threshold": 6}, "simcse.sts_threshold must lie in [0, 5]"),
    ({"lr": -1}, "simcse.lr must be > 0"),
])
def test_simcse_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"simcse": changes})
    assert message in str(e.value)


def test_simcse_deepspeed_config_has_one_forward_per_rank():
    cfg = from_dict(TrainConfig, {"simcse": {"enabled": True, "global_batch": 96},
                                  "deepspeed": {"zero_stage": 2, "global_batch": 32,
                                                "micro_batch_per_device": 8, "monitor_csv": True}})
    ds = cfg.simcse_deepspeed_config(4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (96, 24, 1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and "csv_monitor" not in ds
    with pytest.raises(ConfigError, match="simcse.global_batch \\(96\\) is not a multiple of the world size \\(5\\)"):
        SimCSEConfig(global_batch=96).per_rank_batch(5)
