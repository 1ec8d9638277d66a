"""Complex LTI recurrences (LRU) written as Python loops, with torch complex tensors or a real/imaginary
split: re-rolled into one fxfuse::complex_scan and checked against float64 runs of the original, forward
and backward; the op against a float64 loop; near misses left alone with the reason in the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from examples.lru_models import ComplexLRU, make_complex_lru, make_lru_stack, make_split_lru
from fxfuse.backends import counting_calls
from fxfuse.fusion.complex_scan import complex_scan


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = (torch.view_as_real(t) if t.is_complex() else t for t in (got.detach(), want.detach()))
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _leaves(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _check_against_float64(model: nn.Module, inputs: tuple, opt: nn.Module) -> None:
    """Outputs (complex ones too) and gradients of inputs and parameters within 1e-4 of a float64 run."""
    wide = [x.double().requires_grad_() for x in inputs]
    params64 = {k: p.detach().double().requires_grad_() for k, p in model.named_parameters()}
    want = _leaves(torch.func.functional_call(model, params64, tuple(wide)))
    mine = [x.clone().requires_grad_() for x in inputs]
    got = _leaves(opt(*mine))
    for g, w in zip(got, want, strict=True):
        assert g.dtype in (torch.float32, torch.complex64) and _rel(g, w) < 1e-4
    cotangents = [torch.randn_like(w) for w in want]
    unused = {"allow_unused": True, "materialize_grads": True}  # parameters a test model leaves out
    want_grads = torch.autograd.grad(want, wide + list(params64.values()), cotangents, **unused)
    cotangents32 = [c.to(g.dtype) for c, g in zip(cotangents, got)]
    got_grads = torch.autograd.grad(got, mine + list(model.parameters()), cotangents32, **unused)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, torch.zeros_like(g)) if not w.any() else _rel(g, w) < 1e-4


def _applied(opt, sites: int = 1):
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == sites, str(rep)
    applied = [r for r in rep.rewrites if r.status == "applied"]
    assert all(r.max_rel_err is not None and r.max_rel_err < 1e-5 for r in applied), str(rep)
    return applied


@pytest.mark.parametrize(("spelling", "length"), [("complex", 16), ("split", 33)])
def test_lru_rerolled_and_verified(spelling, length):
    model, inputs = (make_complex_lru if spelling == "complex" else make_split_lru)(length)
    opt = fxfuse.optimize(model.train(), inputs)
    (site,) = _applied(opt)
    state = "complex state" if spelling == "complex" else "complex state (real/imaginary split)"
    assert site.variant == (f"{length} steps → 1 scan, LTI, {state}, input terms hoisted, final state, "
                            f"{4 if spelling == 'complex' else 5}-op readout, time dim 1")  # fmt: skip
    _check_against_float64(model, inputs, opt)


class VectorLRU(ComplexLRU):
    """One unbatched sequence x [L, d_in], iterated step by step as many LRU ports do: B @ x_t, C @ h."""

    def forward(self, x):
        lam = torch.exp(-torch.exp(self.nu_log) + 1j * torch.exp(self.theta_log))
        B, C = torch.complex(self.B_re, self.B_im), torch.complex(self.C_re, self.C_im)
        gammas = torch.exp(self.gamma_log)
        h, ys = torch.zeros(lam.shape[0], dtype=lam.dtype), []
        for step in x:
            h = lam * h + gammas * (B @ step.to(B.dtype))
            ys.append((C @ h).real + self.D @ step)
        return torch.stack(ys)


def test_unbatched_lru_with_left_matmuls_rerolled_and_verified():
    torch.manual_seed(0)
    model, inputs = VectorLRU(), (torch.randn(16, 6),)
    opt = fxfuse.optimize(model.train(), inputs)
    (site,) = _applied(opt)
    assert site.variant.startswith("16 steps → 1 scan, LTI, complex state, input terms hoisted, 4-op readout")
    _check_against_float64(model, inputs, opt)


class InLoopDecayLRU(ComplexLRU):
    """λ recomputed from the parameters in every step (the same value each time): computed once."""

    def forward(self, x):
        B, C = torch.complex(self.B_re, self.B_im), torch.complex(self.C_re, self.C_im)
        h, ys = torch.zeros(x.shape[0], 8, dtype=B.dtype), []
        for t in range(x.shape[1]):
            h = torch.exp(-torch.exp(self.nu_log) + 1j * torch.exp(self.theta_log)) * h + x[:, t].to(B.dtype) @ B.T
            ys.append((h @ C.T).real)
        return torch.stack(ys, 1)


def test_decay_recomputed_in_the_loop_rerolled_and_verified():
    torch.manual_seed(0)
    model, inputs = InLoopDecayLRU(), (torch.randn(2, 8, 6),)
    opt = fxfuse.optimize(model.train(), inputs)
    (site,) = _applied(opt)
    assert site.variant.startswith("8 steps → 1 scan, LTI, complex state, input terms hoisted, 2-op readout")
    _check_against_float64(model, inputs, opt)


class ConjugateSplitLRU(nn.Module):
    """The split written with the conjugate's signs (λ = α − iβ), sums regrouped, the initial state given."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.rand(8) * 0.6), nn.Parameter(torch.rand(8) * 0.6)
        self.B, self.C = nn.Parameter(torch.randn(8, 6) / 3), nn.Parameter(torch.randn(5, 8) / 3)

    def forward(self, x, h_re, h_im):
        ys = []
        for t in range(x.shape[1]):
            u = x[:, t] @ self.B.T
            h_re, h_im = (u + self.alpha * h_re) + self.beta * h_im, self.alpha * h_im - self.beta * h_re + 2 * u
            ys.append(h_re @ self.C.T + h_im @ self.C.T)
        return torch.stack(ys)


