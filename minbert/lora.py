"""Low-rank adapters (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685) on BERT's linear layers.

``apply_lora(bert, r, alpha, dropout, targets)`` replaces the chosen ``nn.Linear`` modules of every
encoder layer by ``LoRALinear``: the pretrained weight and bias are kept (same parameter names, so
checkpoints still load) and frozen, and the layer computes ``x W^T + b + s * dropout(x) A^T B^T``
with A (r, in) and B (out, r) trained, s = alpha / r. B starts at zero: the adapted model starts
as the pretrained one. ``merge_lora(state)`` folds the adapters into plain weights
(W + s * B A), so an export is an ordinary BERT directory that ``transformers`` loads.

Targets name modules inside ``BertLayer``: ``query``, ``key``, ``value`` (self-attention),
``attention.output.dense`` (attention output), ``intermediate.dense`` (feed-forward in; its bias
and GELU stay fused in ``kernels.bias_gelu``), ``output.dense`` (feed-forward out).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}


class LoRALinear(nn.Module):
    """``nn.Linear`` with a trainable low-rank update; ``weight`` and ``bias`` are the base layer's."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(base.weight.new_empty(r, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's weight
        # saved with the weights, so an export can be merged without the training config
        self.register_buffer("lora_scale", torch.tensor(float(alpha) / r))
        self.dropout_p = dropout

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * dropout(x) A^T B^T."""
        x = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale.to(x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T plus the update, without the bias (``BertIntermediate`` fuses the bias with GELU)."""
        return F.linear(x, self.weight) + self.delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.lora_A.shape[0]}, scale={float(self.lora_scale):g}")


def apply_lora(bert: nn.Module, r: int, alpha: float, dropout: float, targets: list[str]) -> int:
    """Wrap ``targets`` of every encoder layer of ``bert`` (a ``BertModel``) in ``LoRALinear``
    and freeze every other encoder parameter; returns the number of adapted layers."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list from {sorted(LORA_TARGETS)}, "
                         f"got {targets!r}")
    for p in bert.parameters():
        p.requires_grad_(False)
    count = 0
    for layer in bert.encoder.layer:
        for target in dict.fromkeys(targets):
            *path, name = LORA_TARGETS[target].split(".")
            parent = layer
            for part in path:
                parent = getattr(parent, part)
            base = getattr(parent, name)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"LoRA target {target!r} is a {type(base).__name__}, not a linear layer")
            setattr(parent, name, LoRALinear(base, r, alpha, dropout))
            count += 1
    return count


def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its weight (W + s * B A, computed in fp32
    and stored in W's dtype) and the ``lora_*`` entries removed; other entries unchanged."""
    merged = {k: v for k, v in state.items() if not k.rsplit(".", 1)[-1].startswith("lora_")}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len("lora_A")]
            weight = state[prefix + "weight"]
            delta = state[prefix + "lora_B"].float() @ state[key].float() * state[prefix + "lora_scale"].float()
            merged[prefix + "weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
