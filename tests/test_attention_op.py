"""`fxfuse::attention`: every backend, forward and backward, against a float64 oracle written plainly here."""

import math
from dataclasses import dataclass, field

import pytest
import torch

import fxfuse.backends.cpu.attention as cpu_attention
from fxfuse.fusion.attention import attention, attention_backend
from fxfuse.fusion.attention.reference import dropout_scale

# The Triton interpreter evaluates with numpy: 0/0 in fully-masked rows (NaN on purpose) warns.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

F32_MIN = torch.finfo(torch.float32).min


def oracle(q, k, v, bias=None, mask=None, q_seg=None, k_seg=None, scale=None, causal=False, causal_offset=0,
           masked_value=-math.inf, score_fn="softmax"):  # fmt: skip
    """The op's formula in float64, written out with matmul + masked_fill + softmax."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    nq, nk = s.shape[-2:]
    if mask is not None:
        s = s.masked_fill(~mask, masked_value)
    if causal:
        above = torch.ones(nq, nk, dtype=torch.bool).triu(causal_offset + 1)
        s = s.masked_fill(above, masked_value)
    if q_seg is not None:
        s = s.masked_fill(q_seg[:, None, :, None] != k_seg[:, None, None, :], masked_value)
    p = torch.softmax(s, dim=-1) if score_fn == "softmax" else torch.relu(s) ** 2
    return p @ v


@dataclass
class Case:
    b: int = 2
    hq: int = 4
    hkv: int = 4
    nq: int = 37
    nk: int = 37
    d: int = 32
    dv: int | None = None
    dtype: torch.dtype = torch.float32
    transposed: bool = False  # q/k/v as [B, N, H, D].transpose(1, 2) views
    bias: str | None = None  # "padding" [B,1,1,Nk], "learned" [1,H,Nq,Nk] (requires grad), "dead_rows"
    mask: str | None = None  # "dead_rows": random bool mask with some rows all False
    segments: bool = False
    params: dict = field(default_factory=dict)

    def inputs(self, device):
        gen = torch.Generator().manual_seed(1)

        def rand(*shape):
            if self.transposed:
                shape = (shape[0], shape[2], shape[1], shape[3])
                t = torch.randn(shape, generator=gen).to(self.dtype).transpose(1, 2)
            else:
                t = torch.randn(shape, generator=gen).to(self.dtype)
            return t.to(device)

        q = rand(self.b, self.hq, self.nq, self.d)
        k = rand(self.b, self.hkv, self.nk, self.d)
        v = rand(self.b, self.hkv, self.nk, self.dv or self.d)
        kw = dict(self.params)
        if self.bias == "padding":
            pad = torch.zeros(self.b, 1, 1, self.nk)
            pad[0, ..., -5:] = F32_MIN
            kw["bias"] = pad.to(device)
        elif self.bias == "learned":
            kw["bias"] = torch.randn(1, self.hq, self.nq, self.nk, generator=gen).to(device)
        elif self.bias == "dead_rows":
            bias = torch.randn(self.b, 1, self.nq, self.nk, generator=gen)
            bias[:, :, 3] = -math.inf
            bias[:, :, 7, : self.nk // 2] = -math.inf
            kw["bias"] = bias.to(device)
        if self.mask == "dead_rows":
            mask = torch.rand(self.b, 1, self.nq, self.nk, generator=gen) > 0.3
            mask[0, 0, 2] = False
            mask[-1, 0, -1] = False
            kw["mask"] = mask.to(device)
        if self.segments:
            lens = [(11, 20, self.nq - 31), (self.nq - 9, 9, 0)]
            seg = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(n)) for n in lens])
            kw["q_seg"] = seg.to(device)
            kw["k_seg"] = seg.to(device)
        return q, k, v, kw


CASES = {
    "plain": Case(),
    "transposed_layout": Case(transposed=True),
    "causal": Case(nq=45, nk=45, params=dict(causal=True)),
    "causal_offset_cross": Case(nq=20, nk=45, params=dict(causal=True, causal_offset=25)),
    "causal_neg_offset_finfo_min": Case(params=dict(causal=True, causal_offset=-3, masked_value=F32_MIN)),
    "causal_neg_offset_nan_rows": Case(params=dict(causal=True, causal_offset=-20)),
    "cross_nq_gt_nk": Case(nq=50, nk=19),
    "gqa_4to2": Case(hkv=2, nq=40, nk=33, params=dict(causal=True)),
    "gqa_4to1": Case(hkv=1, nq=33, nk=40),
    "bias_padding_broadcast": Case(bias="padding", hkv=2),
    "bias_learned_grad": Case(bias="learned", params=dict(causal=True)),
    "bias_dead_rows_nan": Case(bias="dead_rows"),
    "mask_dead_rows_nan": Case(mask="dead_rows"),
    "mask_dead_rows_finfo_min": Case(mask="dead_rows", bias="learned", params=dict(masked_value=F32_MIN)),
    "varlen_segments_causal": Case(nq=48, nk=48, segments=True, params=dict(causal=True)),
    "relu2": Case(params=dict(score_fn="relu2", scale=0.1)),
    "relu2_causal_mask": Case(mask="dead_rows", params=dict(score_fn="relu2", causal=True, scale=0.1)),
    "head_dim_16": Case(d=16, nq=20, nk=24),
    "head_dim_64": Case(d=64, nq=20, nk=24, hkv=2),
    "head_dim_40_dv_24": Case(d=40, dv=24, nq=30, nk=30, params=dict(causal=True)),
    "fp16_causal_gqa": Case(dtype=torch.float16, hkv=2, params=dict(causal=True)),
    "bf16_mask": Case(dtype=torch.bfloat16, mask="dead_rows", params=dict(masked_value=F32_MIN)),
}
BACKENDS = ["reference", "cpu", "triton"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max error relative to the largest |want|, after checking that NaNs sit at the same places."""
    got, want = got.double().cpu(), want.double().cpu()
    nan_got, nan_want = got.isnan(), want.isnan()
    assert torch.equal(nan_got, nan_want), f"NaN at {nan_got.sum()} places, expected {nan_want.sum()}"
    if nan_want.all():
        return 0.0
    fin = ~nan_want
    return ((got[fin] - want[fin]).abs().max() / want[fin].abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_match_float64_oracle(name, backend, device):
    case = CASES[name]
    tol = 1e-5 if case.dtype == torch.float32 else 1e-2
    q, k, v, kw = case.inputs(device)
    leaves = [q, k, v] + ([kw["bias"]] if case.bias == "learned" else [])
    for t in leaves:
        t.requires_grad_(True)
    out = attention(q, k, v, backend=backend, **kw)
    assert out.dtype == q.dtype and out.shape == (case.b, case.hq, case.nq, case.dv or case.d)
    want = oracle(*(t.detach().cpu() for t in (q, k, v)), **{key: _cpu(x) for key, x in kw.items()})
    assert rel_err(out, want) <= tol
    if case.mask == "dead_rows" and kw.get("masked_value", -math.inf) == -math.inf and "score_fn" not in kw:
        assert out.isnan().any()  # the NaN rows are really there, not vacuously matched
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, out.dtype)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    kw_ref = {key: _cpu(x) for key, x in kw.items() if key != "bias" or case.bias != "learned"}
    if case.bias == "learned":
        kw_ref["bias"] = ref_leaves[3]
    want_out = oracle(*ref_leaves[:3], **kw_ref)
    want = torch.autograd.grad(want_out, ref_leaves, grad_out.cpu().double())
    for leaf_name, g, w in zip("q k v bias".split(), got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= tol, f"d{leaf_name}"


def _cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def test_causal_negative_offset_gives_nan_rows(device):
    q, k, v, _ = Case(nq=20, nk=20).inputs(device)
    for backend in BACKENDS:
        out = attention(q, k, v, causal=True, causal_offset=-3, backend=backend)
        assert out[:, :, :3].isnan().all() and not out[:, :, 3:].isnan().any(), backend


def test_cpu_chunked_path_matches_reference(monkeypatch):
    # Score chunks of 2 rows: every chunk boundary crosses the causal diagonal, bias rows and segments.
    monkeypatch.setattr(cpu_attention, "_CHUNK_ELEMENTS", 2 * 2 * 4 * 48)
    case = Case(nq=48, nk=48, segments=True, bias="learned", mask="dead_rows",
                params=dict(causal=True, score_fn="relu2", masked_value=-1e4, scale=0.1))  # fmt: skip
    q, k, v, kw = case.inputs("cpu")
    for t in (q, k, v, kw["bias"]):
        t.requires_grad_(True)
    outs, grads = [], []
    for backend in ("reference", "cpu"):
        out = attention(q, k, v, backend=backend, **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, kw["bias"])))
    assert attention_backend("cpu", "cpu", score_fn="relu2")[1].startswith("chunked")
    assert rel_err(outs[1], outs[0]) <= 1e-6
    for g, w in zip(grads[1], grads[0]):
        assert rel_err(g, w) <= 1e-6


