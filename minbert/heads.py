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
    # bi-encoder concat heads: what the head sees of u, v (any of u, v, abs_diff, prod, cos)
    features: list[str] = field(default_factory=lambda: ["u", "v", "abs_diff", "prod"])
    # sts: the head's output scale ("0-5": similarity units; "0-1": the fraction of 5, trained
    # against gold / 5) and "sigmoid" to squash it into [0, 1] (with "0-1")
    target: Literal["0-5", "0-1"] = "0-5"
    output: Literal["linear", "sigmoid"] = "linear"


@dataclass
class MultitaskSpec:
    """What the heads look like; saved beside exported weights so a model reloads as trained."""

    tasks: dict[str, HeadSpec] = field(default_factory=dict)
    head_dropout: float = 0.1
    # quora and sts: one projection (hidden units, tanh) shared before their own output layers
    shared_pair_head: bool = False

    def to_dict(self) -> dict:
        return {"tasks": {k: asdict(v) for k, v in self.tasks.items()}, "head_dropout": self.head_dropout,
                "shared_pair_head": self.shared_pair_head}

    @classmethod
    def from_dict(cls, d: dict) -> "MultitaskSpec":  # older exports lack the newer keys: defaults
        return cls(tasks={k: HeadSpec(**v) for k, v in d["tasks"].items()},
                   head_dropout=float(d.get("head_dropout", 0.1)),
                   shared_pair_head=bool(d.get("shared_pair_head", False)))


PAIR_FEATURES = ("u", "v", "abs_diff", "prod", "cos")


def output_problem(task: str, features: list[str], target: str, output: str) -> str | None:
    """What is wrong with a head's ``features`` / ``target`` / ``output`` (None: nothing)."""
    bad = [f for f in features if f not in PAIR_FEATURES]
    if bad or not features or len(set(features)) != len(features):
        return f"features must be distinct names from {list(PAIR_FEATURES)}, got {features!r}"
    if task != "sts" and (target, output) != ("0-5", "linear"):
        return "target and .output apply to sts only"
    if output == "sigmoid" and target != "0-1":
        return "output 'sigmoid' needs target '0-1' (a sigmoid gives [0, 1])"
    return None


