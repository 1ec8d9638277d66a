"""`fxfuse::spp` against oracles written here with plain max_pool2d / adaptive_max_pool2d.

Forward: every backend must be torch.equal to the eager pyramid (NaN at the same places). Backward:
gradients must equal autograd through the original formulation (parallel pools or an SPPF chain);
integer-valued inputs and upstream gradients make ties common and every sum exact, so any difference in
how ties are routed shows up as an inequality. backend="triton" runs the kernels in the interpreter on
CPU (conftest sets TRITON_INTERPRET=1), which is slow: those cases stay tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxfuse.backends.cpu.spp as cpu_spp
from fxfuse.fusion.spp import spp, spp_reference

BACKENDS = ["reference", "cpu", "triton"]
SAME_SIZES = [[1, 5, 9, 13], [13, 9, 5, 1], [5, 5, 3], [3, 1, 7]]
ADAPTIVE_SIZES = [[1, 2, 4], [4, 3, 1], [5]]
SHAPE = (2, 2, 7, 9)  # odd, non-square, windows wider than the map: padding matters everywhere


def ids(sizes: list[int]) -> str:
    return ",".join(map(str, sizes))


def mp(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def eager_pyramid(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The parallel YOLO SPP, pooled in float64 (max only selects, so casting back is exact)."""
    wide = x.double()
    return torch.cat([wide if k == 1 else mp(wide, k) for k in sizes], dim=1).to(x.dtype)


def eager_adaptive(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return sppnet(x.double(), sizes).to(x.dtype)


def sppf(x: torch.Tensor) -> torch.Tensor:
    """YOLOv5's SPPF: mp5 three times, the levels of the chain concatenated: 1, 5, 9, 13."""
    y1 = mp(x, 5)
    y2 = mp(y1, 5)
    return torch.cat([x, y1, y2, mp(y2, 5)], dim=1)


def sppnet(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in sizes], dim=1)


def spp_parallel(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, mp(x, 5), mp(x, 9), mp(x, 13)], dim=1)


def without_nan(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t.isnan(), 0.0, t)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN at different places"
    assert torch.equal(without_nan(actual), without_nan(expected))