def test_conjugate_split_rerolled_and_verified():
    torch.manual_seed(0)
    model, inputs = ConjugateSplitLRU(), (torch.randn(2, 5, 6), torch.randn(2, 8), torch.randn(2, 8))
    opt = fxfuse.optimize(model.train(), inputs)
    (site,) = _applied(opt)
    assert site.variant.startswith("5 steps → 1 scan, LTI, complex state (real/imaginary split), input terms hoisted, "
                                   "initial state")  # fmt: skip
    _check_against_float64(model, inputs, opt)


def test_every_layer_of_an_lru_stack_applied():
    model, inputs = make_lru_stack(8)
    opt = fxfuse.optimize(model.train(), inputs)
    sites = _applied(opt, 2)
    assert all("complex state" in s.variant and "final state" not in s.variant for s in sites)
    _check_against_float64(model, inputs, opt)


def test_complex_graph_has_no_step_left():
    from fxfuse.passes.capture import capture_graphs
    from fxfuse.passes.rewrite import rewrite_patterns

    model, inputs = make_complex_lru(24)
    ((gm, _),) = capture_graphs(model, inputs)
    before = len(gm.graph.nodes)
    gm, rewrites, _ = rewrite_patterns(gm, ["ssm_scan"], "auto")
    targets = [str(n.target) for n in gm.graph.nodes]
    assert [r.status for r in rewrites] == ["applied"]
    assert targets.count("fxfuse.complex_scan.default") == 1
    # the 24 input projections, state updates and readouts are gone: the three matmuls run once each
    assert targets.count("aten.matmul.default") == 3 and "aten.mul.Tensor" in targets
    assert before > 200 and len(gm.graph.nodes) < 50


# --- the op against a float64 loop -----------------------------------------------------------------


def _loop64(a, x, h0):
    lam, xs = torch.view_as_complex(a.double()), torch.view_as_complex(x.double())
    h = torch.view_as_complex(h0.double()) if h0 is not None else torch.zeros_like(lam)
    hs = []
    for t in range(xs.shape[0]):
        h = lam * h + xs[t]
        hs.append(h)
    return torch.view_as_real(torch.stack(hs))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
def test_complex_scan_op_matches_float64_loop(backend, with_h0):
    torch.manual_seed(0)
    channels, length = 300, 33  # more than one 256-channel block of the C kernel
    a = torch.view_as_real(torch.polar(0.3 + 0.69 * torch.rand(channels), 6.28 * torch.rand(channels)))
    a, x = a.requires_grad_(), torch.randn(length, channels, 2, requires_grad=True)
    h0 = torch.randn(channels, 2, requires_grad=True) if with_h0 else None
    leaves = [t for t in (a, x, h0) if t is not None]
    wide = [t.detach().double().requires_grad_() for t in leaves]
    got = complex_scan(a, x, h0, backend)
    want = _loop64(*wide, *([] if with_h0 else [None]))
    assert got.dtype == torch.float32 and _rel(got, want) < 1e-5
    gy = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, leaves, gy.float())
    want_grads = torch.autograd.grad(want, wide, gy)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert _rel(g, w) < 1e-5


def test_complex_scan_triton_matches_float64_loop(device):
    """The Triton kernel (interpreted on CPU here), forward and backward; two channel blocks."""
    channels, length = 300, 9
    a = torch.view_as_real(torch.polar(0.3 + 0.69 * torch.rand(channels), 6.28 * torch.rand(channels)))
    leaves = [t.to(device).requires_grad_() for t in (a, torch.randn(length, channels, 2), torch.randn(channels, 2))]
    wide = [t.detach().cpu().double().requires_grad_() for t in leaves]
    want = _loop64(*wide)
    gy = torch.randn_like(want)
    with counting_calls() as calls:
        got = complex_scan(*leaves, backend="triton")
        got_grads = torch.autograd.grad(got, leaves, gy.float().to(device))
    assert calls[("complex_scan", "triton")] == 2 and _rel(got.cpu(), want) < 1e-5  # forward, backward
    for g, w in zip(got_grads, torch.autograd.grad(want, wide, gy), strict=True):
        assert _rel(g.cpu(), w) < 1e-5


