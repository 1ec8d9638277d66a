"""When the captured graph trains, a site's backward is verified too: a wrong gradient is never applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
import fxfuse.backends.cpu.attention as cpu_attention
import fxfuse.fusion.spp.op as spp_op
from examples.attention_models import HandMHA
from examples.spp_models import SPPF, ConvBnAct


def _double_dq(monkeypatch):
    real = cpu_attention.attention_cpu_backward

    def wrong(*args, **kwargs):
        dq, dk, dv, dbias = real(*args, **kwargs)
        return 2 * dq, dk, dv, dbias

    monkeypatch.setattr(cpu_attention, "attention_cpu_backward", wrong)


def _double_spp_grad(monkeypatch):
    real = spp_op.spp_backward
    monkeypatch.setattr(spp_op, "spp_backward", lambda *args: 2 * real(*args))


def _attention_model():
    torch.manual_seed(0)
    model, inputs = HandMHA.make()
    return model.train(), inputs


def _spp_model():
    torch.manual_seed(0)
    return nn.Sequential(ConvBnAct(3, 8, 3), SPPF(8, 4)).train(), (torch.randn(2, 3, 12, 12),)


@pytest.mark.parametrize(
    "make, mutate, pattern",
    [(_attention_model, _double_dq, "attention"), (_spp_model, _double_spp_grad, "spp")],
    ids=["attention-dq-doubled", "spp-grad-doubled"],
)
def test_wrong_backward_is_rejected_when_training(monkeypatch, make, mutate, pattern):
    model, inputs = make()
    mutate(monkeypatch)
    rep = fxfuse.report(fxfuse.optimize(model, inputs, backend="cpu"))
    assert rep.count(pattern) == 0, str(rep)
    reason = rep.rejected(pattern)[0].reason
    assert "failed verification: gradient of input 0" in reason and "original's own" in reason, reason
    # no autograd, no backward to trust: the same site is applied for inference
    with torch.no_grad():
        assert fxfuse.report(fxfuse.optimize(model, inputs, backend="cpu")).count(pattern) == 1


def test_right_backward_is_verified_and_trains():
    model, inputs = _attention_model()
    opt = fxfuse.optimize(model, inputs, backend="cpu")
    rep = fxfuse.report(opt)
    assert rep.count("attention") == 1, str(rep)
    assert rep.rewrites[0].original_rel_err is not None and rep.rewrites[0].max_rel_err < 1e-5
    opt(*inputs).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(*inputs).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