def special_values(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random values with a NaN, +inf, -inf, a plane of -inf and a row of NaN mixed in."""
    x = torch.randn(shape).to(dtype)
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, 3, 0] = float("inf")
    x[1, 0, 2, 4] = float("-inf")
    x[1, 1] = float("-inf")
    x[1, 0, 5, :3] = float("nan")
    return x


def ties(shape: tuple[int, ...]) -> torch.Tensor:
    """relu of small integers: mostly zeros and repeated values, so most windows have tied maxima."""
    return torch.randint(-3, 3, shape).float().relu()


@pytest.mark.parametrize("sizes", SAME_SIZES, ids=ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_forward_equals_eager_pyramid(backend: str, sizes: list[int]) -> None:
    x = special_values(SHAPE)
    assert_same(spp(x, sizes, backend=backend), eager_pyramid(x, sizes))


@pytest.mark.parametrize("sizes", ADAPTIVE_SIZES, ids=ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_forward_equals_eager_sppnet(backend: str, sizes: list[int]) -> None:
    x = special_values(SHAPE)
    assert_same(spp(x, sizes, "adaptive", backend=backend), eager_adaptive(x, sizes))


@pytest.mark.parametrize(
    ("hw", "sizes"),
    [((8, 8), [8, 4, 1]), ((20, 20), [4, 2, 1]), ((12, 18), [3, 6]), ((40, 40), [1]), ((40, 40), [2, 1])],
    ids=["one-row-bins", "yolo-neck-size", "non-square", "many-rows", "many-rows-nested"],
)
def test_adaptive_cpu_uniform_bins_leave_input_alone(hw: tuple[int, int], sizes: list[int]) -> None:
    # the cpu path folds bin rows with in-place maxima on a fresh tensor: exact, and never on the input
    x = special_values((2, 3, *hw))
    before = x.clone()
    assert_same(spp(x, sizes, "adaptive", backend="cpu"), eager_adaptive(x, sizes))
    assert_same(x, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_and_high_precision(backend: str, dtype: torch.dtype) -> None:
    x = special_values(SHAPE, dtype)
    assert_same(spp(x, [1, 5, 9], backend=backend), eager_pyramid(x, [1, 5, 9]))
    assert_same(spp(x, [1, 2, 3], "adaptive", backend=backend), eager_adaptive(x, [1, 2, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_tiles_and_launches(backend: str) -> None:
    # 19 x 37 spans several Triton tiles; six distinct sizes need two launches of four level slots
    x = special_values((2, 2, 19, 37))
    assert_same(spp(x, [3], backend=backend), eager_pyramid(x, [3]))
    small = special_values((2, 2, 6, 5))
    sizes = [11, 1, 3, 5, 7, 9]
    assert_same(spp(small, sizes, backend=backend), eager_pyramid(small, sizes))


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend: str, layout: str) -> None:
    x = special_values(SHAPE)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(2, 3)
    assert_same(spp(x, [1, 5, 9], backend=backend), eager_pyramid(x, [1, 5, 9]))
    assert_same(spp(x, [1, 2], "adaptive", backend=backend), eager_adaptive(x, [1, 2]))


def test_unbatched_input_is_a_batch_of_one() -> None:
    x = special_values(SHAPE)
    assert_same(spp(x[0], [1, 5, 9], backend="cpu"), eager_pyramid(x[:1], [1, 5, 9])[0])
    assert_same(spp(x[0], [1, 2], "adaptive"), eager_adaptive(x[:1], [1, 2])[0])


def test_fast_paths_really_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # without this, a dispatch bug that always ran the reference would pass every backend test above
    import fxfuse.backends.triton.spp as triton_spp

    calls = []

    def spy(module: object, name: str) -> None:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: calls.append(name) or original(*args))

    spy(cpu_spp, "spp_same_cpu")
    spy(cpu_spp, "spp_adaptive_cpu")
    spy(triton_spp, "spp_triton")
    x = torch.randn(1, 1, 3, 4)
    spp(x, [1, 3], backend="auto")
    spp(x, [1, 2], "adaptive", backend="cpu")
    spp(x, [3], backend="triton")
    spp(x, [3], backend="reference")
    assert calls == ["spp_same_cpu", "spp_adaptive_cpu", "spp_triton"]


# the backward recomputes with ATen whatever ran forward, so the slow interpreted Triton forward adds nothing
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("chained", [False, True], ids=["parallel", "chained"])
def test_same_backward_routes_ties_like_the_original(backend: str, chained: bool) -> None:
    x = ties(SHAPE)
    grad = torch.randint(-4, 5, (SHAPE[0], 4 * SHAPE[1], *SHAPE[2:])).float()
    original_parallel, original_chain = (
        torch.autograd.grad(f(x.requires_grad_()), x, grad)[0] for f in (spp_parallel, sppf)
    )
    # the two formulations must disagree on this input, or the test could not tell them apart
    assert not torch.equal(original_parallel, original_chain)
    fused = torch.autograd.grad(spp(x, [1, 5, 9, 13], chained=chained, backend=backend), x, grad)[0]
    assert torch.equal(fused, original_chain if chained else original_parallel)


@pytest.mark.parametrize("chained", [False, True], ids=["parallel", "chained"])
def test_same_backward_any_order_and_float_grads(chained: bool) -> None:
    x = ties((2, 3, 8, 5)).double().requires_grad_()
    sizes = [13, 9, 5, 1]
    grad = torch.randn(2, 12, 8, 5, dtype=torch.float64)
    expected = torch.autograd.grad(spp_reference(x, sizes, "same", chained), x, grad)[0]
    assert torch.equal(torch.autograd.grad(spp(x, sizes, chained=chained), x, grad)[0], expected)
    # the reference itself follows the original graphs (written independently above)
    by_level = dict(zip(sizes, grad.split(3, dim=1), strict=True))
    reordered = torch.cat([by_level[k] for k in (1, 5, 9, 13)], dim=1)
    original = torch.autograd.grad((sppf if chained else spp_parallel)(x), x, reordered)[0]
    torch.testing.assert_close(expected, original, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_backward_matches_aten(backend: str) -> None:
    x = ties(SHAPE).requires_grad_()
    sizes = [1, 2, 4]
    grad = torch.randint(-4, 5, (SHAPE[0], SHAPE[1] * 21)).float()
    expected = torch.autograd.grad(sppnet(x, sizes), x, grad)
    fused = torch.autograd.grad(spp(x, sizes, "adaptive", backend=backend), x, grad)
    assert torch.equal(fused[0], expected[0])
    # float gradients: the levels' contributions must also be summed in autograd's order, bit for bit
    grad = torch.randn_like(grad)
    expected = torch.autograd.grad(sppnet(x, sizes), x, grad)
    fused = torch.autograd.grad(spp(x, sizes, "adaptive", backend=backend), x, grad)
    assert torch.equal(fused[0], expected[0])


@pytest.mark.parametrize(
    "args",
    [
        ((1, 2, 5, 6), [1, 3, 5], "same", True),
        ((1, 2, 5, 6), [2, 1], "adaptive", False),
    ],
    ids=["same-chained", "adaptive"],
)
def test_opcheck(args: tuple) -> None:
    shape, sizes, mode, chained = args
    x = torch.randn(shape, requires_grad=True)
    torch.library.opcheck(torch.ops.fxfuse.spp.default, (x, sizes, mode, chained, "cpu"))


def test_traced_exported_and_compiled_as_one_op() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    class Neck(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return spp(x, [1, 5, 9, 13], chained=True) * 2

    x = ties(SHAPE)
    gm = make_fx(Neck(), tracing_mode="fake")(x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] == torch.ops.fxfuse.spp.default
    exported = torch.export.export(Neck(), (x,))
    assert_same(exported.module()(x), Neck()(x))
    compiled = torch.compile(Neck(), backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    grad = torch.randint(-4, 5, (SHAPE[0], 4 * SHAPE[1], *SHAPE[2:])).float()
    (compiled(xc) * grad).sum().backward()
    assert torch.equal(xc.grad, torch.autograd.grad(sppf(x.requires_grad_()), x, 2 * grad)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sizes": [5, 4]}, "odd kernel sizes"),
        ({"sizes": []}, "at least one"),
        ({"sizes": [0]}, "positive ints"),
        ({"sizes": [1], "mode": "pyramid"}, "mode='pyramid'"),
        ({"sizes": [1, 2], "mode": "adaptive", "chained": True}, "chained"),
        ({"sizes": [1], "backend": "cuda"}, "backend='cuda'"),
        ({"sizes": [1], "x": torch.randn(4, 4)}, r"\[B, C, H, W\]"),
    ],
    ids=["even-kernel", "empty-sizes", "zero-size", "unknown-mode", "chained-adaptive", "bad-backend", "2d"],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    args = {"x": torch.randn(1, 2, 5, 5), "mode": "same", "chained": False, "backend": "auto", **kwargs}
    with pytest.raises(ValueError, match=message):
        spp(**args)
    with pytest.raises(ValueError, match=message):  # the op itself, as a rewritten graph calls it
        torch.ops.fxfuse.spp(args["x"], args["sizes"], args["mode"], args["chained"], args["backend"])
