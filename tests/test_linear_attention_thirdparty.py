"""Linear attention as public research code spells it (each model written here from the math, in the
spelling style of the project named in its docstring): fused and checked against float64, forward and
gradients; the near misses beside them are left alone, bit for bit, or fused without what is not linear."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from tests.test_linear_attention_match import Core, Fn
from tests.test_linear_attention_spellings import _rel, fused_matches_float64, left_alone

# --- positives -----------------------------------------------------------------------------------------


def fla_retention(q, k, v):
    """Spelled as in flash-linear-attention fla/ops/retention/naive.py: decay exp2((i - j) log2 gamma_h) on
    and below the diagonal, multiplied in as the third operand of one einsum."""
    h, n, d = q.shape[1:]
    log2_gamma = (1 - q.new_tensor(2.0).pow(-5.0 - q.new_tensor(range(h)))).log2()
    pos = q.new_tensor(range(n))
    decay = torch.exp2((pos[:, None] - pos) * log2_gamma.view(-1, 1, 1)) * pos[:, None].ge(pos)
    scores = torch.einsum("bhqd,bhkd,hqk->bhqk", q * d**-0.5, k, decay)
    return torch.einsum("bhqk,bhkd->bhqd", scores, v)


def fla_based(q, k, v):
    """Spelled as in flash-linear-attention fla/ops/based/naive.py (parallel form): exp replaced by its
    Taylor expansion 1 + s + s²/2, ~tril masked_fill_, then o / (w.sum(-1)[..., None] + eps)."""
    n = q.shape[2]
    w = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    w = 1 + w + 1 / 2 * (w**2)
    w.masked_fill_(~torch.tril(torch.ones(n, n, dtype=torch.bool)), 0)
    return (w @ v) / (w.sum(-1)[..., None] + 1e-6)


def fla_rebased(q, k, v):
    """Spelled as in flash-linear-attention fla/ops/rebased/naive.py: squared scores, causal, normalized."""
    n = q.shape[2]
    w = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)) ** 2
    w.masked_fill_(~torch.tril(torch.ones(n, n, dtype=torch.bool)), 0)
    return (w @ v) / (w.sum(-1)[..., None] + 1e-6)


def fast_transformers_causal(q, k, v):
    """Spelled as in fast-transformers' CausalLinearAttention with its causal product written out: [N, L, H, D],
    Z = 1 / (Q . cumsum(K) + eps) applied as V * Z[:, :, :, None]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    z = 1 / (torch.einsum("nlhi,nlhi->nlh", q, k.cumsum(1)) + 1e-6)
    n = q.shape[1]
    w = torch.einsum("nlhd,nshd->nhls", q, k) * torch.tril(torch.ones(n, n))
    return (torch.einsum("nhls,nshm->nlhm", w, v) * z[:, :, :, None]).transpose(1, 2)


def taylor_times_itself_decayed(q, k, v):
    # a generated spelling: s²/2 written s * s * 0.5 (both sides of the outer add reach the product), decayed
    n = q.shape[2]
    s = q @ k.transpose(-2, -1) * 0.3
    pos = torch.arange(n)
    decay = 0.9 ** (pos[:, None] - pos[None, :]).clamp(min=0).float() * torch.tril(torch.ones(n, n))
    return ((1 + s + s * s * 0.5) * decay) @ v


