"""The backend switch and the eager references' defining properties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _backend


def test_default_follows_env_then_device(monkeypatch):
    monkeypatch.setattr(_backend, "_backend", None)
    monkeypatch.delenv("MINBERT_KERNELS", raising=False)
    assert kernels.get_backend() == ("triton" if torch.cuda.is_available() else "eager")
    monkeypatch.setenv("MINBERT_KERNELS", "triton")
    assert kernels.get_backend() == "triton"
    monkeypatch.setenv("MINBERT_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"unknown kernels backend 'cuda' from \$MINBERT_KERNELS"):
        kernels.get_backend()


def test_set_and_use_backend(monkeypatch):
    monkeypatch.setattr(_backend, "_backend", None)
    monkeypatch.setenv("MINBERT_KERNELS", "eager")
    kernels.set_backend("triton")
    assert kernels.get_backend() == "triton"  # set_backend wins over the environment
    with kernels.use_backend("eager"):
        assert kernels.get_backend() == "eager"
    assert kernels.get_backend() == "triton"
    kernels.set_backend(None)
    assert kernels.get_backend() == "eager"
    with pytest.raises(ValueError, match="unknown kernels backend 'fast'"):
        kernels.set_backend("fast")


def test_attention_ref_matches_sdpa_and_zeroes_empty_rows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 32, generator=g) for _ in range(3))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, :] = False  # every key padded
    out = kernels.attention_ref(q, k, v, key_padding_mask=mask)
    ref = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=mask[:1, None, None, :])
    assert (out[:1] - ref).abs().max().item() <= 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_attention_ref_dropout_mask_and_seed():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 32, generator=g) for _ in range(3))
    keep = torch.rand(1, 2, 5, 5, generator=g) > 0.3
    probs = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, -1)
    expect = (probs * keep / 0.7) @ v
    out = kernels.attention_ref(q, k, v, dropout_p=0.3, dropout_mask=keep)
    assert (out - expect).abs().max().item() <= 1e-5
    a = kernels.attention_ref(q, k, v, dropout_p=0.3, seed=7)
    b = kernels.attention_ref(q, k, v, dropout_p=0.3, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, kernels.attention_ref(q, k, v))


def test_layer_norm_ref_residual_dropout_prenorm():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(3, 7, 29, generator=g), torch.randn(3, 7, 29, generator=g)
    w, b = torch.randn(29, generator=g), torch.randn(29, generator=g)
    keep = torch.rand(3, 7, 29, generator=g) > 0.1
    y, pre = kernels.layer_norm_ref(x, w, b, 1e-12, residual=r, dropout_p=0.1, dropout_mask=keep,
                                    return_prenorm=True)
    expect_pre = x * keep / 0.9 + r
    assert (pre - expect_pre).abs().max().item() <= 1e-6
    assert (y - F.layer_norm(expect_pre, (29,), w, b, 1e-12)).abs().max().item() <= 1e-6


def _gelu64(z: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU written out in fp64 from its definitions (Hendrycks & Gimpel): x * Phi(x), or the
    tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    z = z.double()
    if approximate == "none":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_ref(approximate):
    g = torch.Generator().manual_seed(3)
    x, bias = torch.randn(5, 13, generator=g) * 3, torch.randn(13, generator=g)
    expect = _gelu64(x.double() + bias.double(), approximate)
    for out in (kernels.bias_gelu(x, bias, approximate=approximate),  # the eager backend's path
                kernels.bias_gelu_ref(x, bias, approximate)):
        assert out.dtype == torch.float32
        # fp32 rounding of x + bias, then of GELU: a few ulps of values up to ~10
        assert (out.double() - expect).abs().max().item() <= 4 * 2**-23 * expect.abs().max().item()
    # the two forms differ by up to ~1e-3 near |z| ~ 2: a wrong ``approximate`` cannot pass
    other = _gelu64(x.double() + bias.double(), "tanh" if approximate == "none" else "none")
    assert (other - expect).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="approximate must be"):
        kernels.bias_gelu(x, bias, approximate="fast")


def test_triton_backend_without_kernel_runs_reference_and_warns(monkeypatch):
    monkeypatch.setattr(_backend, "_warned_missing", set())
    g = torch.Generator().manual_seed(4)
    x, bias = torch.randn(4, 8, generator=g), torch.randn(8, generator=g)
    from kernels import layernorm_gelu

    monkeypatch.setattr(layernorm_gelu, "_bias_gelu_triton", None)  # an op without a kernel
    with kernels.use_backend("triton"), pytest.warns(UserWarning, match="no Triton kernel for 'bias_gelu'"):
        out = kernels.bias_gelu(x, bias)
    expect = _gelu64(x.double() + bias.double(), "none")
    assert (out.double() - expect).abs().max().item() <= 4 * 2**-23 * expect.abs().max().item()
