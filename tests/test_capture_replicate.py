"""The re-trace of an unrolled loop copies the ATen nodes of steps >= REAL_STEPS instead of tracing them:
the graph must be the one a step-by-step trace gives (same code, same metadata), and loops it cannot copy
safely are traced in full."""

from __future__ import annotations

import pytest
import torch

import examples.ssm_models as ssm
from fxfuse.passes import capture

LENGTH = 12  # >= MIN_STEPS: steps 5..11 are copied


def _dynamo_graphs(model, inputs) -> list:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(*inputs)
    torch._dynamo.reset()
    return graphs


def _full_trace(gm, inputs, monkeypatch) -> torch.fx.GraphModule:
    with monkeypatch.context() as m:
        m.setattr(capture, "MIN_STEPS", 10**9)
        return capture.aten_graph(gm, inputs)


def _assert_same_graph(got: torch.fx.GraphModule, want: torch.fx.GraphModule) -> None:
    assert got.code == want.code
    for a, b in zip(got.graph.nodes, want.graph.nodes, strict=True):
        va, vb = a.meta.get("val"), b.meta.get("val")
        assert type(va) is type(vb), a.name
        if isinstance(vb, torch.Tensor):
            assert (va.shape, va.stride(), va.dtype, va.device) == (vb.shape, vb.stride(), vb.dtype, vb.device), a.name
        assert a.meta.get("stack_trace") == b.meta.get("stack_trace"), a.name
        assert a.meta.get("nn_module_stack") == b.meta.get("nn_module_stack"), a.name


def _outputs(fn, inputs) -> list:
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(fn(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]))


MAKERS = {
    "mamba_block": lambda: ssm.make_mamba_block(LENGTH),
    "slow_forward": lambda: ssm.make_slow_forward_scan(LENGTH),
    "in_loop": lambda: ssm.make_in_loop_scan(LENGTH),
    "selective_scan_ref": lambda: ssm.make_selective_scan_ref(LENGTH),
    "lru": lambda: ssm.make_lru_loop(LENGTH),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_copied_steps_give_the_step_by_step_graph(name: str, monkeypatch) -> None:
    model, inputs = MAKERS[name]()
    ((gm, example),) = _dynamo_graphs(model, inputs)
    plan = capture.unrolled_loops(gm)
    assert plan, "the loop should be copied, not traced step by step"
    got = capture.aten_graph(gm, example)
    assert got.meta[capture.COPIED] == len(plan)  # every planned node copied: no fallback on the way
    _assert_same_graph(got, _full_trace(gm, example, monkeypatch))
    for a, b in zip(_outputs(got, example), _outputs(model, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _IndexCrossesZero(torch.nn.Module):
    def forward(self, x):  # x[:, t - 6]: -6 .. 5, a negative index may be normalized
        h, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = 0.5 * h + x[:, t - 6]
            ys.append(h)
        return torch.stack(ys, 1)


class _GrowingSlice(torch.nn.Module):
    def forward(self, x):  # a time index that sets a shape: the steps' values differ in shape
        h, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = 0.5 * h + x.narrow(1, 0, t + 1).sum(1)
            ys.append(h)
        return torch.stack(ys, 1)


class _InPlace(torch.nn.Module):
    def forward(self, x):
        h, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = h * 0.5
            h.add_(x[:, t])
            ys.append(h.clone())
        return torch.stack(ys, 1)


@pytest.mark.parametrize("module", [_IndexCrossesZero, _GrowingSlice, _InPlace])
def test_loops_not_safe_to_copy_are_traced_in_full(module, monkeypatch) -> None:
    x = torch.randn(2, LENGTH, 3)
    model = module()
    ((gm, example),) = _dynamo_graphs(model, (x,))
    assert not capture.unrolled_loops(gm)
    got = capture.aten_graph(gm, example)
    _assert_same_graph(got, _full_trace(gm, example, monkeypatch))
    torch.testing.assert_close(_outputs(got, example)[0], model(x), rtol=0, atol=0)


def test_a_recipe_that_fails_midway_falls_back_to_tracing(monkeypatch) -> None:
    """Positions 0 and 1 of the first copied step are copied, position 2 has no recipe: the rest of the
    loop is traced, reading the copies through FakeTensors of their own."""
    model, inputs = ssm.make_in_loop_scan(LENGTH)
    ((gm, example),) = _dynamo_graphs(model, inputs)
    recipe = capture.Retrace._recipe

    def failing(self, loop, position):
        if position >= 2:
            raise capture._NoReplica("test")
        return recipe(self, loop, position)

    monkeypatch.setattr(capture.Retrace, "_recipe", failing)
    got = capture.aten_graph(gm, example)
    monkeypatch.undo()
    assert got.meta[capture.COPIED] == 2
    _assert_same_graph(got, _full_trace(gm, example, monkeypatch))
    torch.testing.assert_close(_outputs(got, example)[0], _outputs(model, inputs)[0], rtol=1e-5, atol=1e-6)


def test_optimize_without_verification_traces_loops_in_full(monkeypatch):
    # with verify=False no whole-graph check compares the result with dynamo's graph: no copying shortcut
    seen = []
    real = capture.aten_graph

    def spy(fn, inputs, copy_loops=True):
        gm = real(fn, inputs, copy_loops)
        seen.append((copy_loops, gm.meta.get(capture.COPIED, 0)))
        return gm

    monkeypatch.setattr("fxfuse.dynamo_backend.aten_graph", spy)
    import fxfuse

    model, inputs = ssm.make_mamba_block(LENGTH)
    for verify in (True, False):
        seen.clear()
        torch._dynamo.reset()
        fxfuse.optimize(model, inputs, verify=verify)
        assert seen and all(flag == verify for flag, _ in seen)
        assert (sum(n for _, n in seen) > 0) == verify
