"""Task heads for the CS224N multitask setting, on one shared BERT encoder.

  - ``sst``:   5-way sentiment classifier, cross-entropy.
  - ``quora``: paraphrase or not, one logit, binary cross-entropy.
  - ``sts``:   similarity in [0, 5], MSE on a regression output or on a scaled cosine.

Pair tasks come in two forms, chosen per task:
  - cross-encoder: one pass over ``[CLS] a [SEP] b [SEP]``, a linear head on the pooled vector;
  - bi-encoder: each sentence encoded alone into u, v; the head sees ``[u, v, |u-v|, u*v]``
    (``head="concat"``) or only ``cos(u, v)`` (``head="cosine"``).
Pooling: the [CLS] vector through BERT's pooler (``"cls"``), or the mean over real tokens
(on the packed rows when the encoder ran unpadded: the padded shape is never built).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .model import BertLayer, BertModel, BertOutput
from .packing import Packing

NUM_SENTIMENT_CLASSES = 5
STS_MAX = 5.0


@dataclass
class HeadSpec:
    form: Literal["cross", "bi"] = "cross"
    pooling: Literal["cls", "mean"] = "cls"
    head: Literal["concat", "cosine"] = "concat"
    # which encoder layer's hidden states feed the head: 0 = the embeddings, 1..L, -1 = the last;
    # the layers above it are not computed for this task
    layer: int = -1
    head_layers: int = 0  # transformer layers of the task's own after ``layer`` (0-3)
    head_init: Literal["copy", "random"] = "copy"  # copy: of the encoder layers after ``layer``


@dataclass
class MultitaskSpec:
    """What the heads look like; saved beside exported weights so a model reloads as trained."""

    tasks: dict[str, HeadSpec] = field(default_factory=dict)
    head_dropout: float = 0.1

    def to_dict(self) -> dict:
        return {"tasks": {k: asdict(v) for k, v in self.tasks.items()}, "head_dropout": self.head_dropout}

    @classmethod
    def from_dict(cls, d: dict) -> "MultitaskSpec":  # exports before layer/head_layers: defaults
        return cls(tasks={k: HeadSpec(**v) for k, v in d["tasks"].items()},
                   head_dropout=float(d.get("head_dropout", 0.1)))


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H), (B, L) -> (B, H): mean of the real tokens' vectors."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool(out: BertOutput, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, H) sentence vectors from an encoder output: the pooler (``"cls"``) or the mean of the
    real tokens (``"mean"``; on the packed rows when the encoder ran unpadded)."""
    if pooling == "cls":
        return out.pooler_output
    if isinstance(out, BertOutput) and out.packed is not None:
        return out.packing.mean_rows(out.packed)
    h = out.last_hidden_state
    if attention_mask is None:
        return h.mean(1)
    return mean_pool(h, attention_mask)