def test_sdpa_fully_masked_rows_are_fixed_to_nan():
    q, k, v, kw = Case(mask="dead_rows").inputs("cpu")
    # SDPA itself returns 0 there; the op must give the formula's NaN.
    raw = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kw["mask"])
    assert not raw.isnan().any()
    out = attention(q, k, v, mask=kw["mask"], backend="cpu")
    assert torch.equal(out.isnan(), oracle(q, k, v, mask=kw["mask"]).isnan())


@pytest.mark.parametrize(
    "backend, params, expected",
    [
        ("reference", {}, "reference"),
        ("cpu", {}, "cpu"),
        ("cpu", dict(dropout_p=0.1), "reference"),
        ("triton", dict(head_dim=512), "reference"),
        ("triton", dict(dtype=torch.float64), "reference"),
        ("triton", dict(head_dim=40, dtype=torch.bfloat16), "triton"),
    ],
    ids=["reference", "cpu", "cpu_dropout", "triton_head_dim_512", "triton_float64", "triton_bf16_d40"],
)
def test_attention_backend_names_the_implementation(backend, params, expected):
    name, reason = attention_backend(backend, "cpu", **params)
    assert name == expected and reason


def test_unsupported_triton_cases_fall_back_to_reference(device):
    q, k, v, _ = Case(nq=8, nk=8, d=16).inputs(device)
    q64, k64, v64 = q.double(), k.double(), v.double()
    # float64 computes in float64 in the reference: far below float32 rounding.
    assert rel_err(attention(q64, k64, v64, backend="triton"), oracle(q64, k64, v64)) <= 1e-12
    mixed = attention(q.half(), k, v, backend="triton")
    assert mixed.dtype == torch.float16 and rel_err(mixed, oracle(q.half(), k, v)) <= 1e-3


