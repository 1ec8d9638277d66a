"""The report as printed: within 100 columns, the source line on its own line, figures explained."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from torch import nn

import fxfuse
from examples.spp_models import SPPF
from fxfuse import families
from fxfuse.onnx.export import OnnxExport, _quiet_exporter, _rewrite
from fxfuse.onnx.lowering import LoweredSite
from fxfuse.report import WIDTH, Report, Rewrite

LONG_CODE = "att = torch.softmax(query_states @ key_states.transpose(-2, -1) * self.softmax_scale + mask, dim=-1)"


def _lines(text: str) -> list[str]:
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), [line for line in lines if len(line) > WIDTH]
    return lines


def test_layout_fits_100_columns_and_explains_the_figures():
    site = dict(pattern="attention", variant="gqa 8:2, scale 0.1768, causal, additive mask, fp32 softmax "
                "with casts, relative-position bias", location=f"model.layers.11.self_attn (modeling.py:412 "
                f"`{LONG_CODE[:89]}…`)")  # fmt: skip
    rep = Report(
        rewrites=[
            Rewrite(**site, status="applied", max_rel_err=3e-7, original_rel_err=2e-7, tolerance=1e-5,
                    backend="cpu", graph=1),
            Rewrite(**site, status="applied", max_rel_err=4e-7, original_rel_err=2e-7, tolerance=1e-5,
                    backend="cpu", graph=2),
            Rewrite("spp", "bins 1/2/4", "head.spp (net.py:9 `y = self.spp(x)`)", "rejected",
                    "failed verification: " + "the fused region is further from the float64 run than allowed " * 3,
                    3e-2, 1e-3, 1e-2, "cpu", 1),
            Rewrite("spp", "sizes 1/5/9", "unparsed_node_name", "rejected", "unsupported variant"),
        ],  # fmt: skip
        notes=["graph 1: " + "a note long enough to need wrapping " * 5],
        graphs=2,
    )
    lines = _lines(str(rep))
    assert lines[0] == "fxfuse report: 2 graph(s) captured, 1 rewrite(s) applied, 2 rejected"
    header = lines[1].split()
    assert header == ["pattern", "status", "backend", "error", "original", "tolerance", "graphs", "variant"]
    # one row for the site captured twice: graphs 1,2, the larger error; the variant wraps in its column
    row = lines[2].split()
    assert row[:7] == ["attention", "applied", "cpu", "4.0e-07", "2.0e-07", "1.0e-05", "1,2"]
    assert lines[3].startswith(" " * lines[1].index("variant")) and "relative-position bias" in str(rep)
    assert "  at model.layers.11.self_attn, modeling.py:412" in lines
    code = [line for line in lines if "query_states" in line]
    assert code == [f"      {LONG_CODE[:89]}…"]  # the source line on its own, cut with an ellipsis
    assert "  at unparsed_node_name" in lines
    reason = [line for line in lines if "further from the float64" in line]
    assert reason[0].startswith("  reason: failed verification") and len(reason) >= 2
    text = " ".join(str(rep).split())
    assert "error: fused site vs the original region run in float64" in text
    assert "original: that region's own error vs float64" in text and "max(tolerance, 2 x original)" in text
    assert "whole model: each rewritten graph also runs on the real inputs" in text
    assert lines[-1].startswith("      ") and any(line.startswith("note: graph 1: a note") for line in lines)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["applied"] == 1 and d["rewrites"][0]["original_rel_err"] == 2e-7 and d["rewrites"][0]["tolerance"] == 1e-5
    assert d["rewrites"][0]["location"] == site["location"]  # the public field is unchanged


def test_columns_of_figures_not_recorded_are_left_out():
    rep = Report(rewrites=[Rewrite("spp", "sizes 1/5/9/13", "pool (m.py:3 `y = f(x)`)", "applied", "", 0.0,
                                   backend="cpu", graph=1)], graphs=1)  # fmt: skip
    lines = _lines(str(rep))
    assert lines[1].split() == ["pattern", "status", "backend", "error", "graphs", "variant"]
    assert "original:" not in str(rep) and "tolerance" not in str(rep)


def test_not_captured_yet_and_nothing_found_list_every_family():
    assert str(Report()).startswith("fxfuse report: not captured yet")
    opt = fxfuse.optimize(SPPF(4, 4).eval())
    assert "not captured yet" in str(fxfuse.report(opt))
    nothing = str(Report(graphs=1))
    assert all(f.title in nothing for f in families.FAMILIES.values()), nothing


class LongLine(nn.Module):
    def forward(self, query_states, key_states, value_states):
        return torch.softmax(query_states @ key_states.transpose(-2, -1) * 0.125, dim=-1) @ value_states


def test_real_report_cuts_the_source_line_with_an_ellipsis():
    inputs = tuple(torch.randn(3, 1, 2, 8, 4))
    rep = fxfuse.report(fxfuse.optimize(LongLine(), inputs))
    assert rep.count("attention") == 1, str(rep)
    lines = _lines(str(rep))
    code = [line for line in lines if "query_states" in line]
    assert len(code) == 1 and code[0].endswith("…") and code[0].startswith("      return torch.softmax(")


def test_export_numbers_its_graph_as_optimize_does_and_prints_within_100_columns():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), SPPF(4, 4)).eval(), torch.randn(1, 3, 8, 8)
    _, exported = _rewrite(model, (x,), None, None, "auto", True)
    optimized = fxfuse.report(fxfuse.optimize(model, (x,)))
    assert [r.graph for r in exported.rewrites] == [r.graph for r in optimized.rewrites] == [1]
    site = LoweredSite("spp", "spp_1", exported.rewrites[0].location, "MaxPool cascade (1/5/9/13) + Concat")
    result = OnnxExport("/a/long/directory/name/" * 3 + "model.onnx", {f"Op{i}": 10 + i for i in range(12)},
                        [site], {"example inputs": 5e-7}, exported)  # fmt: skip
    lines = _lines(str(result))
    assert any(line.startswith("  spp at 1, ") and "-> MaxPool cascade" in line for line in lines), lines
    assert sum("return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))" in line for line in lines) == 2


def test_exporter_noise_is_silenced_only_inside_the_export(caplog):
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with _quiet_exporter():
            logger.warning("torchvision is not installed. Skipping torchvision::nms")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        assert not caplog.records and not caught
        logger.warning("after")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["after"] and len(caught) == 1


def test_export_to_an_unwritable_path_fails_before_exporting(tmp_path):
    model, x = SPPF(4, 4).eval(), torch.randn(1, 4, 8, 8)
    (tmp_path / "file").write_text("")
    cases = [(tmp_path / "no_dir" / "m.onnx", FileNotFoundError, "does not exist"),
             (tmp_path, IsADirectoryError, "is a directory"),
             (tmp_path / "file" / "m.onnx", NotADirectoryError, "is a file, not a directory")]  # fmt: skip
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            fxfuse.export_onnx(model, (x,), path)


def test_a_site_captured_for_many_shapes_stays_one_short_row():
    rewrites = [Rewrite("spp", "sizes 1/5/9/13", "pool (m.py:3 `y = f(x)`)", "applied", "", 0.0, backend="cpu",
                        graph=g) for g in [*range(1, 40), 41, 43]]  # fmt: skip
    lines = _lines(str(Report(rewrites=rewrites, graphs=43)))
    assert lines[2].split()[:5] == ["spp", "applied", "cpu", "0.0e+00", "1-39,41,43"]
    rewrites += [Rewrite("spp", "sizes 1/5/9/13", "pool (m.py:3 `y = f(x)`)", "applied", "", 0.0, backend="cpu",
                         graph=g) for g in range(45, 60, 2)]  # fmt: skip
    assert "1-39,41,4…" in str(Report(rewrites=rewrites, graphs=60))
