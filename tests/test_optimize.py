"""The public contract: optimize / report / CLI / torch.compile backend, on good and bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from examples.spp_models import SPPF, ConvBnAct, make_plain_cnn, make_yolo_sppf


def test_non_module_is_a_clear_type_error():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fxfuse.optimize(lambda x: x)


def test_bad_options_are_clear_errors(tmp_path):
    model, inputs = make_plain_cnn()
    with pytest.raises(ValueError, match="backend"):
        fxfuse.optimize(model, backend="tpu")
    with pytest.raises(ValueError, match="unknown pattern"):
        fxfuse.optimize(model, patterns=["convolution"])
    with pytest.raises(TypeError, match=r"patterns=\['spp'\]"):
        fxfuse.optimize(model, patterns="spp")
    with pytest.raises(ValueError, match="selects no pattern family"):
        fxfuse.optimize(model, patterns=[])
    with pytest.raises(TypeError, match="tuple"):
        fxfuse.optimize(model, example_inputs={"x": 1})
    # export checks them before its work (it used to export the model plain, the error in a note)
    for bad, error in ((["convolution"], ValueError), ("spp", TypeError)):
        with pytest.raises(error, match="pattern"):
            fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx", patterns=bad)
    with pytest.raises(ValueError, match="backend"):
        fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx", backend="tpu")
    assert not list(tmp_path.iterdir())


def test_no_pattern_model_returned_working_with_empty_report():
    model, inputs = make_plain_cnn()
    opt = fxfuse.optimize(model, inputs)
    rep = fxfuse.report(opt)
    assert rep.count() == 0 and rep.graphs == 1
    assert "no attention" in str(rep)
    with torch.no_grad():
        assert torch.equal(opt(*inputs), model(*inputs))


def test_report_table_and_json():
    model, inputs = make_yolo_sppf()
    rep = fxfuse.report(fxfuse.optimize(model, inputs))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["applied"] == 1 and d["rewrites"][0]["pattern"] == "spp"
    r = rep.rewrites[0]
    assert r.status == "applied" and r.backend == "cpu" and r.max_rel_err == 0.0
    assert r.location.startswith("pool ") and "spp_models.py:" in r.location  # module path + user's line
    text = str(rep)
    assert "spp" in text and "applied" in text and "chained" in text


def test_lazy_capture_and_recapture_on_new_shape_and_dtype():
    model, _ = make_yolo_sppf()
    opt = fxfuse.optimize(model)
    assert fxfuse.report(opt).graphs == 0
    for shape, dtype in [((1, 3, 64, 64), torch.float32), ((2, 3, 96, 64), torch.float32),
                         ((1, 3, 64, 64), torch.float64)]:
        x = torch.randn(shape, dtype=dtype)
        if dtype == torch.float64:
            model.double()
        with torch.no_grad():
            assert torch.equal(opt(x), model(x))
    rep = fxfuse.report(opt)
    assert rep.graphs == 3 and [r.status for r in rep.rewrites] == ["applied"] * 3
    assert rep.count("spp") == 1  # one site, captured three times


def test_count_is_per_site_not_per_capture():
    model = nn.Sequential(SPPF(4, 4), SPPF(4, 4)).eval()
    x = torch.randn(1, 4, 8, 8)
    opt = fxfuse.optimize(model, (x,))
    with torch.no_grad():  # grad mode changed: dynamo captures again
        opt(x)
    rep = fxfuse.report(opt)
    assert rep.graphs == 2 and len(rep.rewrites) == 4
    assert rep.count("spp") == 2 and rep.count() == 2


def test_nan_and_inf_inputs_match_original_positions():
    model, inputs = make_yolo_sppf()
    opt = fxfuse.optimize(model, inputs)
    x = inputs[0].clone()
    x[0, 0, 5:9, 5:9] = float("nan")
    x[1, 1, 0, 0] = float("inf")
    with torch.no_grad():
        got, want = opt(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_capture_leaves_model_state_untouched_and_shares_parameters():
    model, inputs = make_yolo_sppf()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fxfuse.optimize(model, inputs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics restored
    assert list(opt.state_dict()) == list(model.state_dict())
    assert opt.pool.cv1 is model.pool.cv1  # attribute fall-through to the original
    assert all(p is q for p, q in zip(opt.parameters(), model.parameters()))


def test_parameter_buffer_and_module_names_are_the_originals():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SPPF(4, 4)).eval()
    opt = fxfuse.optimize(model, (torch.randn(1, 3, 8, 8),))
    params, buffers = dict(opt.named_parameters()), dict(opt.named_buffers())
    assert list(params) == [n for n, _ in model.named_parameters()] and "1.cv1.conv.weight" in params
    assert all(params[n] is p for n, p in model.named_parameters())
    assert list(buffers) == [n for n, _ in model.named_buffers()] and "1.cv1.bn.running_mean" in buffers
    assert set(params) | set(buffers) == set(opt.state_dict())  # pair by name with state_dict keys
    assert dict(opt.named_modules())["1.cv1"] is model[1].cv1
    assert list(dict(opt.named_parameters(prefix="m", recurse=False))) == []  # arguments pass through


def test_training_gradients_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnAct(3, 8, 3), SPPF(8, 4)).train()
    x = torch.relu(torch.randn(2, 3, 12, 12))  # relu: ties inside pooling windows
    opt = fxfuse.optimize(model, (x,))
    assert fxfuse.report(opt).count("spp") == 1
    opt(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


class Looping(nn.Module):
    """Python control flow and a loop over a dimension; a data-dependent branch forces a graph break."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = SPPF(4, 4)

    def forward(self, x, *, steps: int = 2, scale=None):
        for i in range(x.shape[1] // 2):
            x = x + i
        if x.sum() > 0:  # data-dependent: dynamo breaks the graph here
            x = x * 2
        for _ in range(steps):
            x = self.pool(x)
        return {"out": x if scale is None else x * scale}


def test_control_flow_kwargs_and_graph_breaks():
    model = Looping().eval()
    x = torch.randn(1, 4, 10, 10)
    opt = fxfuse.optimize(model, (x,))
    with torch.no_grad():
        assert torch.equal(opt(x, steps=2)["out"], model(x, steps=2)["out"])
        assert torch.equal(opt(x, steps=1, scale=3.0)["out"], model(x, steps=1, scale=3.0)["out"])
    assert fxfuse.report(opt).count("spp") >= 2


class KeywordSPP(nn.Module):
    def forward(self, x, *, scale=1.0, extra=None):
        y = F.max_pool2d(x, 5, 1, 2)
        out = torch.cat([x, y, F.max_pool2d(y, 5, 1, 2)], 1) * scale
        return out if extra is None else out + extra


def test_keyword_example_inputs_capture_now():
    model, x = KeywordSPP(), torch.randn(2, 4, 12, 12)
    extra = torch.randn(2, 12, 12, 12)
    opt = fxfuse.optimize(model, {"x": x, "extra": extra, "scale": 2.0})
    rep = fxfuse.report(opt)
    assert rep.graphs == 1 and rep.count("spp") == 1, str(rep)  # captured by optimize, before any call
    assert torch.equal(opt(x, extra=extra, scale=2.0), model(x, extra=extra, scale=2.0))


def test_verify_false_is_reported():
    model, inputs = make_yolo_sppf()
    rep = fxfuse.report(fxfuse.optimize(model, inputs, verify=False))
    assert rep.count("spp") == 1 and "not verified" in rep.rewrites[0].reason
    assert "verification OFF" in str(rep)


def test_patterns_filter():
    model, inputs = make_yolo_sppf()
    assert fxfuse.report(fxfuse.optimize(model, inputs, patterns=["attention"])).count() == 0


class Untraceable(nn.Module):
    def forward(self, x):
        y = F.max_pool2d(x, 5, 1, 2)
        return torch.cat([x, y], 1).numpy(force=True).sum()  # leaves torch: dynamo falls back


def test_untraceable_model_still_runs():
    model = Untraceable()
    x = torch.randn(1, 2, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxfuse.optimize(model, (x,))
        assert opt(x) == model(x)


def test_torch_compile_backend_registered():
    torch._dynamo.reset()  # earlier tests filled dynamo's per-code cache for this class (limit 8)
    model, inputs = make_yolo_sppf()
    compiled = torch.compile(model, backend="fxfuse", dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(*inputs), model(*inputs))
    assert fxfuse.report(compiled).count("spp") == 1
    assert fxfuse.last_report() is fxfuse.report(compiled)


def test_each_torch_compile_has_its_own_report():
    torch._dynamo.reset()
    first, second = nn.Sequential(SPPF(4, 4), SPPF(4, 4)).eval(), SPPF(4, 4).eval()
    x = torch.randn(1, 4, 8, 8)
    c1, c2 = (torch.compile(m, backend="fxfuse", dynamic=False) for m in (first, second))
    rep1 = fxfuse.report(c1)
    assert str(rep1).startswith("fxfuse report: not captured yet")
    with torch.no_grad():
        c1(x)
        c2(x)
        c1(x)
    assert fxfuse.report(c1) is rep1 and rep1.count("spp") == 2 and rep1.graphs == 1  # live, not reset
    assert fxfuse.report(c2).count("spp") == 1 and fxfuse.report(c2).graphs == 1  # no accumulation
    assert fxfuse.last_report() is fxfuse.report(c2)
    fn = torch.compile(lambda t: torch.cat([t, F.max_pool2d(t, 5, 1, 2)], 1), backend="fxfuse", dynamic=False)
    fn(x)
    assert fxfuse.report(fn).count("spp") == 1 and fxfuse.last_report() is fxfuse.report(fn)
    with pytest.raises(TypeError, match="not produced by fxfuse.optimize or torch.compile"):
        fxfuse.report(first)


class _ShapeCheckedAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1) @ v


def test_a_call_with_a_wrong_shape_does_not_stop_later_captures(caplog):
    good = tuple(torch.randn(3, 1, 2, 16, 8))
    bad = (good[0], torch.randn(1, 2, 16, 9), good[2])  # k's feature size does not match q's
    opt = fxfuse.optimize(_ShapeCheckedAttention(), good)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="batch2"):
        opt(*bad)
    assert not caplog.records  # the user's error alone, not the fake-tensor layer's log of it first
    # dynamo had marked the class's forward "skip" for good: a new model or shape ran eagerly, unreported
    again = fxfuse.optimize(_ShapeCheckedAttention(), good)
    assert fxfuse.report(again).count("attention") == 1
    opt(*torch.randn(3, 1, 2, 32, 8))
    assert fxfuse.report(opt).graphs == 2


