"""minBERT: the BERT encoder built on the ``kernels`` package.

Every piece of math a fused kernel replaces goes through ``kernels``: self-attention
(``kernels.attention``: key-padding mask, dropout on the probabilities), the sub-layer closings
``LayerNorm(dropout(dense(h)) + h)`` (``kernels.layer_norm`` with residual and dropout) and the
feed-forward ``GELU(x W^T + b)`` (``kernels.bias_gelu``). Module and parameter names follow
HF ``transformers.BertModel`` so its checkpoints load unchanged.

Unpadded execution (``BertConfig.unpad``, the default): when the attention mask holds padding,
the embeddings are looked up for the real tokens only (a ``Packing`` of the batch) and every
layer runs on (T, hidden) rows, attention through ``kernels.attention_varlen``; no GEMM,
LayerNorm or GELU sees a pad token. The padded (B, L, hidden) shape is rebuilt only when a caller
reads ``last_hidden_state`` or asks for ``hidden_states``; the pooler takes the [CLS] rows
directly. Real tokens get the same values either way (within rounding); padding positions of
``last_hidden_state`` are zeros when unpadded (padded, they hold vectors nobody should use).
"""
from __future__ import annotations

import typing

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import BertConfig
from .packing import Packing


class BertOutput:
    """What ``BertModel`` returns.

    Attributes:
        pooler_output: (B, hidden), tanh(dense([CLS])).
        last_hidden_state: (B, L, hidden); built from ``packed`` on first access when unpadded.
        hidden_states: embeddings + each layer, (B, L, hidden), when asked for.
        packed: (T, hidden) last layer at the real tokens when the model ran unpadded, else None.
        packing: the ``Packing`` it ran on, or None.
    """

    def __init__(self, pooler_output: torch.Tensor, last_hidden_state: torch.Tensor | None = None,
                 hidden_states: tuple[torch.Tensor, ...] | None = None,
                 packed: torch.Tensor | None = None, packing: Packing | None = None):
        if (last_hidden_state is None) == (packed is None):
            raise ValueError("BertOutput needs exactly one of last_hidden_state and packed")
        self.pooler_output = pooler_output
        self.hidden_states = hidden_states
        self.packed, self.packing = packed, packing
        self._last = last_hidden_state

    @property
    def last_hidden_state(self) -> torch.Tensor:
        if self._last is None:
            self._last = self.packing.unpack(self.packed)
        return self._last


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = kernels.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                packing: Packing | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, hidden), or (T, hidden) for the real tokens given ``packing``."""
        if packing is not None:  # look up the real tokens only
            input_ids = packing.pack(input_ids)  # (T,)
            positions = packing.positions()  # (T,)
            token_type_ids = None if token_type_ids is None else packing.pack(token_type_ids)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # (word + token type) + position, in HF's order of additions
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

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                packing: Packing | None = None) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if packing is not None:  # x: (T, hidden), the real tokens of all sequences
            T = x.shape[0]
            q, k, v = (lin(x).view(T, self.num_heads, self.head_dim)
                       for lin in (self.query, self.key, self.value))  # (T, H, D)
            out = kernels.attention_varlen(q, k, v, packing.cu_seqlens, packing.max_seqlen,
                                           dropout_p=p)  # (T, H, D)
            return out.reshape(T, -1)
        B, L, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, hidden) -> (B, H, L, D)
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask,
                                dropout_p=p)  # (B, H, L, D)
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

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                packing: Packing | None = None) -> torch.Tensor:
        return self.output(self.self(x, key_padding_mask, packing), residual=x)


class BertIntermediate(nn.Module):
    """``GELU(x W^T + b)``: the matmul in torch, bias + GELU fused in ``kernels.bias_gelu``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a LoRA-adapted dense (minbert.lora) adds its update to the product before the fused op
        h = self.dense.matmul(x) if hasattr(self.dense, "matmul") else F.linear(x, self.dense.weight)
        return kernels.bias_gelu(h, self.dense.bias, self.approximate)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                packing: Packing | None = None) -> torch.Tensor:
        """x: (B, L, hidden), or (T, hidden) real-token rows given ``packing``."""
        a = self.attention(x, key_padding_mask, packing)
        return self.output(self.intermediate(a), residual=a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows))  # (B, hidden) from the (B, hidden) [CLS] rows


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
        packing: Packing | None = None,
        num_layers: int | None = None,
        extra_layers: "list[nn.Module] | nn.ModuleList" = (),
        perturb: "typing.Callable[[torch.Tensor], torch.Tensor] | None" = None,
    ) -> BertOutput:
        """Encode a batch.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1/True for real tokens, 0/False for padding; None = no padding.
            token_type_ids: (B, L) segment ids; None = all zeros.
            output_hidden_states: also return the embeddings and every layer's output.
            packing: ``Packing.from_mask(attention_mask)``, computed by the caller (e.g. on the
                host by the data pipeline, so the forward reads nothing back from the device);
                None: computed here when the model runs unpadded (one host read on a GPU).
            num_layers: run only the first ``num_layers`` encoder layers (0: the embeddings);
                None: all. The layers above are not computed.
            extra_layers: ``BertLayer``s run after them (a task head's own layers), before the
                pooler; their outputs are part of ``hidden_states``.
            perturb: applied to the embeddings' output before the first layer (SMART's
                adversarial noise on the input embeddings, ``train.smart``).
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
        if packing is not None and (packing.batch, packing.length) != (B, L):
            raise ValueError(f"packing describes a {(packing.batch, packing.length)} batch, "
                             f"input_ids is {(B, L)}")
        if packing is None and attention_mask is not None and self.config.unpad:
            packing = Packing.from_mask(attention_mask)
        if packing is not None and packing.total == B * L:  # no padding: no mask, nothing to pack
            attention_mask, packing = None, None
        if not self.config.unpad or (packing is not None and packing.total == 0):
            packing = None  # padded (all-padding batches too: nothing to run on)
        key_padding_mask = None if attention_mask is None else attention_mask.to(torch.bool)

        n = len(self.encoder.layer)
        if num_layers is not None and not (isinstance(num_layers, int) and 0 <= num_layers <= n):
            raise ValueError(f"num_layers must be an int in [0, {n}] or None, got {num_layers!r}")
        layers = [*self.encoder.layer[:n if num_layers is None else num_layers], *extra_layers]

        h = self.embeddings(input_ids, token_type_ids, packing)  # (B, L, hidden) or (T, hidden)
        if perturb is not None:
            h = perturb(h)
        states = [h] if output_hidden_states else None
        for layer in layers:
            h = layer(h, key_padding_mask, packing)
            if states is not None:
                states.append(h)
        if packing is None:
            return BertOutput(pooler_output=self.pooler(h[:, 0]), last_hidden_state=h,
                              hidden_states=tuple(states) if states is not None else None)
        return BertOutput(pooler_output=self.pooler(packing.first_rows(h)), packed=h, packing=packing,
                          hidden_states=None if states is None else tuple(packing.unpack(x) for x in states))

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
