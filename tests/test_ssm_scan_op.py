"""fxfuse::selective_scan against its float64 reference: every backend, forward and backward, edge values."""

from __future__ import annotations

import pytest
import torch

import fxfuse.backends.cpu.ssm_scan as cpu_scan
from fxfuse.fusion.ssm_scan import scan_backend, selective_scan, selective_scan_reference

# b1-d2-l70-n4 spans two Triton chunks of 64 steps, the second one a padded tail
SHAPES = {"b2-d3-l37-n5": (2, 3, 37, 5), "b1-d4-l64-n16": (1, 4, 64, 16), "b1-d2-l70-n4": (1, 2, 70, 4)}


def _inputs(b, d, length, n, *, h0: bool, seed: int = 0):
    """Trained-model ranges: dt > 0 (softplus), A < 0, so the decays exp(dt * A) lie in (0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    dt, A = mk(b, d, length).abs() * 0.5, -mk(d, n).abs()
    x, B, C = mk(b, d, length), mk(b, length, n), mk(b, length, n)
    return dt, A, x, B, C, (mk(b, d, n) if h0 else None)


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("h0", [False, True], ids=["zeros", "h0"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_forward_matches_float64_reference(backend, h0, shape, device):
    args = _inputs(*shape, h0=h0)
    want_y, want_h = selective_scan_reference(*args)
    f32 = [a.float().to(device) if a is not None else None for a in args]
    # the C kernel is for CPU tensors: on a CUDA test device "cpu" runs the reference
    assert scan_backend(backend, f32[0]) == (backend if backend != "cpu" or device.type == "cpu" else "reference")
    y, h = selective_scan(*f32, backend=backend)
    assert y.dtype == h.dtype == torch.float32 and y.shape == want_y.shape and h.shape == want_h.shape
    assert _rel(y.cpu(), want_y) < 1e-5 and _rel(h.cpu(), want_h) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("h0", [False, True], ids=["zeros", "h0"])
def test_backward_matches_float64_autograd(backend, h0, device):
    # the Triton case spans two chunks (64 + a 6-step tail), on one program to keep the interpreter quick
    args = _inputs(*((2, 3, 21, 5) if backend == "cpu" else (1, 1, 70, 4)), h0=h0, seed=1)
    leaves = [a.clone().requires_grad_() for a in args if a is not None]
    y, h = selective_scan_reference(*leaves[:5], leaves[5] if h0 else None)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    want = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    mine = [a.detach().float().to(device).requires_grad_() for a in leaves]
    y2, h2 = selective_scan(*mine[:5], mine[5] if h0 else None, backend=backend)
    got = torch.autograd.grad((y2 * gy.float().to(device)).sum() + (h2 * gh.float().to(device)).sum(), mine)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and _rel(g.cpu(), w) < 1e-5


def test_cpu_kernel_nan_inf_and_underflow_like_the_reference():
    # exp overflows to inf, underflows to 0 (and subnormals), NaN and ±inf propagate as in the reference
    dt = torch.tensor([[[0.0, 1.0, 88.0, 88.7, 89.0, -87.5, -95.0, -110.0, float("nan"), float("inf"), -float("inf")]]])
    length = dt.shape[-1]
    A, x = torch.ones(1, 1), torch.full((1, 1, length), 0.5)
    B, C = torch.ones(1, length, 1), torch.ones(1, length, 1)
    h0 = torch.ones(1, 1, 1)
    for cut in range(1, length + 1):  # every prefix, so each special value is also the last step
        args = (dt[..., :cut], A, x[..., :cut], B[:, :cut], C[:, :cut], h0)
        want, _ = selective_scan_reference(*args)
        got, _ = selective_scan(*args, backend="cpu")
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite], want[finite], rtol=1e-6, atol=0)


def test_cpu_exp_is_accurate_over_the_whole_float_range():
    r = torch.linspace(-103.0, 88.7, 50001)
    d = r.numel()
    _, h = selective_scan(r.view(1, d, 1), torch.ones(d, 1), torch.zeros(1, d, 1), torch.zeros(1, 1, 1),
                          torch.ones(1, 1, 1), torch.ones(1, d, 1), backend="cpu")  # fmt: skip
    want = torch.exp(r.double())
    normal = want > torch.finfo(torch.float32).tiny
    assert ((h.view(-1).double() - want) / want)[normal].abs().max() < 3e-7


def test_cpu_exp_16_lanes_like_the_reference():
    # a state of 16 puts one step's 16 decays through the 16-lane exponential (8 lanes for the tail above)
    special = torch.tensor([0.0, 1.0, 88.0, 88.7, 89.0, -87.5, -95.0, -110.0, float("nan"), float("inf"),
                            -float("inf"), -103.0, 1e-30, -1e-30, 50.0, -50.0])  # fmt: skip
    r = torch.cat([special, torch.linspace(-103.0, 88.7, 16 * 3000)]).view(-1, 16)
    d = r.shape[0]
    _, h = selective_scan(torch.ones(1, d, 1), r, torch.zeros(1, d, 1), torch.zeros(1, 1, 16),
                          torch.ones(1, 1, 16), torch.ones(1, d, 16), backend="cpu")  # fmt: skip
    want, want32 = torch.exp(r.double()).view(-1), torch.exp(r).view(-1)  # float32 overflows to inf at 88.73
    got = h.view(-1).double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want32))
    normal = (want > torch.finfo(torch.float32).tiny) & torch.isfinite(want32)
    assert ((got - want) / want)[normal].abs().max() < 3e-7
    tiny = want <= torch.finfo(torch.float32).tiny  # subnormal and underflow, within a denormal ulp
    assert ((got - want)[tiny].abs() <= 2.0**-149 + 3e-7 * want[tiny]).all()


def test_opcheck_fake_impl_and_autograd_registration():
    args = [a.float() for a in _inputs(2, 3, 7, 4, h0=False)[:5]]
    torch.library.opcheck(torch.ops.fxfuse.selective_scan.default, (*args, None, "cpu"))


def test_without_a_c_compiler_the_reference_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    problem = cpu_scan._library.__wrapped__()
    assert isinstance(problem, str) and "reference" in problem
    monkeypatch.setattr(cpu_scan, "_library", lambda: problem)
    args = [a.float() if a is not None else None for a in _inputs(2, 3, 7, 4, h0=True)]
    assert scan_backend("cpu", args[0]) == "reference"
    y, _ = selective_scan(*args, backend="cpu")
    assert _rel(y, selective_scan_reference(*_inputs(2, 3, 7, 4, h0=True))[0]) < 1e-5


def test_bad_shapes_raise_with_what_to_change():
    args = [a.float() for a in _inputs(2, 3, 7, 4, h0=False)[:5]]
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(args[0], args[1], args[2], args[3].transpose(1, 2), args[4])


# the Mamba block's D skip and silu(z) gate, fused: y = (y + u * D) * silu(z); u defaults to x
TAILS = {"D": ("D",), "z": ("z",), "D-z": ("D", "z"), "D-z-u": ("D", "z", "u")}


# Triton in the interpreter is slow: every kernel branch (skip only, gate only, both with u), not D-z
TAIL_CASES = [(b, t) for b in ("cpu", "triton", "reference") for t in TAILS if b != "triton" or t != "D-z"]


@pytest.mark.parametrize(("backend", "tail"), TAIL_CASES, ids=[f"{b}-{t}" for b, t in TAIL_CASES])
def test_skip_and_gate_forward_and_backward_match_float64(backend, tail, device):
    # the Triton case spans two chunks (64 + a 6-step tail), on two programs to keep the interpreter quick
    b, d, length, n = (2, 3, 21, 5) if backend != "triton" else (1, 2, 70, 4)
    args = _inputs(b, d, length, n, h0=True, seed=2)
    gen = torch.Generator().manual_seed(3)
    extra = {"D": torch.randn(d, generator=gen, dtype=torch.float64),
             "z": torch.randn(b, d, length, generator=gen, dtype=torch.float64) * 2,
             "u": torch.randn(b, d, length, generator=gen, dtype=torch.float64)}  # fmt: skip
    names = TAILS[tail]
    leaves = [a.clone().requires_grad_() for a in (*args, *(extra[k] for k in names))]
    # float64 truth: the scan's reference (checked above) followed by the block's tail as models spell it
    y, h = selective_scan_reference(*leaves[:6])
    given = dict(zip(names, leaves[6:]))
    if "D" in given:
        y = y + given.get("u", leaves[2]) * given["D"][None, :, None]
    if "z" in given:
        y = y * torch.nn.functional.silu(given["z"])
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    want = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    mine = [a.detach().float().to(device).requires_grad_() for a in leaves]
    y2, h2 = selective_scan(*mine[:6], backend=backend, **dict(zip(names, mine[6:])))
    assert y2.dtype == torch.float32 and _rel(y2.detach().cpu(), y) < 1e-5 and _rel(h2.detach().cpu(), h) < 1e-5
    got = torch.autograd.grad((y2 * gy.float().to(device)).sum() + (h2 * gh.float().to(device)).sum(), mine)
    for name, g, w in zip(["dt", "A", "x", "B", "C", "h0", *names], got, want):
        assert g.dtype == torch.float32 and _rel(g.cpu(), w) < 1e-5, name


def test_skip_and_gate_opcheck_and_call_counts():
    from fxfuse.backends import counting_calls

    dt, A, x, B, C, h0 = (a.float() for a in _inputs(2, 3, 7, 4, h0=True))
    D, z, u = torch.randn(3), torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    torch.library.opcheck(torch.ops.fxfuse.selective_scan.default, (dt, A, x, B, C, h0, "cpu", D, z, u))
    leaves = [t.requires_grad_() for t in (dt, D, z)]
    with counting_calls() as calls:
        y, _ = selective_scan(dt, A, x, B, C, h0, "cpu", D=D, z=z)
        torch.autograd.grad(y.sum(), leaves)
    assert dict(calls) == {("selective_scan", "cpu"): 1, ("selective_scan_backward", "cpu"): 1}


def test_skip_input_without_D_raises():
    args = [a.float() for a in _inputs(2, 3, 7, 4, h0=False)[:5]]
    with pytest.raises(ValueError, match="pass D"):
        selective_scan(*args, u=args[2])
    with pytest.raises(ValueError, match="D has shape"):
        selective_scan(*args, D=torch.ones(7))


def test_cpu_gate_special_values_like_the_reference():
    # the C kernel's vectorized silu: saturation at ±88, underflow, ±inf and NaN as in torch's silu
    z = torch.tensor([[[0.0, 1.0, -1.0, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e-30, float("inf"),
                        -float("inf"), float("nan")]]])  # fmt: skip
    length = z.shape[-1]
    args = (torch.zeros(1, 1, length), -torch.ones(1, 1), torch.ones(1, 1, length), torch.ones(1, length, 1),
            torch.ones(1, length, 1))  # fmt: skip
    got, _ = selective_scan(*args, backend="cpu", D=torch.ones(1), z=z)
    want = (selective_scan_reference(*(a.double() for a in args))[0] + 1.0) * torch.nn.functional.silu(z.double())
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite].double(), want[finite], rtol=1e-6, atol=1e-37)