class PerformerCausal(nn.Module):
    """Spelled as in performer-pytorch: softmax_kernel random features (projection matrix in a buffer, the
    row max or global max subtracted, detached) and causal_linear_attention_noncuda's one-chunk form with
    ellipsis einsums: D_inv = 1 / (q . cumsum(k)), cumsum of k vᵀ, one 3-operand einsum."""

    def __init__(self, dim: int = 16, heads: int = 2, features: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("projection", torch.randn(features, dim // heads))

    def features(self, x, is_query: bool):
        norm, ratio = x.shape[-1] ** -0.25, self.projection.shape[0] ** -0.5
        dash = torch.einsum("...id,...jd->...ij", norm * x, self.projection.type_as(x))
        diag = ((x**2).sum(dim=-1) / 2.0 * norm**2).unsqueeze(dim=-1)
        top = dash.amax(dim=-1, keepdim=True) if is_query else dash.amax(dim=(-1, -2), keepdim=True)
        return ratio * (torch.exp(dash - diag - top.detach()) + 1e-4)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        q, k = self.features(q, True), self.features(k, False)
        d_inv = 1.0 / torch.einsum("...nd,...nd->...n", q, k.cumsum(dim=-2).type_as(q))
        context = torch.einsum("...nd,...ne->...nde", k, v).cumsum(dim=-3)
        out = torch.einsum("...nde,...nd,...n->...ne", context, q, d_inv)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def fla_normalize_output(q, k, v):
    """Spelled as in flash-linear-attention fla/ops/linear_attn/utils.py normalize_output: the causal output
    divided by (q * k.cumsum(-2)).sum(-1, keepdim=True) + eps (here after a tril quadratic form)."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    o = torch.tril(q @ k.transpose(-2, -1)) @ v
    return o / ((q * k.cumsum(-2)).sum(-1, keepdim=True) + 1e-10)


def kv_over_length(q, k, v):
    # a generated spelling: k^T v divided by the sequence length, as FLASH's global linear part divides it
    kv = torch.einsum("bhnd,bhne->bhde", F.relu(k), v) / q.shape[2]
    return torch.einsum("bhnd,bhde->bhne", F.relu(q), kv)


class TaylorExp(nn.Module):
    """Spelled as in HazyResearch based's TaylorExp feature map: [1, x / d^(1/4), vec(x xᵀ) / (sqrt(2) sqrt(d))]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.r2, self.rd, self.rrd = math.sqrt(2), math.sqrt(d), math.sqrt(math.sqrt(d))

    def forward(self, x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / self.r2
        return torch.cat([torch.ones(x[..., :1].shape), x / self.rrd, x2 / self.rd], dim=-1)


class HazyBased(nn.Module):
    """Spelled as in HazyResearch based's LinearAttention.parallel_forward: tril(A) of the feature product,
    z = 1 / (q . cumsum(k) + eps) from the linear form, y * z[..., None]."""

    def __init__(self, dim: int = 16, heads: int = 2, feature_dim: int = 2) -> None:
        super().__init__()
        self.heads, self.fd = heads, feature_dim
        self.q, self.k = nn.Linear(dim, heads * feature_dim), nn.Linear(dim, heads * feature_dim)
        self.v, self.feature_map = nn.Linear(dim, dim), TaylorExp(feature_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k = (p(x).view(b, n, self.heads, self.fd).transpose(1, 2) for p in (self.q, self.k))
        v = self.v(x).view(b, n, self.heads, -1).transpose(1, 2)
        q, k = self.feature_map(q), self.feature_map(k)
        a = torch.tril(torch.einsum("bhnd,bhmd->bhnm", q, k))
        y = torch.einsum("bhnm,bhme->bhne", a, v)
        z = 1 / (torch.einsum("bhld,bhld->bhl", q, k.cumsum(2)) + 1e-12)
        return (y * z[..., None]).transpose(1, 2).reshape(b, n, -1)


class TorchscaleRetention(nn.Module):
    """Spelled as in torchscale's RetNetRelPos + MultiScaleRetention.parallel_forward: the decay mask built with
    masked_fill(inf), exp and nan_to_num; `scaled` divides it by the square root of its row sums, `abs_sum`
    normalizes the scores by |scores|.sum(-1).clamp(1, 5e4) (as torchscale does)."""

    def __init__(self, dim: int = 16, heads: int = 2, scaled: bool = False, abs_sum: bool = False) -> None:
        super().__init__()
        self.heads, self.scaled, self.abs_sum = heads, scaled, abs_sum
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("decay", torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float))))

    def forward(self, x):
        b, n, _ = x.shape
        index = torch.arange(n).to(self.decay)
        keep = torch.tril(torch.ones(n, n).to(self.decay)).bool()
        dist = torch.masked_fill(index[:, None] - index[None, :], ~keep, float("inf"))
        mask = torch.nan_to_num(torch.exp(dist * self.decay[:, None, None]))
        if self.scaled:
            mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        w = (q @ (k * q.shape[-1] ** -0.5).transpose(-1, -2)) * mask
        if self.abs_sum:
            w = w / w.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1, max=5e4)
        return self.o((w @ v).transpose(1, 2).reshape(b, n, -1))


class LightningChunks(nn.Module):
    """Spelled as in transformers' MiniMaxLightningAttention (prefill): silu features, blocks of `block` rows,
    decay factors exp(-slope_h ...) held in buffers and sliced per block, a zero [D, E] state carried with
    its block decay exp(-slope_h * c)."""

    def __init__(self, dim: int = 16, heads: int = 2, block: int = 4) -> None:
        super().__init__()
        self.heads, self.block = heads, block
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        slope = ((2 ** (-8 / heads)) ** (torch.arange(heads) + 1.0))[:, None, None]
        rows = torch.arange(block) + 1
        dist = slope * (rows[:, None] - rows[None, :])[None, None]
        self.register_buffer("slope", slope)
        self.register_buffer("q_decay", torch.exp(-slope * rows[:, None]))
        self.register_buffer("k_decay", torch.exp(-slope * (block - rows[:, None])))
        self.register_buffer("diag_decay", torch.exp(torch.where(dist >= 0, -dist, float("-inf"))))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in F.silu(self.qkv(x)).chunk(3, -1))
        state = torch.zeros(b, self.heads, q.shape[-1], v.shape[-1], dtype=v.dtype)
        outs = []
        for start in range(0, n, self.block):
            end = min(start + self.block, n)
            c = end - start
            qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
            intra = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * self.diag_decay[:, :, :c, :c], vc)
            outs.append(torch.matmul(qc * self.q_decay[:, :c], state) + intra)
            update = torch.matmul((kc * self.k_decay[:, -c:]).transpose(-1, -2), vc)
            state = state * torch.exp(-self.slope * c) + update
        return self.o(torch.cat(outs, dim=-2).transpose(1, 2).reshape(b, n, -1))