class MultitaskBert(nn.Module):
    """A ``BertModel`` with one head per task. ``forward(task, batch)`` returns the task's raw
    prediction: sst (B, 5) logits, quora (B,) logits, sts (B,) similarity in [0, 5] units."""

    def __init__(self, bert: BertModel, spec: MultitaskSpec):
        super().__init__()
        unknown = set(spec.tasks) - {"sst", "quora", "sts"}
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from sst, quora, sts")
        self.bert = bert
        self.spec = spec
        hidden = bert.config.hidden_size
        self.dropout = nn.Dropout(spec.head_dropout)
        self.heads = nn.ModuleDict()
        # the tasks' own transformer layers (HeadSpec.head_layers), trained at the encoder's rate
        self.head_layers = nn.ModuleDict()
        n = len(bert.encoder.layer)
        self._layer: dict[str, int] = {}
        for task, hs in spec.tasks.items():
            layer = n if hs.layer == -1 else hs.layer
            if not (isinstance(hs.layer, int) and 0 <= layer <= n):
                raise ValueError(f"{task}: layer must be -1 (the last) or in [0, {n}] (0 = the "
                                 f"embeddings), got {hs.layer!r}")
            if not 0 <= hs.head_layers <= 3:
                raise ValueError(f"{task}: head_layers must be in [0, 3], got {hs.head_layers}")
            if hs.head_init not in ("copy", "random"):
                raise ValueError(f"{task}: head_init must be 'copy' or 'random', got {hs.head_init!r}")
            self._layer[task] = layer
            if hs.head_layers == 0:
                continue
            if hs.head_init == "copy":
                if layer + hs.head_layers > n:
                    raise ValueError(f"{task}: head_init 'copy' takes the {hs.head_layers} encoder "
                                     f"layer(s) after layer {layer}, but the encoder has {n}")
                blocks = [copy.deepcopy(bert.encoder.layer[layer + i]) for i in range(hs.head_layers)]
            else:
                blocks = [BertLayer(bert.config) for _ in range(hs.head_layers)]
                for block in blocks:
                    block.apply(bert._init_weights)
            self.head_layers[task] = nn.ModuleList(blocks)
        for task, hs in spec.tasks.items():
            out = NUM_SENTIMENT_CLASSES if task == "sst" else 1
            if task == "sst" or hs.form == "cross":
                self.heads[task] = nn.Linear(hidden, out)
            elif hs.head == "concat":
                self.heads[task] = nn.Linear(4 * hidden, out)
            elif task == "sts":  # cosine, mapped to [0, 5] by a fixed affine map: no parameters
                self.heads[task] = nn.Identity()
            else:  # cosine: quora's logit is a learned affine map of cos(u, v)
                self.heads[task] = nn.Linear(1, 1)
                with torch.no_grad():
                    self.heads[task].weight.fill_(5.0)
                    self.heads[task].bias.zero_()
        for head in self.heads.values():
            if isinstance(head, nn.Linear) and head.in_features > 1:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    def embed(self, task: str, input_ids, attention_mask, token_type_ids,
              packing: Packing | None = None) -> torch.Tensor:
        """(B, L) token ids -> (B, H) pooled vector, pooled as the task's spec says."""
        extra = self.head_layers[task] if task in self.head_layers else ()
        out = self.bert(input_ids, attention_mask, token_type_ids, packing=packing,
                        num_layers=self._layer[task], extra_layers=extra)
        return pool(out, attention_mask, self.spec.tasks[task].pooling)

    def forward(self, task: str, input_ids, attention_mask, token_type_ids,
                input_ids_b=None, attention_mask_b=None, token_type_ids_b=None,
                packing: Packing | None = None, packing_b: Packing | None = None) -> torch.Tensor:
        """``packing`` / ``packing_b``: ``Packing.from_mask`` of the masks, computed by the data
        pipeline on the host (the encoder then reads nothing back from the device)."""
        if task not in self.heads:
            raise ValueError(f"task {task!r} has no head; heads: {list(self.heads)}")
        hs = self.spec.tasks[task]
        head = self.heads[task]
        if task == "sst" or hs.form == "cross":
            logits = head(self.dropout(self.embed(task, input_ids, attention_mask, token_type_ids,
                                                  packing)))
            return logits if task == "sst" else logits.squeeze(-1)
        if input_ids_b is None:
            raise ValueError(f"task {task!r} is a bi-encoder: it needs the second sentence's batch")
        u = self.embed(task, input_ids, attention_mask, token_type_ids, packing)
        v = self.embed(task, input_ids_b, attention_mask_b, token_type_ids_b, packing_b)
        if hs.head == "concat":
            return head(self.dropout(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))).squeeze(-1)
        cos = F.cosine_similarity(u.float(), v.float(), dim=-1)  # (B,)
        if task == "sts":
            return (cos + 1.0) * (STS_MAX / 2.0)  # [-1, 1] -> [0, 5]
        return head(cos.unsqueeze(-1).to(u.dtype)).squeeze(-1)

    @staticmethod
    def loss(task: str, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch: cross-entropy (sst), BCE on the logit (quora), MSE (sts)."""
        prediction = prediction.float()
        if task == "sst":
            return F.cross_entropy(prediction, labels.long())
        if task == "quora":
            return F.binary_cross_entropy_with_logits(prediction, labels.float())
        return F.mse_loss(prediction, labels.float())

    @staticmethod
    def decide(task: str, prediction: torch.Tensor) -> torch.Tensor:
        """Predictions as the CS224N files want them: class id, 0/1, similarity clipped to [0, 5]."""
        if task == "sst":
            return prediction.argmax(-1)
        if task == "quora":
            return (prediction > 0).long()
        return prediction.float().clamp(0.0, STS_MAX)