def test_bad_inputs_raise_value_errors():
    q = torch.randn(1, 3, 4, 8)
    kv = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match="boolean"):
        attention(q, q, q, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="score_fn"):
        attention(q, q, q, score_fn="sigmoid")
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, q, q, bias=torch.zeros(3, 4, 5))


def test_dropout_is_seeded_unbiased_and_differentiable():
    q, k, v = (torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    base = attention(q, k, v)
    torch.manual_seed(5)
    out = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(attention(q, k, v, dropout_p=0.5), out)
    assert not torch.equal(out, base)
    # Inverted dropout keeps the expectation: the mean over many outputs moves little.
    assert abs(out.mean() - base.mean()) < 0.1
    # The backward replays the forward's mask: compare with autograd through that same mask in float64.
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, ()).item())  # what the op draws first
    torch.manual_seed(5)
    got = torch.autograd.grad(attention(*leaves, causal=True, dropout_p=0.5).sum(), leaves)
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    drop = dropout_scale((1, 2, 64, 64), 0.5, seed, torch.device("cpu")).double()
    s = ref[0] @ ref[1].transpose(-1, -2) / 4.0
    s = s.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), -math.inf)
    want = torch.autograd.grad(((torch.softmax(s, -1) * drop) @ ref[2]).sum(), ref)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_opcheck_small_case():
    # Transposed q/k/v: the outputs' layout must not follow the inputs' (the fake impl says contiguous).
    q, k, v, kw = Case(b=1, hq=2, hkv=1, nq=5, nk=7, d=8, bias="learned", mask="dead_rows", transposed=True,
                       params=dict(masked_value=F32_MIN)).inputs("cpu")  # fmt: skip
    for t in (q, k, v, kw["bias"]):
        t.requires_grad_(True)
    schema = str(torch.ops.fxfuse.attention.default._schema)
    assert "float scale, bool causal, int causal_offset, float masked_value, str score_fn" in schema
    args = (q, k, v, kw["bias"], kw["mask"], None, None, 0.3, True, 1, F32_MIN, "softmax", 0.0, "cpu")
    torch.library.opcheck(torch.ops.fxfuse.attention.default, args)


def test_traces_as_one_opaque_node_with_make_fx_and_export():
    from torch.fx.experimental.proxy_tensor import make_fx

    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, causal=True)

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    gm = make_fx(Block(), tracing_mode="fake")(q, k, v)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.fxfuse.attention.default]
    ep = torch.export.export(Block(), (q, k, v))
    assert torch.allclose(ep.module()(q, k, v), Block()(q, k, v))