POSITIVES = {
    "fla_retention": (lambda: Core(fla_retention), 12, ["causal, decay 0.9688/0.9844"]),
    "fla_based": (lambda: Core(fla_based, heads=4), 24, ["φ=taylor 1 + s + s²/2", "row-sum + 1e-06", "causal"]),
    "fla_rebased": (lambda: Core(fla_rebased, heads=4), 24, ["φ=square s²", "row-sum + 1e-06", "causal"]),
    "fast_transformers_causal": (lambda: Core(fast_transformers_causal), 12, ["φ=elu+1", "row-sum + 1e-06", "causal"]),
    "hazy_based": (HazyBased, 12, ["row-sum + 1e-12", "causal"]),
    "performer_causal": (PerformerCausal, 12, ["cumsum of k vᵀ", "row-sum", "causal"]),
    # 10 rows: the last block is partial, its factors sliced shorter
    "minimax_lightning_chunks": (LightningChunks, 10, ["chunk loop (3 chunks of 4, last 2)", "decay 0.9394/0.9961"]),
}


@pytest.mark.parametrize("name", list(POSITIVES))
def test_thirdparty_spelling_fused(name):
    make, n, phrases = POSITIVES[name]
    torch.manual_seed(0)
    fused_matches_float64(make(), (torch.randn(2, n, 16),), phrases)


