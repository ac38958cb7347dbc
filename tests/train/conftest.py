"""Fixtures of the training tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random BERT with the real vocabulary, saved in HF format with its tokenizer."""
    import torch  # here, not above: the root conftest picks the kernels device before minbert's imports

    from minbert import BertConfig, BertModel, Tokenizer

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(path)
    Tokenizer.from_pretrained().save_pretrained(path)
    return path
