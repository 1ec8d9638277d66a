"""ONNX export of linear attention: standard ops in the reassociated order, run by ONNX Runtime like the
original PyTorch model."""

from __future__ import annotations

import pytest
import torch

import fxfuse
from examples.linear_attention_models import MODELS
from fxfuse.onnx.check import run_onnx, tensor_leaves
from fxfuse.passes.verify import compare

pytest.importorskip("onnxruntime")

# the ops each lowering must use; non-causal ones must not build an N x N product at all
EXPECTED = {
    "LinearTransformerLayer": ("MatMul(q, MatMul(k^T, v))", {"ReduceSum": 1}),
    "CausalLinearLayer": ("CumSum", {"CumSum": 2, "Max": 1}),
    "RetentionLayer": ("Pow(gamma, i - j)", {}),
}
# PerformerLayer lowers as LinearTransformerLayer does (non-causal MatMuls): left out to save CI time


@pytest.mark.parametrize("cls", [m for m in MODELS if m.__name__ in EXPECTED], ids=lambda c: c.__name__)
def test_lowered_to_standard_ops_ort_matches_model(cls, tmp_path):
    model, inputs = cls.make()
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert result.report.count("linear_attention") == 1 and len(result.sites) == 1
    lowered, counts = EXPECTED[cls.__name__]
    assert lowered in result.sites[0].lowered_as
    for name, n in counts.items():
        assert result.count(name) == n, result.node_counts
    assert not any(name.startswith("fxfuse") for name in result.node_counts)
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    check = compare(run_onnx(str(tmp_path / "m.onnx"), inputs), want, 1e-5)
    assert check.ok, check.reason


class BlockExclusive(torch.nn.Module):
    """The op itself in its block-exclusive mode, at a length the block does not divide."""

    def forward(self, q, k, v):
        from fxfuse.fusion.linear_attention import linear_attention

        return linear_attention(q, k, v, scale=0.5, causal=True, normalize="eps", eps=1e-3, block=4)


def _bucketed_alone():
    from tests.test_linear_attention_match import Core
    from tests.test_linear_attention_spellings import bucketed_causal

    return Core(lambda q, k, v: bucketed_causal(q, k, v, intra=False)).eval(), (torch.randn(2, 12, 16),)


@pytest.mark.parametrize("case", ["op_partial_last_block", "bucketed_running_sum"])
def test_block_exclusive_lowered_with_exclusive_cumsum(case, tmp_path):
    torch.manual_seed(0)
    if case == "op_partial_last_block":
        model, inputs = BlockExclusive(), tuple(torch.rand(2, 2, 10, 8) for _ in range(3))
    else:
        model, inputs = _bucketed_alone()
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert len(result.sites) == 1 and "block-exclusive (blocks of 4)" in result.sites[0].lowered_as
    assert result.count("CumSum") == (2 if case == "op_partial_last_block" else 1), result.node_counts
    assert not any(name.startswith("fxfuse") for name in result.node_counts)
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    check = compare(run_onnx(str(tmp_path / "m.onnx"), inputs), want, 1e-5)
    assert check.ok, check.reason
