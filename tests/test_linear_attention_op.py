"""`fxfuse::linear_attention` against the quadratic form written here in float64, forward and backward.

Every backend (the materialized reference, the chunked CPU path, the Triton kernel in the interpreter)
runs the same cases: non-causal, causal, causal with per-head decay, each without normaliser, with
`+ eps` and with `clamp(min)` (eps large enough that the clamp cuts some rows), GQA, and sequence lengths
that the chunk does not divide (16 rows per chunk in the interpreter, 64 on the CPU path).
"""

from __future__ import annotations

import pytest
import torch

from fxfuse.fusion.linear_attention import linear_attention, linear_attention_backend

BACKENDS = ["reference", "cpu", "triton"]
MODES = {"plain": (False, None), "causal": (True, None), "decay": (True, [0.9, 0.5, 0.99, 0.0])}
NORMS = ["none", "eps", "clamp"]


def quadratic(q, k, v, scale, causal, decay, normalize, eps):
    """(phi(q) phi(k)^T * mask) v in float64, as a model writes it."""
    q, k, v = q.double(), k.double(), v.double()
    hq = q.shape[1]
    k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)
    w = q @ k.transpose(-1, -2) * scale
    if causal:
        i = torch.arange(q.shape[2], dtype=torch.float64, device=q.device)
        dist = i[:, None] - i[None, :]
        gamma = torch.tensor(decay or [1.0], dtype=torch.float64, device=q.device).view(-1, 1, 1)
        w = w * torch.where(dist >= 0, gamma ** dist.clamp(min=0), 0.0)
    if normalize == "eps":
        w = w / (w.sum(-1, keepdim=True) + eps)
    elif normalize == "clamp":
        w = w / w.sum(-1, keepdim=True).clamp(min=eps)
    return w @ v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def inputs(n: int, device, dtype=torch.float32, hq: int = 4, hkv: int = 2):
    # feature-mapped q, k are non-negative (elu + 1, relu): row sums stay away from zero
    q = torch.rand(2, hq, n, 8, device=device, dtype=dtype).requires_grad_()
    k = torch.rand(2, hkv, n, 8, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(2, hkv, n, 5, device=device, dtype=dtype).requires_grad_()
    return q, k, v


# the interpreter is slow: the Triton kernel runs the cases that exercise different code paths
CASES = [(b, m, nm) for b in BACKENDS for m in MODES for nm in NORMS]
CASES = [c for c in CASES if c[0] != "triton" or c[1:] in {("plain", "eps"), ("causal", "none"),
                                                            ("decay", "eps"), ("decay", "clamp")}]  # fmt: skip


@pytest.mark.parametrize("backend, mode, normalize", [pytest.param(*c, id="-".join(c)) for c in CASES])
def test_matches_quadratic_form(backend, mode, normalize, device):
    causal, decay = MODES[mode]
    n, heads = (35, (2, 1)) if backend == "triton" else (150, (4, 2))
    q, k, v = inputs(n, device, hq=heads[0], hkv=heads[1])
    decay = decay and decay[: heads[0]]
    eps = 2.0 if normalize == "clamp" else 1e-3  # clamp(min=2) cuts the early causal rows
    out = linear_attention(q, k, v, scale=0.3, causal=causal, decay=decay, normalize=normalize, eps=eps,
                           backend=backend)  # fmt: skip
    want = quadratic(q, k, v, 0.3, causal, decay, normalize, eps)
    assert rel(out, want) < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad.double())
    for name, g, r in zip("qkv", got, ref):
        assert rel(g, r) < 1e-5, name


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_inputs_accumulate_in_float32(backend, device):
    q, k, v = (t.detach() for t in inputs(40, device, torch.bfloat16, hq=2, hkv=2))
    out = linear_attention(q, k, v, causal=True, decay=[0.95], normalize="eps", eps=1e-6, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel(out, quadratic(q, k, v, 1.0, True, [0.95], "eps", 1e-6)) < 1e-2


def test_non_causal_cross_lengths():
    q = torch.rand(1, 2, 9, 4)
    k, v = torch.rand(1, 2, 30, 4), torch.randn(1, 2, 30, 3)
    for backend in BACKENDS:
        out = linear_attention(q, k, v, normalize="eps", eps=1e-6, backend=backend)
        assert rel(out, quadratic(q, k, v, 1.0, False, None, "eps", 1e-6)) < 1e-5, backend


def test_traces_as_one_op_and_passes_opcheck():
    q, k, v = inputs(20, "cpu")
    args = (q, k, v, 0.5, True, [0.9, 0.8, 0.7, 0.6], "eps", 1e-4, "cpu")
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fxfuse.linear_attention.default, args, test_utils=tests)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda *a: torch.ops.fxfuse.linear_attention(*a))(*args)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.fxfuse.linear_attention.default]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decay=[0.9]), "causal"),
        (dict(causal=True, decay=[0.9, 0.8, 0.7]), "one per query head"),
        (dict(causal=True, decay=[-0.5]), ">= 0"),
        (dict(normalize="sum"), "normalize"),
    ],
)
def test_rejects_arguments_outside_the_contract(kwargs, message):
    q, k, v = inputs(6, "cpu")
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v, **kwargs)


