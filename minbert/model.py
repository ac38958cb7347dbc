"""minBERT: the BERT encoder built on the ``kernels`` package.

Every piece of math a fused kernel replaces goes through ``kernels``: self-attention
(``kernels.attention``: key-padding mask, dropout on the probabilities), the sub-layer closings
``LayerNorm(dropout(dense(h)) + h)`` (``kernels.layer_norm`` with residual and dropout) and the
feed-forward ``GELU(x W^T + b)`` (``kernels.bias_gelu``). Module and parameter names follow
HF ``transformers.BertModel`` so its checkpoints load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import BertConfig


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # (B, L, hidden)
    pooler_output: torch.Tensor  # (B, hidden): tanh(dense([CLS]))
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each layer, (B, L, hidden)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = kernels.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)
        # (word + token type) + position, in HF's order of additions: (B, L, hidden)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.LayerNorm(x, residual=self.position_embeddings(positions))
        return F.dropout(x, self.dropout_p, self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, hidden) -> (B, H, L, D)
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask,
                                dropout_p=self.dropout_p if self.training else 0.0)  # (B, H, L, D)
        return out.transpose(1, 2).reshape(B, L, -1)


class BertSelfOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)``; also the feed-forward's output block."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = kernels.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h), residual=residual, dropout_p=self.dropout_p)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, key_padding_mask), residual=x)


class BertIntermediate(nn.Module):
    """``GELU(x W^T + b)``: the matmul in torch, bias + GELU fused in ``kernels.bias_gelu``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, self.approximate)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, key_padding_mask)
        return self.output(self.intermediate(a), residual=a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, hidden) from [CLS]


class BertModel(nn.Module):
    """The BERT encoder with pooler; ``state_dict`` keys equal HF ``BertModel``'s."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BertOutput:
        """Encode a batch.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1/True for real tokens, 0/False for padding; None = no padding.
            token_type_ids: (B, L) segment ids; None = all zeros.
            output_hidden_states: also return the embeddings and every layer's output.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != (B, L):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, L)} like input_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_padding_mask = None if attention_mask is None else attention_mask.to(torch.bool)

        h = self.embeddings(input_ids, token_type_ids)
        states = [h] if output_hidden_states else None
        for layer in self.encoder.layer:
            h = layer(h, key_padding_mask)
            if states is not None:
                states.append(h)
        return BertOutput(last_hidden_state=h, pooler_output=self.pooler(h),
                          hidden_states=tuple(states) if states is not None else None)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        config_changes: dict | None = None) -> "BertModel":
        """Load an HF-format BERT directory; None loads the embedded all-MiniLM-L6-v2.

        ``config_changes`` overrides config fields that do not change shapes (e.g. dropout).
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, config_changes=config_changes)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers.BertModel`` loads."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, path)