def pair_features(u: torch.Tensor, v: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(B, H) u, v -> (B, F): the named features side by side (cos: one column)."""
    parts = []
    for name in names:
        if name == "u":
            parts.append(u)
        elif name == "v":
            parts.append(v)
        elif name == "abs_diff":
            parts.append((u - v).abs())
        elif name == "prod":
            parts.append(u * v)
        else:
            parts.append(F.cosine_similarity(u.float(), v.float(), dim=-1).to(u.dtype).unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def _head_inputs(task: str, hs: HeadSpec, hidden: int) -> int:
    """Width of what the task's output layer sees (before a shared pair projection)."""
    if task == "sst" or hs.form == "cross":
        return hidden
    return sum(1 if f == "cos" else hidden for f in hs.features)


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
            problem = output_problem(task, hs.features, hs.target, hs.output)
            if problem:
                raise ValueError(f"{task}: {problem}")
        pair = [t for t in ("quora", "sts") if t in spec.tasks and not
                (spec.tasks[t].form == "bi" and spec.tasks[t].head == "cosine")]
        if spec.shared_pair_head:
            widths = {_head_inputs(t, spec.tasks[t], hidden) for t in pair}
            if len(pair) != 2 or len(widths) != 1:
                raise ValueError("shared_pair_head needs quora and sts both enabled with heads of "
                                 "one input width (the same form, and the same features for "
                                 "bi-encoder concat heads)")
            self.shared_pair = nn.Sequential(nn.Linear(widths.pop(), hidden), nn.Tanh())
        for task, hs in spec.tasks.items():
            out = NUM_SENTIMENT_CLASSES if task == "sst" else 1
            width = hidden if spec.shared_pair_head and task in pair else _head_inputs(task, hs, hidden)
            if task == "sst" or hs.form == "cross" or hs.head == "concat":
                self.heads[task] = nn.Linear(width, out)
            elif task == "sts":  # cosine, mapped to [0, 5] by a fixed affine map: no parameters
                self.heads[task] = nn.Identity()
            else:  # cosine: quora's logit is a learned affine map of cos(u, v)
                self.heads[task] = nn.Linear(1, 1)
                with torch.no_grad():
                    self.heads[task].weight.fill_(5.0)
                    self.heads[task].bias.zero_()
        linears = [*self.heads.values(), *(self.shared_pair if spec.shared_pair_head else [])]
        for head in linears:
            if isinstance(head, nn.Linear) and head.in_features > 1:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    def embed(self, task: str, input_ids, attention_mask, token_type_ids,
              packing: Packing | None = None, perturb=None) -> torch.Tensor:
        """(B, L) token ids -> (B, H) pooled vector, pooled as the task's spec says. ``perturb``:
        applied to the input embeddings (``BertModel.forward``)."""
        extra = self.head_layers[task] if task in self.head_layers else ()
        out = self.bert(input_ids, attention_mask, token_type_ids, packing=packing,
                        num_layers=self._layer[task], extra_layers=extra, perturb=perturb)
        return pool(out, attention_mask, self.spec.tasks[task].pooling)

    def forward(self, task: str, input_ids, attention_mask, token_type_ids,
                input_ids_b=None, attention_mask_b=None, token_type_ids_b=None,
                packing: Packing | None = None, packing_b: Packing | None = None,
                perturb=None) -> torch.Tensor:
        """``packing`` / ``packing_b``: ``Packing.from_mask`` of the masks, computed by the data
        pipeline on the host (the encoder then reads nothing back from the device)."""
        if task not in self.heads:
            raise ValueError(f"task {task!r} has no head; heads: {list(self.heads)}")
        hs = self.spec.tasks[task]
        if task == "sst" or hs.form == "cross":
            x = self.embed(task, input_ids, attention_mask, token_type_ids, packing, perturb)
        else:
            if input_ids_b is None:
                raise ValueError(f"task {task!r} is a bi-encoder: it needs the second sentence's batch")
            u = self.embed(task, input_ids, attention_mask, token_type_ids, packing, perturb)
            v = self.embed(task, input_ids_b, attention_mask_b, token_type_ids_b, packing_b, perturb)
            if hs.head == "cosine":
                cos = F.cosine_similarity(u.float(), v.float(), dim=-1)  # (B,)
                if task == "sts":
                    return (cos + 1.0) * (STS_MAX / 2.0)  # [-1, 1] -> [0, 5]
                return self.heads[task](cos.unsqueeze(-1).to(u.dtype)).squeeze(-1)
            x = pair_features(u, v, hs.features)
        x = self.dropout(x)
        if self.spec.shared_pair_head and task in ("quora", "sts"):
            x = self.shared_pair(x)
        out = self.heads[task](x)
        if task == "sst":
            return out
        out = out.squeeze(-1)
        if task == "sts" and hs.target == "0-1":  # the head's scale -> similarity units
            out = (torch.sigmoid(out) if hs.output == "sigmoid" else out) * STS_MAX
        return out

    @staticmethod
    def loss(task: str, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch: cross-entropy (sst), BCE on the logit (quora), MSE (sts)."""
        prediction = prediction.float()
        if task == "sst":
            return F.cross_entropy(prediction, labels.long())
        if task == "quora":
            return F.binary_cross_entropy_with_logits(prediction, labels.float())
        return F.mse_loss(prediction, labels.float())

    def task_loss(self, task: str, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``loss`` in the head's own scale: an sts head with target "0-1" is trained on the MSE of
        prediction / 5 against gold / 5 (1/25 of the MSE in similarity units)."""
        loss = MultitaskBert.loss(task, prediction, labels)
        if task == "sts" and self.spec.tasks[task].target == "0-1":
            loss = loss / (STS_MAX * STS_MAX)
        return loss

    @staticmethod
    def decide(task: str, prediction: torch.Tensor) -> torch.Tensor:
        """Predictions as the CS224N files want them: class id, 0/1, similarity clipped to [0, 5]."""
        if task == "sst":
            return prediction.argmax(-1)
        if task == "quora":
            return (prediction > 0).long()
        return prediction.float().clamp(0.0, STS_MAX)
