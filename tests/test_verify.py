"""Verification: a wrong rewrite is never applied, and the comparison is strict where it must be."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxfuse
import fxfuse.passes.rewrite as rewrite
from fxfuse.passes.site import Site
from fxfuse.passes.verify import compare


def test_compare_nan_inf_and_structure():
    nan, inf = float("nan"), float("inf")
    assert compare(torch.tensor([1.0, nan]), torch.tensor([1.0, nan]), 1e-5).ok
    assert not compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan]), 1e-5).ok  # NaN lost
    assert not compare(torch.tensor([nan, 2.0]), torch.tensor([1.0, 2.0]), 1e-5).ok  # NaN introduced
    assert not compare(torch.tensor([inf, 2.0]), torch.tensor([-inf, 2.0]), 1e-5).ok
    assert not compare(torch.ones(2, dtype=torch.float64), torch.ones(2), 1e-5).ok  # dtype
    assert not compare((torch.ones(2),), (torch.ones(2), torch.ones(2)), 1e-5).ok
    assert not compare({"a": torch.ones(2)}, {"b": torch.ones(2)}, 1e-5).ok
    c = compare(torch.tensor([1.0, 1e-8]), torch.tensor([1.0, 0.0]), 1e-5)
    assert c.ok and c.max_rel_err == pytest.approx(1e-8)  # relative to the largest entry, not per entry
    assert not compare(torch.tensor([1.0, 2e-5]), torch.tensor([1.0, 0.0]), 1e-5).ok


class ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) + 1


def bogus_finder(wrong: bool):
    """A matcher that claims relu(x) is a fused op; `wrong` makes its replacement compute x itself."""

    def find(gm, backend):
        sites = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.relu.default:
                target = torch.ops.aten.clone.default if wrong else torch.ops.aten.relu.default
                emit = lambda g, ins, target=target: g.call_function(target, (ins[0],))
                sites.append(Site("spp", "bogus", node, node, [node.args[0]], emit, backend="reference"))
        return sites

    return find


@pytest.mark.parametrize("wrong", [True, False], ids=["wrong-rewrite", "right-rewrite"])
def test_rewrite_that_fails_verification_is_not_applied(monkeypatch, wrong):
    monkeypatch.setattr(rewrite, "finder", lambda pattern: bogus_finder(wrong))
    model = ReluNet()
    x = torch.randn(3, 4)
    opt = fxfuse.optimize(model, (x,), patterns=["spp"])
    rep = fxfuse.report(opt)
    assert rep.count() == (0 if wrong else 1), str(rep)
    if wrong:
        assert "failed verification" in rep.rewrites[0].reason
        assert rep.rewrites[0].max_rel_err is not None and rep.rewrites[0].max_rel_err > 1e-5
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_whole_graph_check_withdraws_rewrites(monkeypatch):
    # Per-site verification switched off by a faulty matcher's luck: the whole-graph check still catches it.
    monkeypatch.setattr(rewrite, "finder", lambda pattern: bogus_finder(True))
    monkeypatch.setattr(rewrite, "verify_site", lambda gm, site, region: rewrite.Comparison(True, 0.0))
    model = ReluNet()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="withdrawn"):
        opt = fxfuse.optimize(model, (x,), patterns=["spp"])
    rep = fxfuse.report(opt)
    assert rep.count() == 0 and "whole-graph check failed" in rep.rewrites[0].reason
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))


def test_matcher_crash_leaves_model_working(monkeypatch):
    def broken(gm, backend):
        raise RuntimeError("matcher bug")

    monkeypatch.setattr(rewrite, "finder", lambda pattern: broken)
    model = ReluNet()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="matcher bug"):
        opt = fxfuse.optimize(model, (x,), patterns=["spp"])
    with torch.no_grad():
        assert torch.equal(opt(x), model(x))
    assert any("matcher bug" in n for n in fxfuse.report(opt).notes)
    assert math.isfinite(float(opt(x).sum()))
