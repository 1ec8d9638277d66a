"""ONNX export of re-rolled SSM scans: one ONNX Scan per scan site whose body is one step, whatever the
sequence length, run by ONNX Runtime like the original PyTorch loop (outputs and final state)."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import fxfuse
from examples.ssm_models import make_lru_loop, make_mamba_model, make_slow_forward_scan
from fxfuse.onnx.check import run_onnx, tensor_leaves
from fxfuse.passes.verify import compare

pytest.importorskip("onnxruntime")

RTOL = 1e-5


def _export(model, inputs, path, **kwargs):
    """export_onnx; the rewrites' own verification is tested elsewhere, so the captured-loop models skip it
    (verify=False) to keep these tests fast, and each test runs ONNX Runtime against the model itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxfuse.export_onnx(model, inputs, path, **kwargs)


def _ort_matches(path, model, inputs) -> None:
    """ONNX Runtime against the original model (the Python loop), every output within RTOL."""
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    check = compare(run_onnx(str(path), inputs), want, RTOL)
    assert check.ok, check.reason


def _scan_bodies(path) -> list[onnx.GraphProto]:
    proto = onnx.load(str(path))
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    return [a.g for n in nodes if n.op_type in ("Scan", "Loop") for a in n.attribute if a.name == "body"]


def test_mamba_model_one_scan_per_site_node_count_independent_of_length(tmp_path):
    counts = {}
    for length in (4, 12):
        model, inputs = make_mamba_model(length)
        result = _export(model, inputs, tmp_path / f"m{length}.onnx", verify=False)
        assert result.report.count("ssm_scan") == 2 and len(result.sites) == 2, str(result)
        assert result.count("Scan") == 2 and result.count("Loop") == 0, result.node_counts
        assert all(f"{length} steps" in s.lowered_as for s in result.sites)
        bodies = _scan_bodies(tmp_path / f"m{length}.onnx")
        assert len(bodies) == 2 and all(sum(n.op_type == "Exp" for n in b.node) == 1 for b in bodies)
        assert all(len(b.node) < 20 for b in bodies)  # one step, not a copy per step
        _ort_matches(tmp_path / f"m{length}.onnx", model, inputs)
        counts[length] = result.node_counts
    assert counts[4] == counts[12]


@pytest.mark.parametrize(
    ("make", "fused_nodes"),
    [(make_slow_forward_scan, True), (make_lru_loop, False)],
    ids=["selective-final-state-fused-node", "lti-lru-initial-state"],
)
def test_outputs_and_final_state_match_in_onnx_runtime(make, fused_nodes, tmp_path):
    model, inputs = make(32)
    result = _export(model, inputs, tmp_path / "m.onnx", verify=False, fused_nodes=fused_nodes)
    assert result.report.count("ssm_scan") == 1 and len(_scan_bodies(tmp_path / "m.onnx")) == 1, str(result)
    # fused_nodes: the Scan sits in an fxfuse local function that must receive what its body reads (A)
    assert result.count("fxfuse.selective_scan" if fused_nodes else "Scan") == 1, result.node_counts
    assert len(onnx.load(str(tmp_path / "m.onnx")).graph.output) == 2  # y and the final state
    _ort_matches(tmp_path / "m.onnx", model, inputs)


class DirectScan(nn.Module):
    """Calls the fused op itself, so torch.export keeps the sequence length symbolic (a Python loop over
    time cannot be captured with a dynamic length)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(-torch.rand(8, 4) - 0.5)

    def forward(self, dt, x, B, C):
        import fxfuse.fusion.ssm_scan  # noqa: F401  registers torch.ops.fxfuse.selective_scan

        return torch.ops.fxfuse.selective_scan(F.softplus(dt), self.A, x, B, C, None, "auto")


def _reference(model: DirectScan, dt, x, B, C):
    """The recurrence in float64, step by step, independent of fxfuse."""
    A, dt = model.A.detach().double(), F.softplus(dt.double())
    h = torch.zeros(dt.shape[0], dt.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(dt.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + x[:, :, t, None].double() * B[:, None, t].double()
        ys.append((h * C[:, None, t].double()).sum(-1))
    return [torch.stack(ys, dim=-1), h]


def test_dynamic_sequence_length_one_file_runs_every_length(tmp_path):
    torch.manual_seed(0)
    model = DirectScan()
    inputs = (torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 4), torch.randn(2, 16, 4))
    length = Dim("L", min=2, max=4096)
    path = tmp_path / "m.onnx"
    result = _export(model, inputs, path, dynamic_shapes=({2: length}, {2: length}, {1: length}, {1: length}))
    assert len(result.max_rel_err) == 2  # example inputs and a second length, both run by ONNX Runtime
    assert "dynamic number of steps" in result.sites[0].lowered_as
    assert result.count("Scan") == 1, result.node_counts
    for steps in (3, 37):
        other = (torch.randn(2, 8, steps), torch.randn(2, 8, steps), torch.randn(2, steps, 4), torch.randn(2, steps, 4))
        got = [t.double() for t in run_onnx(str(path), other)]
        check = compare(got, _reference(model, *other), RTOL)
        assert check.ok, check.reason


def test_unoptimized_export_is_valid_onnx(tmp_path):
    """export_onnx writes the file again without torch.onnx's optimizer when ONNX Runtime rejects the
    optimized one: the Scan body's names must then still differ from the enclosing graph's."""
    from fxfuse.onnx.export import _to_onnx

    torch.manual_seed(0)
    model = DirectScan()
    inputs = (torch.randn(2, 8, 5), torch.randn(2, 8, 5), torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, proto = _to_onnx(model, inputs, None, 23, optimize=False)
    onnx.save(proto, tmp_path / "m.onnx")
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    got = [t.double() for t in run_onnx(str(tmp_path / "m.onnx"), inputs)]
    check = compare(got, _reference(model, *inputs), RTOL)
    assert check.ok, check.reason