def test_complex_scan_opcheck():
    a = torch.view_as_real(torch.polar(torch.rand(5) * 0.9, torch.rand(5) * 6)).requires_grad_()
    x, h0 = torch.randn(7, 5, 2, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.fxfuse.complex_scan.default, (a, x, h0, "cpu"))


def test_complex_scan_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"expected \[L, 4, 2\]"):
        complex_scan(torch.zeros(4, 2), torch.zeros(3, 5, 2))


# --- near misses: each left alone (numbers unchanged), with the reason in the report ----------------


def nonlinear_step(self, x, lam, B, C):
    h, ys = torch.zeros(x.shape[0], 8, dtype=B.dtype), []
    for t in range(x.shape[1]):
        h = lam * torch.tanh(h) + x[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real)
    return torch.stack(ys, 1)


def decay_from_input(self, x, lam, B, C):
    h, ys = torch.zeros(x.shape[0], 8, dtype=B.dtype), []
    for t in range(x.shape[1]):
        lam_t = torch.exp((x[:, t] @ self.D).to(B.dtype) * lam)  # input-dependent complex decay
        h = lam_t * h + x[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real)
    return torch.stack(ys, 1)


def state_read_mid_loop(self, x, lam, B, C):
    h, ys = torch.zeros(x.shape[0], 8, dtype=B.dtype), []
    for t in range(x.shape[1]):
        h = lam * h + x[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real)
        if t == 2:
            probe = h.abs().sum()
    return torch.stack(ys, 1) * probe


def readout_of_previous_state(self, x, lam, B, C):
    h, ys = torch.zeros(x.shape[0], 8, dtype=B.dtype), []
    for t in range(x.shape[1]):
        new = lam * h + x[:, t].to(B.dtype) @ B.T
        ys.append(((h + new) @ C.T).real)  # y_t reads h_t and h_{t-1}
        h = new
    return torch.stack(ys, 1)


def split_wrong_cross_sign(self, x, lam, B, C):
    a_re, a_im, u = lam.real, lam.imag, x @ B.real.T
    h_re = h_im = x.new_zeros(x.shape[0], 8)
    ys = []
    for t in range(x.shape[1]):
        h_re, h_im = a_re * h_re + a_im * h_im + u[:, t], a_re * h_im + a_im * h_re + u[:, t]  # not λ·h
        ys.append(h_re @ C.real.T - h_im @ C.imag.T)
    return torch.stack(ys, 1)


def split_nonlinear(self, x, lam, B, C):
    a_re, a_im, u = lam.real, lam.imag, x @ B.real.T
    h_re = h_im = x.new_zeros(x.shape[0], 8)
    ys = []
    for t in range(x.shape[1]):
        h_re, h_im = a_re * h_re - a_im * torch.tanh(h_im) + u[:, t], a_re * h_im + a_im * h_re + u[:, t]
        ys.append(h_re @ C.real.T - h_im @ C.imag.T)
    return torch.stack(ys, 1)


NEAR_MISSES = {
    "nonlinear-step": (nonlinear_step, "complex state", "not λ * h + b"),
    "decay-from-input": (decay_from_input, "complex state", "changes from step to step"),
    "state-read-mid-loop": (state_read_mid_loop, "complex state", "also used by"),
    "readout-of-previous-state": (readout_of_previous_state, "complex state", "another step"),
    "split-wrong-cross-sign": (split_wrong_cross_sign, "two carried values", "not updated as a complex multiply"),
    "split-nonlinear": (split_nonlinear, "two carried values", "enters the state update"),
}


class Loop(ComplexLRU):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.D = nn.Parameter(torch.randn(6, 1) / 3)

    def forward(self, x):
        lam = torch.exp(-torch.exp(self.nu_log) + 1j * torch.exp(self.theta_log))
        return self.fn(self, x, lam, torch.complex(self.B_re, self.B_im), torch.complex(self.C_re, self.C_im))


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_complex_near_miss_left_alone(name):
    fn, variant, reason = NEAR_MISSES[name]
    torch.manual_seed(0)
    model, inputs = Loop(fn).eval(), (torch.randn(2, 5, 6),)
    opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"])
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == 0, str(rep)
    rejected = rep.rejected("ssm_scan")
    assert len(rejected) == 1 and variant in rejected[0].variant and reason in rejected[0].reason, str(rep)
    with torch.no_grad():
        assert torch.equal(opt(*inputs), model(*inputs))


def test_split_lru_exports_to_onnx_as_unrolled_steps(tmp_path):
    pytest.importorskip("onnxruntime")
    from fxfuse.onnx.check import run_onnx, tensor_leaves
    from fxfuse.passes.verify import compare

    model, inputs = make_split_lru(8)
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert result.report.count("ssm_scan") == 1 and len(result.sites) == 1
    assert result.sites[0].op == "complex_scan" and "8 steps" in result.sites[0].lowered_as
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    check = compare(run_onnx(str(tmp_path / "m.onnx"), inputs), want, 1e-4)
    assert check.ok, check.reason
