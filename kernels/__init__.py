"""Fused kernels for minBERT, each beside its eager PyTorch reference.

Public API (each op dispatches on the backend chosen by ``set_backend`` / ``$MINBERT_KERNELS``):
  - ``attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None)``
  - ``layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, seed=None)``
  - ``bias_gelu(x, bias, approximate="none")``
"""
from ._backend import BACKENDS, default_backend, get_backend, set_backend, use_backend
from .attention import attention, attention_ref
from .layernorm_gelu import LayerNorm, bias_gelu, bias_gelu_ref, layer_norm, layer_norm_ref

__all__ = [
    "BACKENDS", "default_backend", "get_backend", "set_backend", "use_backend",
    "attention", "attention_ref",
    "layer_norm", "layer_norm_ref", "bias_gelu", "bias_gelu_ref", "LayerNorm",
]
