"""BERT model configuration: one dataclass, HF ``config.json`` in and out, and presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# HF names of the GELU variants, mapped to torch's ``approximate`` argument.
GELU_VARIANTS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary (bert-base-uncased's)
    hidden_size: int = 768  # width of every token vector
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # heads per layer; hidden_size must divide by it
    intermediate_size: int = 3072  # feed-forward width
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # token types (segment A / B)
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and on each sub-layer's output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention probabilities
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT uses 1e-12, not torch's 1e-5)
    hidden_act: Literal["gelu", "gelu_new", "gelu_pytorch_tanh"] = "gelu"  # erf GELU or tanh
    pad_token_id: int = 0  # id of [PAD]
    initializer_range: float = 0.02  # std of the normal init for weights trained from scratch
    # run the layers on the real tokens only when a batch holds padding (minBERT's own field:
    # transformers ignores it; a config.json without it loads as True)
    unpad: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.unpad, bool):
            raise ValueError(f"BertConfig.unpad must be true or false, got {self.unpad!r}")
        if self.hidden_act not in GELU_VARIANTS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"choose one of {sorted(GELU_VARIANTS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        """``"none"`` (exact erf) or ``"tanh"``, as torch and ``kernels.bias_gelu`` name them."""
        return GELU_VARIANTS[self.hidden_act]

    def replace(self, **changes: Any) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size")

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "BertConfig":
        """Build from a HF BERT ``config.json`` dict; unknown HF fields are ignored."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{source}: model_type is {model_type!r}; only 'bert' checkpoints load here")
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"{source}: position_embedding_type {pos_type!r} is not supported "
                             "(only 'absolute')")
        missing = [f for f in cls.REQUIRED_HF_FIELDS if f not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(model_type="bert", architectures=["BertModel"], position_embedding_type="absolute")
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    @classmethod
    def preset(cls, name: str) -> "BertConfig":
        """``bert-base``, ``minilm-l6`` (the embedded checkpoint) or ``debug`` (tiny, for tests)."""
        if name not in PRESETS:
            raise ValueError(f"unknown BertConfig preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, BertConfig] = {
    "bert-base": BertConfig(),
    "minilm-l6": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536),
    # head_dim 32 (the smallest the attention kernel takes); odd FFN width and vocabulary on purpose
    "debug": BertConfig(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=97, max_position_embeddings=64),
}