WRONG_SHAPE = """
import traceback, torch, fxfuse
from torch import nn
from examples.spp_models import SPPF
model = nn.Sequential(nn.Conv2d(3, 4, 1), SPPF(4, 4)).eval()
opt = fxfuse.optimize(model, (torch.randn(1, 3, 8, 8),))
x = torch.randn(1, 5, 8, 8)  # 5 channels where the model takes 3
try:
    model(x)
except RuntimeError:
    print(len(traceback.format_exc().splitlines()))  # the eager model's own traceback
opt(x)
"""


def test_wrong_input_shows_the_users_error_alone():
    env = {k: v for k, v in os.environ.items() if k != "FXFUSE_VERBOSE"}
    out = subprocess.run([sys.executable, "-c", WRONG_SHAPE], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], env=env)  # fmt: skip
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and lines[0] == "Traceback (most recent call last):", out.stderr[-3000:]
    assert lines[-1].startswith("RuntimeError: Given groups=1") and "WON'T CONVERT" not in out.stderr
    # the eager traceback plus the frames of the optimized module's call (a handful), nothing else
    assert len(lines) <= int(out.stdout) + 30, out.stderr


def test_uncapturable_frame_is_one_note_or_dynamos_full_log(monkeypatch, caplog):
    from fxfuse.api import _quiet_fallbacks

    def dynamo_gives_up():
        try:
            raise RuntimeError("tracing failed\nwith details")
        except RuntimeError:
            logging.getLogger("torch._dynamo.convert_frame").warning(
                "WON'T CONVERT forward /src/model.py line 12 \ndue to: \nTraceback ...", exc_info=True
            )

    rep = fxfuse.Report()
    with pytest.warns(UserWarning, match="could not capture forward /src/model.py line 12"):
        with caplog.at_level(logging.WARNING), _quiet_fallbacks(rep):
            dynamo_gives_up()  # the call itself then worked: one note, one warning
    assert rep.notes == ["could not capture forward /src/model.py line 12 (RuntimeError: tracing failed); "
                         "it ran eagerly"] and not caplog.records  # fmt: skip
    with pytest.raises(ValueError), _quiet_fallbacks(rep):
        dynamo_gives_up()
        raise ValueError("the user's own error")  # then it stands alone: no note, no warning
    assert len(rep.notes) == 1
    monkeypatch.setenv("FXFUSE_VERBOSE", "1")
    with caplog.at_level(logging.WARNING), _quiet_fallbacks(rep):
        dynamo_gives_up()
    assert "WON'T CONVERT" in caplog.text and len(rep.notes) == 1


def test_entry_point_registers_backend_without_import():
    code = (
        "import torch, torch._dynamo\n"
        "assert 'fxfuse' not in __import__('sys').modules\n"
        "f = torch.compile(lambda x: torch.cat([x, torch.nn.functional.max_pool2d(x, 5, 1, 2)], 1),"
        " backend='fxfuse', dynamic=False)\n"
        "print(f(torch.randn(1, 2, 6, 6)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 4, 6, 6])" in out.stdout


def test_cli_explain_prints_report():
    out = subprocess.run(
        [sys.executable, "-m", "fxfuse", "explain", "examples.spp_models:make_yolo_spp"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 rewrite(s) applied" in out.stdout and "sizes 1/5/9/13, parallel" in out.stdout


def test_compile_rest_hands_the_rest_to_inductor():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SPPF(4, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    opt = fxfuse.optimize(model, (x,), compile_rest=True)
    assert fxfuse.report(opt).count("spp") == 1
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)
