"""Fused kernels for minBERT, each beside its eager PyTorch reference.

Public API (each op dispatches on the backend chosen by ``set_backend`` / ``$MINBERT_KERNELS``):
  - ``attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None)``
    (the Triton kernels apply dropout_p rounded to 1/256: ``attention_dropout_p(p)``)
  - ``attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None)``
  - ``layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, seed=None)``
  - ``bias_gelu(x, bias, approximate="none")``
  - ``gelu_layer_norm(x, bias, weight, ln_bias, eps=1e-12, approximate="none")``
  - ``simcse_loss(z1, z2, temperature=0.05, hard_negatives=None)``
  - ``FusedAdamW(params, lr, betas, eps, weight_decay, master_weights=False, max_grad_norm=None,
    capturable=False)``

The Triton paths of the layer-norm family and of simcse_loss are ``torch.library`` custom ops
(namespace ``minbert``), so ``torch.compile(fullgraph=True)`` traces them.
"""
import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":
    # Triton's CPU interpreter mishandles bf16 (tl.dot on raw bits, truncating casts): correct it
    # inside the interpreter before any kernel runs. Compiled kernels are untouched.
    from . import _interpreter

    _interpreter.install()

from ._backend import BACKENDS, default_backend, get_backend, set_backend, use_backend  # noqa: E402
from .adamw import FusedAdamW, adamw_ref  # noqa: E402
from .attention import attention, attention_dropout_p, attention_ref  # noqa: E402
from .attention_varlen import attention_varlen, attention_varlen_ref  # noqa: E402
from .simcse_loss import SimCSELoss, simcse_loss, simcse_loss_ref  # noqa: E402
from .layernorm_gelu import (  # noqa: E402
    LayerNorm,
    bias_gelu,
    bias_gelu_ref,
    gelu_layer_norm,
    gelu_layer_norm_ref,
    layer_norm,
    layer_norm_ref,
)

__all__ = [
    "BACKENDS", "default_backend", "get_backend", "set_backend", "use_backend",
    "attention", "attention_ref", "attention_dropout_p", "attention_varlen", "attention_varlen_ref",
    "layer_norm", "layer_norm_ref", "bias_gelu", "bias_gelu_ref", "gelu_layer_norm",
    "gelu_layer_norm_ref", "LayerNorm", "FusedAdamW", "adamw_ref",
    "simcse_loss", "simcse_loss_ref", "SimCSELoss",
]