def test_backend_choice_says_why():
    assert linear_attention_backend("auto", "cpu")[0] == "cpu"
    assert linear_attention_backend("reference", "cpu") == ("reference", "asked for")
    assert linear_attention_backend("auto", "meta")[0] == "reference"


# --- block-exclusive: position i sees the keys j of the earlier blocks, j // c < i // c -----------------


def block_quadratic(q, k, v, scale, block, normalize, eps):
    """(phi(q) phi(k)^T * [j // c < i // c]) v in float64, the mask written from its definition."""
    q, k, v = q.double(), k.double(), v.double()
    hq = q.shape[1]
    k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)
    n = q.shape[2]
    mask = torch.tensor([[float(j // block < i // block) for j in range(n)] for i in range(n)], dtype=torch.float64)
    w = q @ k.transpose(-1, -2) * scale * mask.to(q.device)
    if normalize == "eps":
        w = w / (w.sum(-1, keepdim=True) + eps)
    elif normalize == "clamp":
        w = w / w.sum(-1, keepdim=True).clamp(min=eps)
    return w @ v


# N not a multiple of the block (the last block partial); the Triton kernel runs block 16 in the interpreter
BLOCK_CASES = [("reference", "none", 7), ("reference", "clamp", 16), ("cpu", "none", 7), ("cpu", "eps", 16),
               ("cpu", "clamp", 32), ("triton", "none", 16), ("triton", "eps", 16), ("triton", "eps", 7)]  # fmt: skip


@pytest.mark.parametrize("backend, normalize, block", BLOCK_CASES)
def test_block_exclusive_matches_masked_quadratic_form(backend, normalize, block, device):
    q, k, v = inputs(40, device, hq=2, hkv=1)
    eps = 2.0 if normalize == "clamp" else 1e-3  # the first block sees no key: row sum 0, eps decides
    out = linear_attention(q, k, v, scale=0.3, causal=True, normalize=normalize, eps=eps, backend=backend,
                           block=block)  # fmt: skip
    want = block_quadratic(q, k, v, 0.3, block, normalize, eps)
    assert rel(out, want) < 1e-5
    assert not out[:, :, :block].any()  # the first block has nothing before it
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad.double())
    for name, g, r in zip("qkv", got, ref):
        assert rel(g, r) < 1e-5, name


def test_block_exclusive_opcheck_and_contract():
    q, k, v = inputs(20, "cpu")
    args = (q, k, v, 0.5, True, None, "eps", 1e-4, "cpu", 8)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fxfuse.linear_attention.default, args, test_utils=tests)
    for kwargs, message in [(dict(block=4), "causal=True"), (dict(causal=True, block=4, decay=[0.9]), "decay"),
                            (dict(causal=True, block=-1), "block")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            linear_attention(q, k, v, **kwargs)
    assert linear_attention_backend("triton", "cuda", block=16)[0] == "triton"
    backend, why = linear_attention_backend("triton", "cuda", block=12)
    assert backend == "cpu" and "block 12" in why


# --- the Triton kernel's two schedules: states-then-outputs ("parallel", the default) and the walk -------


def masked_product(a, b, c, scale, mask):
    """scale * (a b^T * mask) c in float64, the mask [H or 1, N, N] written out here."""
    return (a.double() @ b.double().transpose(-1, -2) * scale * mask) @ c.double()


# (N, D, E, decay, reverse, block): N not a multiple of the 16-row chunk; D = 40 > 16 splits the state
# kernel's D tiles in the interpreter; reverse is the backward's anti-causal product
SCHEDULE_CASES = {
    "causal": (35, 8, 5, None, False, 0),
    "decay-wide-d": (50, 40, 20, [0.95, 0.0], False, 0),
    "decay-reverse": (35, 8, 5, [0.9, 0.5], True, 0),
    "block-reverse": (40, 8, 5, None, True, 16),
}


@pytest.mark.parametrize("schedule", ["parallel", "walk"])
@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_triton_schedules_match_masked_product(case, schedule, device):
    from fxfuse.backends.triton.linear_attention import chunked_product_triton

    n, d, e, decay, reverse, block = SCHEDULE_CASES[case]
    a, b = torch.rand(2, 2, n, d, device=device), torch.rand(2, 2, n, d, device=device)
    c = torch.randn(2, 2, n, e, device=device)
    i = torch.arange(n, dtype=torch.float64, device=device)
    dist = (i[None, :] - i[:, None]) if reverse else (i[:, None] - i[None, :])
    if block:
        blocks = torch.div(i, block, rounding_mode="floor")
        mask = ((blocks[None, :] > blocks[:, None]) if reverse else (blocks[None, :] < blocks[:, None])).double()
    else:
        gamma = torch.tensor(decay or [1.0], dtype=torch.float64, device=device).view(-1, 1, 1)
        mask = torch.where(dist >= 0, gamma ** dist.clamp(min=0), 0.0)
    gammas = None if decay is None else torch.tensor(decay, dtype=torch.float64)
    out = chunked_product_triton(a, b, c, 0.3, True, gammas, reverse, block, schedule=schedule)
    assert rel(out, masked_product(a, b, c, 0.3, mask)) < 1e-6
