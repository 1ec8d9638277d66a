"""LTI recurrences (LRU, S4D in recurrent mode) written as Python loops: re-rolled into one
fxfuse::selective_scan and checked against float64 runs of the original, forward and backward; near misses
left alone with the reason in the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from examples.ssm_models import make_lru_loop
from tests.test_ssm_scan_match import _check_against_float64


def _applied(opt):
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == 1, str(rep)
    (site,) = [r for r in rep.rewrites if r.status == "applied"]
    assert site.max_rel_err is not None and site.max_rel_err < 1e-5
    return site


def test_lru_loop_rerolled_and_verified():
    model, inputs = make_lru_loop(24)
    opt = fxfuse.optimize(model.train(), inputs)
    site = _applied(opt)
    assert site.variant.startswith("24 steps → 1 scan, LTI, constant decay exp(z), input terms hoisted, final state, "
                                   "initial state")  # fmt: skip
    _check_against_float64(model, inputs, opt)


def test_lru_graph_has_no_step_left():
    from fxfuse.passes.capture import capture_graphs
    from fxfuse.passes.rewrite import rewrite_patterns

    model, inputs = make_lru_loop(32)
    ((gm, _),) = capture_graphs(model, inputs)
    before = len(gm.graph.nodes)
    gm, rewrites, _ = rewrite_patterns(gm, ["ssm_scan"], "auto")
    targets = [str(n.target) for n in gm.graph.nodes]
    assert [r.status for r in rewrites] == ["applied"]
    assert targets.count("fxfuse.selective_scan.default") == 1
    # the 32 input projections, state updates and readouts are gone: one matmul each side of the scan
    assert "aten.select.int" not in targets and targets.count("aten.matmul.default") == 2
    assert before > 150 and len(gm.graph.nodes) < 30


class EinsumInputLRU(type(make_lru_loop(3)[0])):
    """The input projected by an einsum: with an explicit output it runs over all steps at once (a time letter
    added); with an ellipsis it does not, and the L per-step terms are stacked."""

    equation = "bi,in->bn"

    def forward(self, x, h0):
        a = torch.exp(-torch.exp(self.nu_log))
        h, ys = h0, []
        for t in range(x.shape[1]):
            h = h * a + torch.einsum(self.equation, x[:, t], self.B)
            ys.append(h @ self.C)
        return torch.stack(ys, dim=0), h


@pytest.mark.parametrize(
    "equation, inputs_as", [("bi,in->bn", "input terms hoisted"), ("...i,in->...n", "per-step inputs stacked")]
)
def test_einsum_input_terms_verified(equation, inputs_as):
    _, inputs = make_lru_loop(16)
    model = EinsumInputLRU().eval()
    model.equation = equation
    opt = fxfuse.optimize(model.train(), inputs)
    site = _applied(opt)
    assert site.variant.startswith(f"16 steps → 1 scan, LTI, constant decay exp(z), {inputs_as}")
    assert site.variant.endswith("time dim 0")
    _check_against_float64(model, inputs, opt)


class LinearLRU(nn.Module):
    """nn.Linear input projection and readout (aten.linear on both sides), zero initial state."""

    def __init__(self) -> None:
        super().__init__()
        self.nu_log = nn.Parameter(torch.randn(8) - 1.0)
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x):
        a = torch.exp(-torch.exp(self.nu_log))
        h, ys = x.new_zeros(x.shape[0], 8), []
        for t in range(x.shape[1]):
            h = a * h + self.inp(x[:, t])
            ys.append(self.out(h))
        return torch.stack(ys, 1)


def test_linear_layers_lru_rerolled_and_verified():
    torch.manual_seed(0)
    model, inputs = LinearLRU(), (torch.randn(2, 20, 6),)
    opt = fxfuse.optimize(model.train(), inputs)
    site = _applied(opt)
    assert site.variant == (
        "20 steps → 1 scan, LTI, constant decay exp(z), input terms hoisted, 1-op readout, time dim 1"
    )
    _check_against_float64(model, inputs, opt)


class S4DLoop(nn.Module):
    """S4D-style recurrent mode: state [B, D, N], a = exp(Δ·A) per (channel, state), b_t = u_t ⊗ B,
    readout (h * C).sum(-1), zero initial state, outputs stacked on the last dim."""

    def __init__(self, channels: int = 4, d_state: int = 3) -> None:
        super().__init__()
        self.log_dt = nn.Parameter(torch.randn(channels) * 0.3 - 2.0)
        self.A = nn.Parameter(-torch.rand(channels, d_state) - 0.5)
        self.B = nn.Parameter(torch.randn(channels, d_state))
        self.C = nn.Parameter(torch.randn(channels, d_state))

    def forward(self, u):
        a = torch.exp(torch.exp(self.log_dt)[:, None] * self.A)
        h = u.new_zeros(u.shape[0], *self.A.shape)
        ys = []
        for t in range(u.shape[1]):
            h = a * h + u[:, t, :, None] * self.B
            ys.append((h * self.C).sum(-1))
        return torch.stack(ys, dim=-1)


def test_s4d_loop_rerolled_and_verified():
    torch.manual_seed(0)
    model, inputs = S4DLoop(), (torch.randn(2, 16, 4),)
    opt = fxfuse.optimize(model.train(), inputs)
    site = _applied(opt)
    assert site.variant.startswith("16 steps → 1 scan, LTI, constant decay exp(z), input terms hoisted")
    assert site.variant.endswith("2-op readout, time dim 2")
    _check_against_float64(model, inputs, opt)


# --- near misses: each left alone (numbers unchanged), with the reason in the report ----------------


def gated_by_state(x, h, a, B, C, W):
    ys = []
    for t in range(x.shape[1]):
        h = torch.sigmoid(h @ W) * h + x[:, t] @ B  # the decay reads the state: nonlinear
        ys.append(h @ C)
    return torch.stack(ys, 1)


def readout_of_previous_state(x, h, a, B, C, W):
    ys = []
    for t in range(x.shape[1]):
        prev, h = h, a * h + x[:, t] @ B
        ys.append(prev @ C)  # y_t reads h_{t-1}
    return torch.stack(ys, 1)


def readout_mixes_steps(x, h, a, B, C, W):
    ys = []
    for t in range(x.shape[1]):
        prev, h = h, a * h + x[:, t] @ B
        ys.append((h + prev) @ C)  # y_t reads h_t and h_{t-1}
    return torch.stack(ys, 1)


def state_read_mid_loop(x, h, a, B, C, W):
    ys = []
    for t in range(x.shape[1]):
        h = a * h + x[:, t] @ B
        ys.append(h @ C)
        if t == 2:
            probe = h.sum()
    return torch.stack(ys, 1) * probe


def decay_not_exp(x, h, a, B, C, W):
    ys, a = [], torch.sigmoid(a)  # log(a) would be exact only for a known positive a
    for t in range(x.shape[1]):
        h = a * h + x[:, t] @ B
        ys.append(h @ C)
    return torch.stack(ys, 1)


def input_reads_state(x, h, a, B, C, W):
    ys = []
    for t in range(x.shape[1]):
        h = a * h + (torch.tanh(h) @ W + x[:, t] @ B)
        ys.append(h @ C)
    return torch.stack(ys, 1)


def readout_adds_step_number(x, h, a, B, C, W):
    ys = []
    for t in range(x.shape[1]):
        h = a * h + x[:, t] @ B
        ys.append(h @ C + t)  # the step number enters the readout: step 1's would serve every step
    return torch.stack(ys, 1)


NEAR_MISSES = {
    "decay-gated-by-state": (gated_by_state, "reads the state (a gated"),
    # y_t = h_{t-1} C: the re-roll's step bodies no longer line up with the state updates
    "readout-of-previous-state": (readout_of_previous_state, "step bodies"),
    "readout-mixes-steps": (readout_mixes_steps, "reads a value of another step"),
    "state-read-mid-loop": (state_read_mid_loop, "also used by"),
    "decay-not-exp": (decay_not_exp, "not exp(z)"),
    "input-reads-state": (input_reads_state, "reads the state"),
    "readout-adds-step-number": (readout_adds_step_number, "reads the step number"),
}


class Loop(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.nu = nn.Parameter(torch.randn(8))
        self.B = nn.Parameter(torch.randn(6, 8) / 3)
        self.C = nn.Parameter(torch.randn(8, 5))
        self.W = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x, h0):
        a = self.nu if self.fn is decay_not_exp else torch.exp(-torch.exp(self.nu))
        return self.fn(x, h0, a, self.B, self.C, self.W)


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_lti_near_miss_left_alone(name):
    fn, reason = NEAR_MISSES[name]
    model = Loop(fn).eval()
    torch.manual_seed(0)
    inputs = (torch.randn(2, 5, 6), torch.randn(2, 8))
    # verify=False: the matcher alone must leave these alone
    opt = fxfuse.optimize(model, inputs, patterns=["ssm_scan"], verify=False)
    rep = fxfuse.report(opt)
    assert rep.count("ssm_scan") == 0, str(rep)
    rejected = rep.rejected("ssm_scan")
    assert len(rejected) == 1 and reason in rejected[0].reason, str(rep)
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=0, atol=0)
