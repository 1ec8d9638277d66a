"""SSM scans written with torch's `associative_scan` (the linear combine (a_l·a_r, a_r·b_l + b_r)): the
log-depth sweep capture records on CPU matched as one fxfuse::selective_scan, checked against a float64
loop, forward and backward; other combines left alone with the reason in the report."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.associative_scan import associative_scan

import fxfuse
from fxfuse.backends import CALLS


def _rel(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def linear(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


def linear_commuted(left, right):
    return right[0] * left[0], right[1] + left[1] * right[0]


def tanh_combine(left, right):
    return left[0] * right[0], torch.tanh(right[0] * left[1] + right[1])


def summed_inputs(left, right):
    return left[0] * right[0], left[1] + right[1]


def reversed_order(left, right):
    return left[0] * right[0], left[0] * right[1] + left[1]


def _factors(A, u, delta, B):
    """u, delta [b, d, l]; B [b, l, n]; A [d, n] -> exp(Δ ⊗ A), Δ·u ⊗ B, both [b, d, l, n] (Hugging Face's)."""
    decay = torch.exp(A[None, :, None, :] * delta[..., None])
    return decay, delta[..., None] * B[:, None] * u[..., None]


class AssocScan(nn.Module):
    """Δ = softplus, A < 0; associative_scan over time (dim 2); readout `kind`; returns y and the final state."""

    def __init__(self, combine=linear, kind: str = "matmul", scan_dim: int = 2) -> None:
        super().__init__()
        self.combine, self.kind, self.scan_dim = combine, kind, scan_dim
        self.A = nn.Parameter(-torch.rand(8, 4) - 0.1)

    def forward(self, u, delta, B, C):
        decay, inputs = _factors(self.A, u, F.softplus(delta), B)
        _, states = associative_scan(self.combine, (decay, inputs), dim=self.scan_dim, combine_mode="generic")
        if self.kind == "matmul":
            y = torch.matmul(states.transpose(1, 2), C.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        elif self.kind == "einsum":
            y = torch.einsum("bdln,bln->bdl", states, C)
        elif self.kind == "sum":
            y = (states * C[:, None]).sum(-1)
        else:  # a readout the op does not compute: the states are materialized for it
            y = (torch.tanh(states) * C[:, None]).sum(-1)
        return y, states.select(self.scan_dim, -1)


def loop_reference(model: AssocScan, u, delta, B, C):
    """The same model as a plain loop over time (the independent oracle)."""
    decay, inputs = _factors(model.A, u, F.softplus(delta), B)
    h, ys = torch.zeros_like(decay[:, :, 0]), []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + inputs[:, :, t]
        ys.append(((torch.tanh(h) if model.kind == "tanh" else h) * C[:, t, None]).sum(-1))
    return torch.stack(ys, -1), h


def _inputs(length: int = 6):
    torch.manual_seed(0)
    return (torch.randn(2, 8, length), torch.randn(2, 8, length), torch.randn(2, length, 4), torch.randn(2, length, 4))


# 3 steps: the decays' own products are dead after the first level, capture keeps only what the inputs read
@pytest.mark.parametrize(
    "combine,kind,length", [(linear, "matmul", 6), (linear_commuted, "sum", 3), (linear, "tanh", 5)]
)
def test_associative_scan_matched_and_verified(combine, kind, length):
    model = AssocScan(combine, kind).train()
    inputs = _inputs(length)
    mine = [x.clone().requires_grad_() for x in inputs]
    opt = fxfuse.optimize(model, mine)  # with the inputs differentiated, as below: one capture
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == 1, str(rep)
    (applied,) = rep.rewrites
    if kind == "tanh":  # Δ = 1, A = B = C = 1 over the flattened state; the readout reads the op's states
        assert applied.variant.startswith("associative_scan → 1 scan, elementwise, exp decay, states materialized")
        assert applied.variant.endswith(f"scan dim 2, {length} steps, log-depth sweep"), applied.variant
    else:
        assert applied.variant.startswith("associative_scan → 1 scan, selective, fused discretization, final state")
        assert f"readout {kind}, scan dim 2, {length} steps, log-depth sweep" in applied.variant, applied.variant
    # forward and gradients (inputs and A) in float32 against the loop in float64
    wide = [x.double().requires_grad_() for x in inputs]
    ref = AssocScan(combine, kind).double()
    ref.A.data.copy_(model.A.data)
    got = opt(*mine)
    CALLS.clear()
    opt(*mine)
    assert sum(n for (op, _), n in CALLS.items() if op == "selective_scan") == 1  # the fused op runs
    want = loop_reference(ref, *wide)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and _rel(g.detach(), w.detach()) < 1e-5
    cotangents = [torch.randn_like(w) for w in want]
    got_grads = torch.autograd.grad(got, [*mine, model.A], [c.float() for c in cotangents])
    want_grads = torch.autograd.grad(want, [*wide, ref.A], cotangents)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert _rel(g, w) < 1e-4


NEAR_MISSES = {
    "tanh-combine": (tanh_combine, 2, "tanh"),
    "inputs-summed-not-decayed": (summed_inputs, 2, "b_l + b_r"),
    "reversed-order": (reversed_order, 2, "wrong side"),
    "scan-over-channels": (linear, 1, "not time"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_left_alone(name):
    combine, scan_dim, reason = NEAR_MISSES[name]
    model = AssocScan(combine, "einsum" if scan_dim == 2 else "sum", scan_dim).eval()
    inputs = _inputs(5)
    opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"])
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == 0, str(rep)
    rejected = rep.rejected("ssm_scan")
    assert len(rejected) == 1 and reason in rejected[0].reason, str(rep)
    for g, w in zip(opt(*inputs), model(*inputs), strict=True):  # grad mode as captured: no recompile
        assert torch.equal(g, w)


def test_hugging_face_mamba_as_shipped_every_layer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # the default config (use_cache=True: each layer's final state goes to the cache, the op's second output)
    config = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2,
                                      intermediate_size=32)  # fmt: skip
    assert config.use_associative_scan  # the shipped default: torch's associative_scan under dynamo
    model = transformers.MambaModel(config).train()
    ids = torch.randint(0, 64, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxfuse.optimize(model, (ids,))
        rep = fxfuse.report(opt)
        assert rep.count("ssm_scan") == 2, str(rep)
        assert all(r.variant.startswith("associative_scan → 1 scan, selective, fused discretization, D skip, "
                                        "silu(z) gate") for r in rep.rewrites), str(rep)  # fmt: skip
        # the module path as users name it (HF's decorator receives the module as args[0])
        assert [r.location.split(" ")[0] for r in rep.rewrites] == ["layers.0.mixer", "layers.1.mixer"], str(rep)
        got = opt(ids).last_hidden_state
        ref = copy.deepcopy(model).double()
        want = ref(ids).last_hidden_state
    assert _rel(got.detach(), want.detach()) < 1e-4
    cotangent = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, list(model.parameters()), cotangent.float(), allow_unused=True)
    want_grads = torch.autograd.grad(want, list(ref.parameters()), cotangent, allow_unused=True)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None and w.abs().max() > 0:
            assert _rel(g, w) < 1e-4


def _hop_scan(u, delta, B, C, A, swap: bool):
    """The `associative_scan` higher-order op as it survives capture with combine_mode="pointwise" (CUDA):
    decays and inputs moved to scan dim 0, the combine a graph; `swap` puts the inputs first."""
    from torch._higher_order_ops.associative_scan import associative_scan_op

    decay, inputs = _factors(A, u, F.softplus(delta), B)
    xs = [torch.movedim(decay, 2, 0), torch.movedim(inputs, 2, 0)]
    if swap:
        out = associative_scan_op(lambda bl, al, br, ar: (br + bl * ar, ar * al), xs[::-1], ())
    else:
        out = associative_scan_op(lambda al, bl, ar, br: (al * ar, ar * bl + br), xs, ())
    states = torch.movedim(out[0 if swap else 1], 0, 2)
    return torch.einsum("bdln,bln->bdl", states, C), states[:, :, -1]


@pytest.mark.parametrize("swap", [False, True])
def test_higher_order_op_matched(swap):
    from fxfuse.passes.capture import aten_graph
    from fxfuse.passes.rewrite import rewrite_patterns

    A = -torch.rand(8, 4) - 0.1
    inputs = [*_inputs(), A]
    fn = lambda *args: _hop_scan(*args, swap=swap)  # noqa: E731
    gm, rewrites, _ = rewrite_patterns(aten_graph(fn, inputs), ["ssm_scan"], "auto")
    assert [r.status for r in rewrites] == ["applied"], rewrites
    assert rewrites[0].variant.endswith("readout einsum, scan dim 2, 6 steps, higher-order op")
    assert "fxfuse.selective_scan.default" in [str(n.target) for n in gm.graph.nodes]
    ref = AssocScan(linear, "einsum").double()
    ref.A.data.copy_(A)
    want = loop_reference(ref, *(x.double() for x in inputs[:4]))
    for g, w in zip(gm(*inputs), want, strict=True):
        assert _rel(g, w) < 1e-5


def test_higher_order_op_nonlinear_combine_left_alone():
    from torch._higher_order_ops.associative_scan import associative_scan_op

    from fxfuse.passes.capture import aten_graph
    from fxfuse.passes.rewrite import rewrite_patterns

    def fn(a, b):
        out = associative_scan_op(lambda al, bl, ar, br: (al * ar, torch.tanh(ar * bl + br)), [a, b], ())
        return torch.einsum("ldbn,bln->bdl", out[1], torch.ones(2, 5, 4))

    inputs = [torch.rand(5, 8, 2, 4), torch.randn(5, 8, 2, 4)]
    gm, rewrites, _ = rewrite_patterns(aten_graph(fn, inputs), ["ssm_scan"], "auto")
    assert [(r.status, "tanh" in r.reason) for r in rewrites] == [("rejected", True)], rewrites
    targets = [str(n.target) for n in gm.graph.nodes]
    assert "associative_scan" in targets and "fxfuse.selective_scan.default" not in targets
    assert torch.equal(gm(*inputs), fn(*inputs))


def test_capture_inlines_elementwise_vmap():
    """torch's CPU associative_scan maps its combine with vmap; the ATen re-trace must see the ops on whole
    tensors (make_fx alone bakes the mapped values into constants)."""
    from fxfuse.passes.capture import capture_graphs

    def fn(x, y):
        return torch.vmap(lambda p, q: torch.tanh(p * q) + q)(x, y) * 2

    x, y = torch.randn(5, 3), torch.randn(5, 3)
    ((gm, _),) = capture_graphs(fn, (x, y))
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"], gm.graph
    (got,) = gm(x, y)
    assert torch.equal(got, fn(x, y))