# spellings whose new part is the reading (the op and its backward are the same): forward only, in eval mode
SPELLINGS = {
    "taylor_times_itself_decayed": (taylor_times_itself_decayed, 4, 24, ["φ=taylor 1 + s + s²/2", "decay 0.9"]),
    "fla_normalize_output": (fla_normalize_output, 2, 12, ["φ=elu+1", "row-sum + 1e-10", "causal"]),
    "kv_over_length": (kv_over_length, 2, 12, ["already linear", "φ=relu", "no normaliser"]),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_fused_forward(name):
    core, heads, n, phrases = SPELLINGS[name]
    torch.manual_seed(0)
    model, x = Core(core, heads=heads).eval(), torch.randn(2, n, 16)
    opt = fxfuse.optimize(model, (x,), patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1 and all(p in rep.rewrites[0].variant for p in phrases), rep
    with torch.no_grad():
        assert _rel(opt(x), copy.deepcopy(model).double()(x.double())) < 1e-5


# --- near misses ----------------------------------------------------------------------------------------


class Whole(nn.Module):
    """A model that takes x: its own projections, `left_alone` feeds it (x,) instead of (q, k, v)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, q, k, v):
        return self.model(q)


def gla_data_dependent_decay(q, k, v):
    # simple GLA's parallel form: the decay exp(g_i - g_j) comes from the input, not a constant
    g = F.logsigmoid(v[..., 0]).cumsum(-1)
    n = q.shape[2]
    decay = (g[..., :, None] - g[..., None, :]).exp() * torch.tril(torch.ones(n, n))
    return ((q @ k.transpose(-2, -1)) * decay) @ v


def performer_eps_inside_cumsum(q, k, v):
    # performer-pytorch's causal_linear_attention_noncuda (one chunk): eps is added to cumsum(k), so the
    # denominator is q . cumsum(k) + eps * sum(q), not a row sum + eps
    q, k = torch.exp(q), torch.exp(k)
    k_cumsum = 0 + k.cumsum(dim=-2)
    d_inv = 1.0 / torch.einsum("...nd,...nd->...n", q, k_cumsum + 1e-3)
    context = 0 + torch.einsum("...nd,...ne->...nde", k, v).cumsum(dim=-3)
    return torch.einsum("...nde,...nd,...n->...ne", context, q, d_inv)


def strictly_causal_tril(q, k, v):
    return torch.tril(F.relu(q) @ F.relu(k).transpose(-2, -1), -1) @ v


def einsum_mask_transposed(q, k, v):
    # the third einsum operand laid out [k, q]: the mask is upper-triangular in [q, k]
    n = q.shape[2]
    scores = torch.einsum("bhqd,bhkd,kq->bhqk", q, k, torch.tril(torch.ones(n, n)))
    return torch.einsum("bhqk,bhkd->bhqd", scores, v)


NEAR_MISSES = {
    "torchscale_abs_sum": (Whole(TorchscaleRetention(abs_sum=True)), "abs-sum"),
    "torchscale_sqrt_scaled_mask": (Whole(TorchscaleRetention(scaled=True)), "not causal-structured"),
    "gla_data_dependent_decay": (Fn(gla_data_dependent_decay), "not a constant"),
    "performer_eps_inside_cumsum": (Fn(performer_eps_inside_cumsum), None),
    "strictly_causal_tril": (Fn(strictly_causal_tril), "not causal-structured"),
    "einsum_mask_transposed": (Fn(einsum_mask_transposed), "not causal-structured"),
    "rebased_fewer_keys_than_features": (Fn(fla_rebased), "outnumber the keys"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_thirdparty_near_miss_left_alone(name):
    model, reason = NEAR_MISSES[name]
    torch.manual_seed(0)
    x = torch.randn(2, 12, 16)
    qkv = (x, x, x) if isinstance(model, Whole) else tuple(torch.rand(2, 2, 12, 8) for _ in range(3))
    left_alone(model, qkv, reason)


def scaled_scores_linear_normaliser(q, k, v):
    # the weights carry a scale that q . cumsum(k) does not: not their row sum
    q, k = F.elu(q) + 1, F.elu(k) + 1
    n = q.shape[2]
    w = (q @ k.transpose(-2, -1)) * 0.5 * torch.tril(torch.ones(n, n))
    return (w @ v) / (torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2)) + 1e-6).unsqueeze(-1)


def causal_weights_full_sum(q, k, v):
    # causal weights divided by q . sum(k) over every key: not their row sum
    q, k = F.elu(q) + 1, F.elu(k) + 1
    w = torch.tril(q @ k.transpose(-2, -1))
    return (w @ v) / (torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + 1e-6).unsqueeze(-1)


def scaled_kv_unscaled_row_sum(q, k, v):
    # k^T v halved, its row sum not: the division is not the op's normaliser
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bhnd,bhne->bhde", k, v) * 0.5
    return torch.einsum("bhnd,bhde->bhne", q, kv) / (torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + 1e-3).unsqueeze(-1)


def heads_paired_with_rows(q, k, v):
    # q * cumsum(k) with q laid out [B, N, H, D]: with N == H the shapes agree, the axes do not
    q, k = F.elu(q) + 1, F.elu(k) + 1
    context = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
    den = (q.transpose(1, 2) * k.cumsum(2)).sum(-1, keepdim=True)
    return torch.einsum("bhnd,bhnde->bhne", q, context) / (den + 1e-6)


@pytest.mark.parametrize(
    "core, n",
    [
        (scaled_scores_linear_normaliser, 12),
        (causal_weights_full_sum, 12),
        (heads_paired_with_rows, 2),
        (scaled_kv_unscaled_row_sum, 12),
    ],
)
def test_normaliser_that_is_not_the_row_sum_stays_outside(core, n):
    # the product is fused, the division stays as written
    model, x = Core(core).eval(), torch.randn(2, n, 16)
    opt = fxfuse.optimize(model, (x,), patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1 and "no normaliser" in rep.rewrites[0].variant, rep
    with torch.no_grad():
        assert _rel(opt(x), copy.deepcopy(model).double()(x.double())) < 1e-5


def test_lightning_decay_buffers_are_proven_and_guarded():
    # a key decay that is not exp(-slope (C - j)) is left alone; a proven one written to later runs as captured
    torch.manual_seed(0)
    x = torch.randn(2, 12, 16)
    wrong = LightningChunks().eval()
    wrong.k_decay.mul_(0.5)
    left_alone(Whole(wrong), (x, x, x), "decay factor ζ is not what decay")
    model = LightningChunks().eval()
    opt = fxfuse.optimize(model, (x,), patterns=["linear_attention"])
    assert fxfuse.report(opt).count("linear_attention") == 1
    with torch.no_grad():
        opt(x)
        model.k_decay.mul_(0.5)
        with pytest.warns(UserWarning, match="buffer that a rewrite relies on changed"):
            got = opt(x)
        assert torch.equal(got, model(x))


def taylor_with_alpha(q, k, v, inner: bool):
    # add(x, y, alpha=2) is x + 2y: not 1 + s + s²/2 (d = 2: 7 Taylor features, fewer than the 12 keys)
    s = q[..., :2] @ k[..., :2].transpose(-2, -1) * 0.3
    w = torch.add(s, 1, alpha=2) + s**2 / 2 if inner else torch.add(1 + s, s * s * 0.5, alpha=2)
    return torch.tril(w) @ v


@pytest.mark.parametrize("inner", [True, False], ids=["one_plus_s", "outer_add"])
def test_taylor_spelled_with_alpha_is_not_matched(inner):
    # the matcher itself must leave it alone: checked with verification off, which would otherwise catch it
    model = Fn(lambda q, k, v: taylor_with_alpha(q, k, v, inner))
    inputs = tuple(torch.randn(2, 2, 12, 8) for _ in range(3))
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"], verify=False)
    assert fxfuse.report(opt).count("linear_attention") == 0, fxfuse.report(opt)
    with torch.no_grad():
        assert torch.equal(opt(*inputs), model(*inputs))


def _decay_matrix(n: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)
    gamma = torch.tensor([0.9, 0.7]).view(-1, 1, 1)
    return gamma ** (pos[:, None] - pos).clamp(min=0) * (pos[:, None] >= pos)


def squared_decayed_einsum(q, k, v):
    # the decay multiplies s inside the square: (s D)², which is not s² D
    return torch.einsum("bhqd,bhkd,hqk->bhqk", q, k, _decay_matrix(q.shape[2])) ** 2 @ v


def taylor_of_decayed_einsum(q, k, v):
    e = torch.einsum("bhqd,bhkd,hqk->bhqk", q, k, _decay_matrix(q.shape[2]))
    return (1 + e + e**2 / 2) @ v


@pytest.mark.parametrize("fn", [squared_decayed_einsum, taylor_of_decayed_einsum], ids=lambda f: f.__name__)
def test_factor_inside_an_expansion_is_not_matched(fn):
    model = Fn(fn)
    inputs = tuple(torch.randn(2, 2, 40, 4) * 0.5 for _ in range(3))
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"], verify=False)
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 0, rep
    assert any("inside their expansion" in r.reason for r in rep.rejected("linear_attention")), rep
    with torch.no_grad():
        assert torch.equal(opt(*inputs), model(*inputs))


@pytest.mark.parametrize(
    "fn",
    [lambda q, k, v: (q @ k.transpose(-2, -1)) @ (v / 2),
     lambda q, k, v: torch.tril(q @ k.transpose(-2, -1)) @ (v * 3),
     lambda q, k, v: q @ (k.transpose(-2, -1) @ (v * 0.5)),
     lambda q, k, v: (lambda w: (w @ (v * 0.5)) / (w.sum(-1, keepdim=True) + 1.0))(q @ k.transpose(-2, -1))],
    ids=["quadratic", "causal", "already_linear", "row_normalised"],
)  # fmt: skip
def test_scale_on_v_is_kept(fn):
    # the matcher itself must carry v's scale: checked with verification off
    model = Fn(fn)
    inputs = tuple(torch.rand(2, 2, 40, 4) for _ in range(3))
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"], verify=False)
    assert fxfuse.report(opt).count("linear_attention") == 1, fxfuse.report(opt)
    with torch.no_grad():
        want = model(*(x.double() for x in inputs))
        assert _rel(opt(*inputs), want) < 1e-5
