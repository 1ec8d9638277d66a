"""SSM recurrences spelled as public research code spells them (the models, in our own words, with their sources
named, are in `tests/ssm_thirdparty_models.py`): the loops we fuse are checked against a float64 run of the
original, forward and backward; the near misses are left alone with the reason in the report, their numbers
unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ssm_thirdparty_models import (
    CHANNELS,
    LENGTH,
    STATE,
    Recurrence,
    blelloch,
    concatenated_states,
    growing_cat,
    loop_inputs,
    lti_ellipsis_readout,
    preallocated,
    preallocated_backwards,
    preallocated_inplace_state,
    preallocated_time_major,
    randn_b,
    ref_params,
    ref_scan,
    ref_scan_half,
    reversed_assoc,
    rwkv_wkv,
    s4d_params,
    s4d_recurrent,
    scan_params,
    ssd_chunked,
    stacked_states,
    stacked_states_two_readers,
)

import fxfuse

C_, L_, N_ = CHANNELS, LENGTH, STATE
# name: (fn, params, inputs, variant words)  -- fused, checked against float64
FUSED = {
    "mamba_ssm-ref-D-z-bias-last-state": (
        lambda m, u, d, B, C, z: ref_scan(m, u, d, B, C, z), ref_params,
        lambda: (randn_b(C_, L_), randn_b(C_, L_), randn_b(N_, L_), randn_b(N_, L_), randn_b(C_, L_)),
        "D skip, silu(z) gate, final state, readout einsum",
    ),
    "mamba_ssm-ref-one-group": (
        lambda m, u, d, B, C: ref_scan(m, u, d, B, C, grouped=True), ref_params,
        lambda: (randn_b(C_, L_), randn_b(C_, L_), randn_b(1, N_, L_), randn_b(1, N_, L_)), "D skip, final state",
    ),
    "mambapy-seq-states-stacked": (
        stacked_states, scan_params, lambda: loop_inputs(time_major=True),
        "D skip, readout matmul, scan dim 1, loop, states stacked",
    ),
    "mambapy-cat-unsqueezed-final-state": (
        concatenated_states, scan_params, lambda: loop_inputs(time_major=True),
        "final state, readout matmul, scan dim 1, loop, states stacked",
    ),
    "mambapy-seq-states-read-twice": (
        stacked_states_two_readers, scan_params, lambda: loop_inputs(time_major=True),
        "elementwise, exp decay, states materialized",
    ),
    "growing-cat-from-empty": (
        growing_cat, scan_params, lambda: loop_inputs(time_major=False),
        "readout sum, time dim 2",
    ),
    "s4d-recurrent-einsum-readout": (
        s4d_recurrent, s4d_params, lambda: (randn_b(C_, L_),), "LTI, complex state, input terms hoisted, 3-op readout",
    ),
    "prealloc-empty-like": (
        preallocated, scan_params, lambda: loop_inputs(time_major=False),
        "D skip, readout sum, time dim 2",
    ),
    "prealloc-zeros-time-major": (
        preallocated_time_major, scan_params, lambda: loop_inputs(time_major=True),
        "readout einsum, time dim 1",
    ),
}  # fmt: skip


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", list(FUSED))
def test_third_party_scan_fused_and_exact(name):
    fn, params, make_inputs, words = FUSED[name]
    torch.manual_seed(0)
    values, inputs = params(), make_inputs()
    model = Recurrence(fn, **values)
    opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"])
    rep = fxfuse.report(opt)
    (rewrite,) = rep.rewrites
    assert rewrite.status == "applied" and words in rewrite.variant, str(rep)
    wide = [x.double().requires_grad_() for x in inputs]
    model64 = Recurrence(fn, **{k: v.double() for k, v in values.items()})
    want = _leaves(model64(*wide))
    mine = [x.clone().requires_grad_() for x in inputs]
    got = _leaves(opt(*mine))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and _rel(g.detach(), w.detach()) < 1e-4
    cot = [torch.randn_like(w) for w in want]
    want_grads = torch.autograd.grad(want, wide + list(model64.parameters()), cot, allow_unused=True)
    got_grads = torch.autograd.grad(got, mine + list(model.parameters()), [c.float() for c in cot], allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None) and (g is None or _rel(g, w) < 1e-4)


# name: (fn, params, inputs, reason words or None for no row) -- left alone, numbers unchanged
LEFT_ALONE = {
    "mamba_ssm-ref-B-per-channel": (
        lambda m, u, d, B, C: ref_scan(m, u, d, B, C), ref_params,
        lambda: (randn_b(C_, L_), randn_b(C_, L_), torch.randn(C_, N_), randn_b(N_, L_)), "the B factor",
    ),
    "mamba_ssm-ref-two-groups": (
        lambda m, u, d, B, C: ref_scan(m, u, d, B, C, grouped=True), ref_params,
        lambda: (randn_b(C_, L_), randn_b(C_, L_), randn_b(2, N_, L_), randn_b(2, N_, L_)), "mixes axes",
    ),
    "mambapy-seq-initial-state": (
        stacked_states, scan_params,
        lambda: (randn_b(L_, C_), randn_b(L_, C_), randn_b(L_, N_), randn_b(L_, N_), randn_b(C_, N_)), "given state",
    ),
    "mambapy-cat-sigmoid-decay": (
        lambda m, *xs: concatenated_states(m, *xs, decay=torch.sigmoid), scan_params,
        lambda: loop_inputs(time_major=True), "not exp",
    ),
    "lti-einsum-ellipsis-readout": (
        lti_ellipsis_readout, lambda: {"nu": torch.randn(N_), "B": torch.randn(5, N_), "C": torch.randn(C_, N_)},
        lambda: (randn_b(L_, 5),), "not one the scan applies to all steps at once",
    ),
    "mambapy-pscan-in-place": (
        blelloch, scan_params, lambda: loop_inputs(time_major=True), None,
    ),
    "prealloc-partial": (
        lambda m, *xs: preallocated(m, *xs, kind="partial"), scan_params,
        lambda: loop_inputs(time_major=False), "7 of the 8 slots",
    ),
    "prealloc-read-mid-loop": (
        lambda m, *xs: preallocated(m, *xs, kind="read-mid-loop"), scan_params,
        lambda: loop_inputs(time_major=False), "before its last write",
    ),
    "prealloc-backwards-loop": (
        preallocated_backwards, scan_params, lambda: loop_inputs(time_major=False),
        "reverse time order",
    ),
    "prealloc-in-place-state": (
        preallocated_inplace_state, scan_params,
        lambda: loop_inputs(time_major=False), "writes a tensor in place",
    ),
    "growing-cat-in-place-state": (
        lambda m, *xs: growing_cat(m, *xs, in_place=True), scan_params,
        lambda: loop_inputs(time_major=False), None,
    ),
    "assoc-scan-reverse": (  # 4 steps: dynamo traces torch's sweep slowly
        reversed_assoc, scan_params, lambda: (randn_b(C_, 4), randn_b(C_, 4), randn_b(4, N_), randn_b(4, N_)),
        "forward in time only",
    ),
    "mamba2-ssd-minimal": (
        ssd_chunked, dict, lambda: (randn_b(16, 2, 4), randn_b(16, 2), randn_b(16, 2, N_), randn_b(16, 2, N_)),
        "segment sum",
    ),
    "rwkv4-wkv-max-stabilised": (
        rwkv_wkv, lambda: {"decay": torch.randn(C_), "first": torch.randn(C_)},
        lambda: (randn_b(L_, C_), randn_b(L_, C_)), "running maximum",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LEFT_ALONE))
def test_third_party_near_miss_left_alone(name):
    fn, params, make_inputs, reason = LEFT_ALONE[name]
    torch.manual_seed(0)
    values, inputs = params(), make_inputs()
    model = Recurrence(fn, **values).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"])
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == 0, str(rep)
    rejected = rep.rejected("ssm_scan")
    if reason is None:
        assert not rejected, str(rep)
    else:
        assert rejected and all(reason in r.reason for r in rejected), str(rep)
    with torch.no_grad():
        got, want = _leaves(opt(*inputs)), _leaves(model(*inputs))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", ["prealloc-empty-like", "prealloc-in-place-state", "growing-cat-from-empty", "growing-cat-in-place-state"]
)
def test_canonical_graph_keeps_every_number(name):
    """Turning slot writes and growing cats into one stack / cat must not move a bit, whether or not a scan
    is fused afterwards (another family's rewrite runs the canonical graph too): with the state updated in
    place, reading the pieces after the loop would see its last value."""
    from fxfuse.passes.canonicalize import canonicalize
    from fxfuse.passes.capture import capture_graphs

    fn, params, make_inputs, _ = {**FUSED, **LEFT_ALONE}[name]
    torch.manual_seed(0)
    model, inputs = Recurrence(fn, **params()).eval(), make_inputs()
    ((gm, example),) = capture_graphs(model, inputs)
    gm = canonicalize(gm).graph_module
    with torch.no_grad():
        got, want = _leaves(gm(*example)), _leaves(model(*inputs))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_blelloch_model_is_the_scan():
    """The in-place sweep above computes the scan (so leaving it alone is the only thing to check)."""
    torch.manual_seed(0)
    model = Recurrence(blelloch, **scan_params())
    inputs = (randn_b(L_, C_), randn_b(L_, C_), randn_b(L_, N_), randn_b(L_, N_))
    want = stacked_states(model, *inputs) - model.D * inputs[0]
    torch.testing.assert_close(blelloch(model, *inputs), want, rtol=1e-5, atol=1e-5)


def test_mamba_ssm_ref_half_inputs_fused_with_skip_and_gate(dtype=torch.bfloat16):
    torch.manual_seed(0)
    values = ref_params()
    inputs = tuple(
        t.to(dtype) for t in (randn_b(C_, L_), randn_b(C_, L_), randn_b(N_, L_), randn_b(N_, L_), randn_b(C_, L_))
    )
    model = Recurrence(ref_scan_half, **values).eval()
    opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"])
    (rewrite,) = fxfuse.report(opt).rewrites
    assert rewrite.status == "applied" and "D skip, silu(z) gate, final state" in rewrite.variant, rewrite.reason
    with torch.no_grad():
        got, mine = _leaves(opt(*inputs)), _leaves(model(*inputs))
        wide = Recurrence(ref_scan_half, **{k: v.double() for k, v in values.items()})
        want = _leaves(wide(*[x.double() for x in inputs]))
    for g, o, w in zip(got, mine, want, strict=True):
        assert g.dtype == o.dtype
        assert _rel(g, w) <= max(1e-2 if g.dtype == dtype else 1e-4, 2 * _rel(o, w))


def rounded_skip(m, u, delta, B, C):
    """selective_scan_ref's loop whose D skip reads u rounded through float16 while the scan reads u itself."""
    delta = F.softplus(delta + m.delta_bias[..., None])
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, m.A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x, ys = m.A.new_zeros(u.shape[0], *m.A.shape), []
    for i in range(u.shape[2]):
        x = decay[:, :, i] * x + drive[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, dim=2) + u.half().float() * m.D[:, None]


def test_skip_reading_a_rounded_input_keeps_the_rounding():
    # with verify=False nothing but the matcher stands between a dropped round trip and the user
    torch.manual_seed(0)
    model = Recurrence(rounded_skip, **ref_params()).eval()
    inputs = (randn_b(C_, L_) * 3, randn_b(C_, L_), randn_b(N_, L_), randn_b(N_, L_))
    opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"], verify=False)
    assert [r.status for r in fxfuse.report(opt).rewrites] == ["applied"]
    with torch.no_grad():
        got, want = opt(*inputs), model(*inputs)
    assert _rel(got, want) < 1e-6
