"""SMART regularisation (Jiang et al., ACL 2020, https://arxiv.org/abs/1911.03437) for the multitask stage.

Two terms are added to a micro-batch's task loss:

- smoothness: the input embeddings (the embedding layer's output, packed or padded) get noise
  delta ~ N(0, noise_std^2), which ``steps`` ascent steps push to where the prediction changes
  most (delta += step_size * g / ||g||_inf, clamped to [-epsilon, epsilon]); the term is the
  symmetric KL between the clean and perturbed class distributions (SST: softmax, Quora: the
  Bernoulli of the logit) or the squared difference (STS), each direction against a detached
  target, weighted by ``weight``;
- Bregman proximal point: the same divergence between the model's prediction and that of a
  momentum copy of it (its weights an exponential moving average, ``momentum``, updated after
  every optimizer step), weighted by ``bregman_weight``.

Cost: ``steps + 1`` extra forwards (and ``steps`` extra backwards to the noise) for the
smoothness term, one no-grad forward of the copy for the proximal term, and the copy's memory.
The copy is a plain module beside the DeepSpeed engine (ZeRO stages 0-2, where every rank holds
the full weights); it is saved in checkpoints and restored on resume.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class Perturbation:
    """The noise added to the input embeddings of one forward (one tensor per encoder call: a
    bi-encoder calls it twice)."""

    def __init__(self, noise_std: float):
        self.noise_std = noise_std
        self.deltas: list[torch.Tensor] = []
        self._next = 0

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self._next == len(self.deltas):
            self.deltas.append((torch.randn_like(h, dtype=torch.float32) * self.noise_std).requires_grad_())
        delta = self.deltas[self._next]
        self._next += 1
        return h + delta.to(h.dtype)

    def ascend(self, grads, step_size: float, epsilon: float) -> None:
        """One normalised ascent step on every delta, clamped to the epsilon box; the next
        forward starts from the first delta again."""
        new = []
        for delta, g in zip(self.deltas, grads):
            g = torch.zeros_like(delta) if g is None else g.float()
            step = g / g.abs().amax().clamp_min(1e-12)
            new.append((delta.detach() + step_size * step).clamp(-epsilon, epsilon).requires_grad_())
        self.deltas = new
        self._next = 0

    def frozen(self) -> "Perturbation":
        """The same deltas as constants (the last forward's, for the regulariser)."""
        out = Perturbation(self.noise_std)
        out.deltas = [d.detach() for d in self.deltas]
        return out


def divergence(task: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """SMART's l_s between two predictions of a batch, each direction against a detached
    target: symmetric KL of the class distributions (sst: softmax of the logits, quora: the
    Bernoulli of the logit), squared difference for sts (similarity units / 5)."""
    p, q = p.float(), q.float()
    if task == "sts":
        return F.mse_loss(p / 5.0, q.detach() / 5.0) + F.mse_loss(q / 5.0, p.detach() / 5.0)
    if task == "quora":
        p = torch.stack([F.logsigmoid(-p), F.logsigmoid(p)], dim=-1)
        q = torch.stack([F.logsigmoid(-q), F.logsigmoid(q)], dim=-1)
    else:
        p, q = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
    kl = lambda a, b: F.kl_div(a, b.detach(), log_target=True, reduction="batchmean")  # noqa: E731
    return kl(p, q) + kl(q, p)


def smoothness(module: nn.Module, task: str, kwargs: dict, clean: torch.Tensor, noise_std: float,
               step_size: float, epsilon: float, steps: int) -> torch.Tensor:
    """The adversarial smoothness term of one micro-batch (``clean``: the model's prediction)."""
    perturbation = Perturbation(noise_std)
    for _ in range(steps):
        adv = module(task, **kwargs, perturb=perturbation)
        grads = torch.autograd.grad(divergence(task, adv, clean.detach()), perturbation.deltas,
                                    allow_unused=True)
        perturbation.ascend(grads, step_size, epsilon)
    adv = module(task, **kwargs, perturb=perturbation.frozen())
    return divergence(task, adv, clean)


def regulariser(module: nn.Module, task: str, kwargs: dict, clean: torch.Tensor, cfg,
                teacher: "MomentumTeacher | None") -> torch.Tensor:
    """SMART's term of one micro-batch (``cfg``: ``SmartConfig``; ``clean``: the model's
    prediction): ``weight`` x the smoothness term plus ``bregman_weight`` x the divergence from the
    momentum copy (``teacher``; None: no Bregman term). ``weight`` 0 runs no adversarial pass at
    all, so the Bregman term alone costs one no-grad forward of the copy."""
    terms = []
    if cfg.weight > 0:
        terms.append(cfg.weight * smoothness(module, task, kwargs, clean, cfg.noise_std,
                                             cfg.step_size, cfg.epsilon, cfg.steps))
    if teacher is not None:
        terms.append(cfg.bregman_weight * divergence(task, clean, teacher.predict(task, kwargs)))
    if not terms:
        raise ValueError("SMART with weight 0 and no momentum copy adds nothing")
    return sum(terms[1:], terms[0])


class MomentumTeacher:
    """The Bregman proximal point's reference: a copy of the model whose weights follow an
    exponential moving average of the trained ones."""

    def __init__(self, module: nn.Module, momentum: float, device: torch.device | str = "cpu"):
        self.momentum = momentum
        self.model = copy.deepcopy(module).to(device).eval()  # fp32: the average keeps its digits
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def predict(self, task: str, kwargs: dict) -> torch.Tensor:
        return self.model(task, **kwargs)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """theta_teacher <- momentum * theta_teacher + (1 - momentum) * theta."""
        ts = list(self.model.parameters())
        ps = [p.detach().to(t.dtype) for t, p in zip(ts, module.parameters())]
        torch._foreach_lerp_(ts, ps, 1.0 - self.momentum)  # one multi-tensor launch on CUDA

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
