"""Linear attention benchmarks: the peak-memory measure, the registered cases and the GPU table."""

from __future__ import annotations

import torch

from fxfuse.bench.cases import eager_linear_attention
from fxfuse.bench.gpu_linear_attention import render_linear_attention
from fxfuse.bench.memory import peak_memory_bytes
from fxfuse.bench.registry import REGISTRY
from fxfuse.fusion.linear_attention import linear_attention


def test_fused_op_never_holds_the_n_by_n_weights():
    n, h = 4096, 1
    q, k, v = torch.rand(1, h, n, 32), torch.rand(1, h, n, 32), torch.randn(1, h, n, 32)
    square = n * n * h * 4
    with torch.no_grad():
        eager = peak_memory_bytes(lambda: eager_linear_attention(q, k, v, causal=True))
        fused = peak_memory_bytes(lambda: linear_attention(q, k, v, causal=True, normalize="eps", eps=1e-6))
    assert eager >= square  # the measure sees the quadratic form's N x N weights...
    assert fused < square / 4  # ...and that the fused op holds only chunk-sized pieces


def test_cases_registered_quick_at_1k_only():
    cases = {c.name: c for c in REGISTRY.cases if "linear_attention" in c.name}
    assert {n for n, c in cases.items() if c.quick} == {
        "op/linear_attention[1x4x1024x32]",
        "op/linear_attention[1x4x1024x32,causal]",
    }
    assert "op/linear_attention[1x4x4096x32,causal]" in cases


def test_gpu_table_has_ratios_to_fxfuse():
    rows = [
        {"impl": "fxfuse", "n": 16384, "variant": "causal", "mode": "fwd", "ms": 2.0},
        {"impl": "fxfuse-walk", "n": 16384, "variant": "causal", "mode": "fwd", "ms": 3.0, "ratio": 1.5},
        {"impl": "eager-quadratic", "n": 16384, "variant": "causal", "mode": "fwd", "ms": 40.0, "ratio": 20.0},
        {"impl": "sdpa-causal", "n": 16384, "variant": "causal", "mode": "fwd", "ms": 7.0, "ratio": 3.5},
        {"impl": "eager-quadratic", "n": 16384, "variant": "causal", "mode": "fwd+bwd", "skipped": "OOM"},
    ]
    lines = [" ".join(line.split()) for line in render_linear_attention(rows)[2].splitlines()]
    assert "| fwd causal | 16384 | 2.000 | 3.000 (1.5x) | 40.000 (20.0x) | 7.000 (3.5x) |" in lines
    assert "| fwd+bwd causal | 16384 | - | - | n/a | - |" in lines
