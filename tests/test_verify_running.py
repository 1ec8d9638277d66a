"""Applied means running: the backend a fused op chose is the one that executes, and a rewrite that a
later stage (Inductor under compile_rest) would silently drop still runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from examples.attention_models import HandMHA
from examples.spp_models import SPPF
from fxfuse.backends import counting_calls
from fxfuse.fusion.attention import attention
from fxfuse.fusion.linear_attention import linear_attention
from fxfuse.fusion.spp import spp
from fxfuse.fusion.ssm_scan import selective_scan

BACKENDS = ["cpu", "reference", "triton"]  # triton runs in the interpreter on CPU tensors (conftest)


def _float64_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_runs_the_chosen_backend_forward_and_backward(backend, device):
    q, k, v = (torch.randn(1, 2, 16, 16, device=device, requires_grad=True) for _ in range(3))
    cotangent = torch.randn(1, 2, 16, 16, device=device)
    with counting_calls() as calls:
        out = attention(q, k, v, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), cotangent)
    assert dict(calls) == {("attention", backend): 1, ("attention_backward", backend): 1}
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _float64_attention(*wide)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    for got, exact in zip(grads, torch.autograd.grad(want, wide, cotangent.double())):
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spp_runs_the_chosen_backend(backend, device):
    x = torch.randn(1, 2, 6, 6, device=device)
    with counting_calls() as calls:
        out = spp(x, [1, 3, 5], backend=backend)
    assert dict(calls) == {("spp", backend): 1}
    want = torch.cat([x, *(F.max_pool2d(x, k, 1, k // 2) for k in (3, 5))], dim=1)
    assert torch.equal(out, want)


def _float64_causal_linear_attention(q, k, v, eps):
    w = (q @ k.transpose(-1, -2)).tril()
    return (w / (w.sum(-1, keepdim=True) + eps)) @ v


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_runs_the_chosen_backend_forward_and_backward(backend, device):
    # 20 rows: not a multiple of the Triton kernel's 16-row chunk; q, k >= 0 as after a feature map
    q, k = (torch.rand(1, 2, 20, 8, device=device, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 20, 8, device=device, requires_grad=True)
    cotangent = torch.randn(1, 2, 20, 8, device=device)
    with counting_calls() as calls:
        out = linear_attention(q, k, v, causal=True, normalize="eps", eps=1e-6, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), cotangent)
    assert dict(calls) == {("linear_attention", backend): 1, ("linear_attention_backward", backend): 1}
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _float64_causal_linear_attention(*wide, 1e-6)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    for got, exact in zip(grads, torch.autograd.grad(want, wide, cotangent.double())):
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)


def _float64_selective_scan(dt, A, x, B, C):
    h, ys = dt.new_zeros(dt.shape[0], dt.shape[1], A.shape[1]), []
    for t in range(dt.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + x[:, :, t, None] * B[:, None, t, :]
        ys.append((h * C[:, None, t, :]).sum(-1))
    return torch.stack(ys, dim=2), h


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_runs_the_chosen_backend_forward_and_backward(backend, device):
    gen = torch.Generator().manual_seed(0)
    dt = F.softplus(torch.randn(2, 3, 12, generator=gen)).to(device).requires_grad_()
    A = (-torch.rand(3, 4, generator=gen) - 0.1).to(device).requires_grad_()
    x, B, C = (torch.randn(*shape, generator=gen).to(device).requires_grad_()
               for shape in ((2, 3, 12), (2, 12, 4), (2, 12, 4)))  # fmt: skip
    inputs = (dt, A, x, B, C)
    gy = torch.randn(2, 3, 12, device=device)
    with counting_calls() as calls:
        y, h = selective_scan(*inputs, backend=backend)
        grads = torch.autograd.grad(y, inputs, gy)
    assert dict(calls) == {("selective_scan", backend): 1, ("selective_scan_backward", backend): 1}
    wide = [t.detach().double().requires_grad_() for t in inputs]
    want_y, want_h = _float64_selective_scan(*wide)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), want_h, rtol=1e-5, atol=1e-5)
    for got, exact in zip(grads, torch.autograd.grad(want_y, wide, gy.double())):
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_optimized_model_calls_the_fused_ops_it_reports(backend):
    attn, attn_inputs = HandMHA.make()
    pool = SPPF(4, 4).eval()
    pool_input = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        opt_attn = fxfuse.optimize(attn, attn_inputs, backend=backend)
        opt_pool = fxfuse.optimize(pool, (pool_input,), backend=backend)
        assert fxfuse.report(opt_attn).count() == fxfuse.report(opt_pool).count() == 1
        with counting_calls() as calls:
            opt_attn(*attn_inputs)
            opt_pool(pool_input)
    assert dict(calls) == {("attention", backend): 1, ("spp", backend): 1}


class DropoutAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = F.dropout((q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)).softmax(-1), 0.1, self.training)
        return (p @ v).transpose(1, 2).reshape(b, n, dim)


def test_compile_rest_with_training_dropout_runs_the_fused_op():
    # The fused op's dropout backward traces under AOT autograd: the compiled graph calls the fused op,
    # forward and backward, where the report counts it as applied.
    torch.manual_seed(0)
    model, x = DropoutAttention().train(), torch.randn(2, 8, 16)
    opt = fxfuse.optimize(model, (x,), compile_rest=True)
    assert fxfuse.report(opt).count("attention") == 1, str(fxfuse.report(opt))
    with counting_calls() as calls:
        opt(x).sum().backward()
    assert calls[("attention", "reference")] == 1 and calls[("attention_backward", "reference")] == 1
    assert model.qkv.weight.grad is not None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_rest_failure_keeps_the_rewrite_running(monkeypatch):
    # Left to dynamo, an Inductor error made the whole frame run eagerly as written while the report said
    # "1 rewrite(s) applied": the rewritten graph must keep running, uncompiled, with a note.
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("inductor broke")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    torch.manual_seed(0)
    model, x = DropoutAttention().train(), torch.randn(2, 8, 16)
    opt = fxfuse.optimize(model, (x,), compile_rest=True)
    rep = fxfuse.report(opt)
    assert rep.count("attention") == 1 and any("Inductor could not compile" in n for n in rep.notes), str(rep)
    with counting_calls() as calls:
        opt(x).sum().backward()
    assert calls[("attention", "reference")] == 1 and calls[("attention_backward", "reference")] == 1
    assert model.qkv.weight.grad is not None
