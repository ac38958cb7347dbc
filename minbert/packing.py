"""Where the real tokens of a padded batch are: the index set minBERT runs unpadded on.

A ``Packing`` describes a right-padded (or any) (B, L) batch by the flat positions of its real
tokens, sequence after sequence (``indices``, T of them), the cumulative sequence lengths
(``cu_seqlens``, what ``kernels.attention_varlen`` takes) and the longest sequence. Built on the
host from the tokenizer's mask (``from_mask`` on a CPU mask, before the batch moves to the
device), it costs the model no device-to-host read at all; built from a mask already on an
accelerator it costs one (the sequence lengths), once per forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._utils import gather_rows, scatter_rows


@dataclass(frozen=True)
class Packing:
    indices: torch.Tensor  # (T,) int64: flat index b * L + l of each real token, in order
    cu_seqlens: torch.Tensor  # (B + 1,) int32: 0, l0, l0 + l1, ..., T
    first: torch.Tensor  # (B,) int64: packed row of each sequence's first token (clamped to T - 1)
    nonempty: torch.Tensor | None  # (B,) bool, False for sequences of no token; None: none empty
    max_seqlen: int  # the longest sequence (a host int: no device read to launch attention)
    batch: int  # B
    length: int  # L, the padded length

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packing":
        """From a (B, L) mask, 1/True for real tokens (any pattern, not only right padding).

        A CPU mask costs nothing on the device; a mask on an accelerator costs one host read
        (the (B,) lengths), and the index tensors are computed where the mask is.
        """
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, length), got shape "
                             f"{tuple(attention_mask.shape)}")
        B, L = attention_mask.shape
        mask = attention_mask.to(torch.bool)
        lengths = mask.sum(1, dtype=torch.int32)  # (B,)
        host = lengths.cpu()  # the one host read (a no-op for a CPU mask)
        total = int(host.sum())
        cu = torch.zeros(B + 1, dtype=torch.int32)
        torch.cumsum(host, 0, out=cu[1:])
        first = cu[:-1].to(torch.int64).clamp(max=max(total - 1, 0))
        empty = bool((host == 0).any())
        device = attention_mask.device
        indices = torch.nonzero_static(mask.reshape(-1), size=total).squeeze(1)  # no sync
        return cls(indices=indices, cu_seqlens=cu.to(device), first=first.to(device),
                   nonempty=(host > 0).to(device) if empty else None,
                   max_seqlen=int(host.max()) if B else 0, batch=B, length=L)

    @property
    def total(self) -> int:
        """T, the number of real tokens (tensor metadata: no device read)."""
        return self.indices.shape[0]

    @property
    def padded_tokens(self) -> int:
        return self.batch * self.length

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Packing":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Packing(move(self.indices), move(self.cu_seqlens), move(self.first),
                       move(self.nonempty), self.max_seqlen, self.batch, self.length)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (T, ...): the real tokens' rows."""
        return gather_rows(x.reshape(self.batch * self.length, *x.shape[2:]), self.indices)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), zeros at the padding."""
        out = scatter_rows(x, self.indices, self.batch * self.length)
        return out.view(self.batch, self.length, *x.shape[1:])

    def positions(self) -> torch.Tensor:
        """(T,) int64 position of each real token in its padded row (what BERT's position
        embedding sees: the padded layout's, as in the padded model)."""
        return self.indices % self.length

    def first_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, ...): each sequence's first token ([CLS] under right padding); zeros for a
        sequence of no token."""
        out = gather_rows(x, self.first) if self.nonempty is None else x.index_select(0, self.first)
        if self.nonempty is not None:
            out = out * self.nonempty.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return out

    def mean_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (B, H): the mean of each sequence's rows (zeros for a sequence of no token).

        One (B, T) x (T, H) GEMM with a 0/1 membership matrix: deterministic (no atomics), and
        the sum accumulates in fp32 like ``sum`` over a padded batch does.
        """
        seq = torch.div(self.indices, self.length, rounding_mode="floor")  # (T,) sequence ids
        member = seq[None, :] == torch.arange(self.batch, device=x.device)[:, None]  # (B, T)
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).clamp_min(1)  # (B,)
        return (member.to(x.dtype) @ x) / lengths[:, None].to(x.dtype)
