"""More linear-attention spellings: normalisers written as a product with a reciprocal, causal masks held
in buffers. Each is fused and checked, forward and gradients, against the model run in float64; each
near miss is left alone, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.backends import CALLS
from tests.test_linear_attention_match import Core, Fn


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def fused_matches_float64(model: nn.Module, inputs: tuple, phrases: list[str]) -> None:
    """Optimized in training mode: one linear-attention rewrite with `phrases` in its variant, outputs and
    gradients (inputs and parameters) within 1e-4 of the original model run in float64."""
    opt = fxfuse.optimize(model.train(), inputs, patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 1, rep
    variant = rep.rewrites[0].variant
    assert all(p in variant for p in phrases), variant
    x = inputs[0].clone().requires_grad_()
    out = opt(x, *inputs[1:])
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    ref = copy.deepcopy(model).double()
    x64 = inputs[0].double().requires_grad_()
    want = ref(x64, *(t.double() for t in inputs[1:]))
    (want * cot.double()).sum().backward()
    assert _rel(out.detach(), want.detach()) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-4
    for (name, p), p64 in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert _rel(p.grad, p64.grad) < 1e-4, name


# --- 1. the row normaliser as a multiplication by a reciprocal ------------------------------------------


def reciprocal_of_eps_sum(q, k, v):
    # s * (1 / (s.sum(-1, keepdim=True) + eps)): `1 / x` reaches the graph as reciprocal(x)
    s = F.relu(q) @ F.relu(k).transpose(-2, -1)
    return (s * (1 / (s.sum(-1, keepdim=True) + 1e-6))) @ v


def power_minus_one(q, k, v):
    # (rowsum + eps) ** -1
    s = F.relu(q) @ F.relu(k).transpose(-2, -1)
    return (s * (s.sum(-1, keepdim=True) + 1e-6) ** -1) @ v


def reciprocal_clamped_causal(q, k, v):
    # torch.reciprocal of a clamped row sum, on the left, causal tril mask
    n = q.shape[2]
    s = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * torch.tril(torch.ones(n, n))
    return (torch.reciprocal(s.sum(-1, keepdim=True).clamp(min=1e-4)) * s) @ v


def reciprocal_after_product(q, k, v):
    # the reciprocal row sum scales the product's output
    s = torch.exp(q) @ torch.exp(k).transpose(-2, -1)
    return (s @ v) * (1.0 / (1e-6 + s.sum(-1, keepdim=True)))


def fast_transformers_three_way(q, k, v):
    # fast-transformers' LinearAttention: [N, L, H, D], Z = 1 / (Q . sum(K) + eps), one 3-operand einsum
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("nshd,nshm->nhmd", k, v)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + 1e-6)
    return torch.einsum("nlhd,nhmd,nlh->nlhm", q, kv, z).transpose(1, 2)


def performer_reciprocal_clamp(q, k, v):
    # (q @ kv) * reciprocal(clamp(q . sum(k), min))[..., None]
    q, k = F.relu(q), F.relu(k)
    kv = k.transpose(-2, -1) @ v
    den = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)).clamp(min=1e-3)
    return (q @ kv) * torch.reciprocal(den).unsqueeze(-1)


def performer_pytorch_ellipsis(q, k, v):
    # performer-pytorch's linear_attention: ellipsis einsums, D_inv without eps as the third operand
    q, k = torch.exp(q), torch.exp(k)
    d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k.sum(dim=-2).type_as(q))
    context = torch.einsum("...nd,...ne->...de", k, v)
    return torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)


RECIPROCALS = {
    "reciprocal_of_eps_sum": (reciprocal_of_eps_sum, ["quadratic form", "φ=relu", "row-sum + 1e-06"]),
    "power_minus_one": (power_minus_one, ["quadratic form", "row-sum + 1e-06"]),
    "reciprocal_clamped_causal": (reciprocal_clamped_causal, ["φ=elu+1", "row-sum clamp(min=0.0001)", "causal"]),
    "reciprocal_after_product": (reciprocal_after_product, ["φ=exp", "row-sum + 1e-06"]),
    "fast_transformers_three_way": (fast_transformers_three_way, ["already linear", "φ=elu+1", "row-sum + 1e-06"]),
    "performer_reciprocal_clamp": (performer_reciprocal_clamp, ["already linear", "row-sum clamp(min=0.001)"]),
    "performer_pytorch_ellipsis": (performer_pytorch_ellipsis, ["already linear", "φ=exp", "row-sum"]),
}


@pytest.mark.parametrize("name", list(RECIPROCALS))
def test_reciprocal_normaliser_fused(name):
    core, phrases = RECIPROCALS[name]
    torch.manual_seed(0)
    fused_matches_float64(Core(core), (torch.randn(2, 12, 16),), phrases)


def reciprocal_of_row_max(q, k, v):
    s = F.relu(q) @ F.relu(k).transpose(-2, -1)
    return (s * torch.reciprocal(s.amax(-1, keepdim=True) + 1e-6)) @ v


def reciprocal_of_column_sum(q, k, v):
    s = F.relu(q) @ F.relu(k).transpose(-2, -1)
    return (s * (1 / (s.sum(-2, keepdim=True) + 1e-6))) @ v


def three_way_sum_over_features(q, k, v):
    # z sums k over its feature axis, not the sequence: not q . sum_j k_j
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("nshd,nshm->nhmd", k, v)
    z = 1 / (torch.einsum("nlhd,nlh->nlh", q, k.sum(dim=3)) + 1e-6)
    return torch.einsum("nlhd,nhmd,nlh->nlhm", q, kv, z).transpose(1, 2)


def three_way_reciprocal_of_q(q, k, v):
    # z = 1 / (sum(q) + eps): no k in the denominator
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("nshd,nshm->nhmd", k, v)
    return torch.einsum("nlhd,nhmd,nlh->nlhm", q, kv, 1 / (q.sum(-1) + 1e-6)).transpose(1, 2)


RECIPROCAL_NEAR_MISSES = {
    "reciprocal_of_row_max": (reciprocal_of_row_max, "not a constant"),
    "reciprocal_of_column_sum": (reciprocal_of_column_sum, "not a sum over the key axis"),
    "three_way_sum_over_features": (three_way_sum_over_features, None),
    "three_way_reciprocal_of_q": (three_way_reciprocal_of_q, None),
}


def left_alone(model: nn.Module, inputs: tuple, reason: str | None) -> None:
    opt = fxfuse.optimize(model, inputs, patterns=["linear_attention"])
    rep = fxfuse.report(opt)
    assert rep.count("linear_attention") == 0, rep
    found = [r for r in rep.rewrites if r.pattern == "linear_attention"]
    if reason is None:
        assert not found or all(r.status == "rejected" for r in found), rep
    else:
        assert len(found) == 1 and reason in found[0].reason, rep
    with torch.no_grad():
        assert torch.equal(opt(*inputs), model(*inputs))


@pytest.mark.parametrize("name", list(RECIPROCAL_NEAR_MISSES))
def test_reciprocal_near_miss_left_alone(name):
    core, reason = RECIPROCAL_NEAR_MISSES[name]
    left_alone(Fn(core), tuple(torch.rand(2, 2, 12, 8) for _ in range(3)), reason)


# --- 2. causal masks held in buffers ---------------------------------------------------------------------


class BufferMasked(nn.Module):
    """Causal linear attention whose mask is a buffer, sliced to the length as nanoGPT slices `bias`."""

    def __init__(self, mask: torch.Tensor, dim: int = 16, heads: int = 2, normalised: bool = True) -> None:
        super().__init__()
        self.heads, self.normalised = heads, normalised
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("mask", mask)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        s = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
        mask = self.mask[..., :n, :n]
        s = s.masked_fill(mask == 0, 0.0) if mask.dtype == torch.bool or mask.dim() == 4 else s * mask
        if self.normalised:
            s = s / (s.sum(-1, keepdim=True) + 1e-6)
        out = s @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def _decay_buffer(n: int) -> torch.Tensor:
    i = torch.arange(n)
    gamma = torch.tensor([0.9, 0.97]).view(-1, 1, 1)
    dist = (i[:, None] - i[None, :]).float()
    return torch.pow(gamma, dist.clamp(min=0)).masked_fill(dist < 0, 0.0)


BUFFERS = {
    "gpt2_bias_sliced": (lambda: torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16), True, ["causal", "buffer mask"]),
    "decay_buffer": (lambda: _decay_buffer(16), False, ["causal, decay 0.9/0.97", "buffer mask"]),
}


@pytest.mark.parametrize("name", list(BUFFERS))
def test_causal_buffer_mask_fused(name):
    make, normalised, phrases = BUFFERS[name]
    torch.manual_seed(0)
    fused_matches_float64(BufferMasked(make(), normalised=normalised), (torch.randn(2, 12, 16),), phrases)


def test_buffer_changed_after_optimize_runs_as_captured():
    # the fused op relies on the value read at optimize time: a changed buffer must not go unseen
    torch.manual_seed(0)
    model = BufferMasked(torch.tril(torch.ones(12, 12))).eval()
    x = torch.randn(2, 12, 16)
    opt = fxfuse.optimize(model, (x,), patterns=["linear_attention"])
    assert fxfuse.report(opt).count("linear_attention") == 1
    truth = lambda: copy.deepcopy(model).double()(x.double())  # noqa: E731

    def fused_calls(run):
        before = sum(n for (op, _), n in CALLS.items() if op == "linear_attention")
        out = run()
        return out, sum(n for (op, _), n in CALLS.items() if op == "linear_attention") - before

    with torch.no_grad():
        opt(x)  # captured again for no_grad: the calls below count fused-op runs only
        model.load_state_dict(model.state_dict())  # same values written again: still fused
        got, calls = fused_calls(lambda: opt(x))
        assert calls == 1 and _rel(got, truth()) < 1e-5
        model.mask.fill_(1.0)  # now a full mask: not causal
        with pytest.warns(UserWarning, match="buffer that a rewrite relies on changed"):
            got, calls = fused_calls(lambda: opt(x))
        assert calls == 0 and torch.equal(got, model(x))
        model.mask.copy_(torch.tril(torch.ones(12, 12)))  # back to the proven value: fused again
        got, calls = fused_calls(lambda: opt(x))
        assert calls == 1 and _rel(got, truth()) < 1e-5
        model.mask.data = torch.ones(12, 12)  # new storage, same version counter
        got, calls = fused_calls(lambda: opt(x))
        assert calls == 0 and torch.equal(got, model(x))
        model.mask = torch.tril(torch.ones(12, 12))  # another tensor holding the proven value
        got, calls = fused_calls(lambda: opt(x))
        assert calls == 1 and _rel(got, truth()) < 1e-5
    assert any("buffer that a rewrite relies on changed" in n for n in fxfuse.report(opt).notes)


class InputMasked(nn.Module):
    def forward(self, q, k, v, mask):
        return ((F.relu(q) @ F.relu(k).transpose(-2, -1)) * mask) @ v


def test_buffer_mask_near_misses_left_alone():
    banded = torch.triu(torch.tril(torch.ones(12, 12)), -2)  # a sliding window: not causal-structured
    model = BufferMasked(banded).eval()
    left_alone(model, (torch.randn(2, 12, 16),), "not causal-structured")
    qkv = tuple(torch.rand(2, 2, 12, 8) for _ in range(3))
    left_alone(InputMasked(), (*qkv, torch.tril(torch.ones(12, 12))), "not a constant")


# --- 3, 4. already linear in buckets: a running sum of bucket states shifted by one bucket ---------------


def bucket_states(q, k, v, c: int, shift: int = 1, axis: int = 2, spelling: str = "pad_slice"):
    """[B, H, N, D] -> q, k, v in buckets [B, H, G, C, D] and the states of the buckets before each one."""
    b, h, n, _ = q.shape
    qb, kb, vb = (t.reshape(b, h, n // c, c, t.shape[-1]) for t in (q, k, v))
    kv = torch.einsum("bhgcd,bhgce->bhgde", kb, vb)
    if spelling == "pad_slice":  # zero bucket in front, last dropped
        kv = F.pad(kv.cumsum(dim=axis), (0, 0, 0, 0, shift, 0))[:, :, :-shift]
    else:  # an exclusive running sum
        kv = kv.cumsum(dim=axis) - kv
    return qb, kb, vb, kv


def bucketed_causal(q, k, v, spelling="pad_slice", intra=True, shift=1, axis=2):
    # inter-bucket running sum + intra-bucket causal quadratic part = causal linear attention
    b, h, n, _ = q.shape
    q, k = F.elu(q) + 1, F.elu(k) + 1
    qb, kb, vb, kv = bucket_states(q, k, v, 4, shift, axis, spelling)
    out = torch.einsum("bhgcd,bhgde->bhgce", qb, kv)
    if intra:
        out = out + (qb @ kb.transpose(-1, -2) * torch.tril(torch.ones(4, 4))) @ vb
    return out.reshape(b, h, n, -1)


def flash_groups(q, k, v, quadratic="linear"):
    # FLASH's layout: heads merged into the batch, groups 'b g n d', states divided by the group size,
    # shifted by F.pad(..., (0, 0, 0, 0, 1, -1)); the intra-group part linear (causal) or relu² (FLASH's own)
    b, h, n, d = q.shape
    c = 4
    q, k = F.relu(q), F.relu(k)
    lq, lk, lv = (t.reshape(b * h, n // c, c, d) for t in (q, k, v))
    lin_kv = torch.einsum("bgnd,bgne->bgde", lk, lv) / c
    lin_kv = F.pad(lin_kv.cumsum(dim=1), (0, 0, 0, 0, 1, -1), value=0.0)
    lin_out = torch.einsum("bgde,bgnd->bgne", lin_kv, lq)
    sim = torch.einsum("bgid,bgjd->bgij", lq, lk) / c
    if quadratic == "none":  # the global linear part alone
        return lin_out.reshape(b, h, n, d)
    if quadratic == "linear":
        quad = sim.masked_fill(torch.ones(c, c, dtype=torch.bool).triu(1), 0.0)
    else:
        quad = F.relu(sim.masked_fill(torch.ones(c, c, dtype=torch.bool).triu(1), 0.0)) ** 2
    quad_out = torch.einsum("bgij,bgjd->bgid", quad, lv)
    return (quad_out + lin_out).reshape(b, h, n, d)


def fla_naive_chunks(q, k, v, c=4):
    # flash-linear-attention's naive chunk form: k^T @ v per chunk, cat([zeros, cumsum[:-1]]), masked_fill_
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b, h, n // c, c, t.shape[-1]) for t in (q * d**-0.5, k, v))
    kv = (k.transpose(-1, -2) @ v).cumsum(2)
    kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
    mask = torch.triu(torch.ones(c, c, dtype=torch.bool), diagonal=1)
    o = q @ kv + (q @ k.transpose(-1, -2)).masked_fill_(mask, 0) @ v
    return o.reshape(b, h, n, -1)


BUCKETED = {
    "pad_slice_5d": (bucketed_causal, ["buckets of 4", "φ=elu+1", "causal"]),
    "exclusive_cumsum": (lambda q, k, v: bucketed_causal(q, k, v, "sub"), ["bucketed running sum"]),
    "flash_groups_linear_intra": (flash_groups, ["buckets of 4", "φ=relu", "causal"]),
    "fla_naive_chunks": (fla_naive_chunks, ["buckets of 4", "causal"]),
}


@pytest.mark.parametrize("name", list(BUCKETED))
def test_bucketed_running_sum_with_intra_part_fused(name):
    core, phrases = BUCKETED[name]
    torch.manual_seed(0)
    fused_matches_float64(Core(core), (torch.randn(2, 12, 16),), phrases)


def lucidrains_causal_linear_attn(q, k, v, bucket_size=4, eps=1e-3, shift_den=True):
    # linear-attention-transformer's causal_linear_attn: buckets see only the buckets before them
    b, h, n, e = q.shape
    q, k = q.softmax(dim=-1) * e**-0.5, torch.exp(k)
    b_q, b_k, b_v = (x.reshape(*x.shape[:-2], -1, bucket_size, e) for x in (q, k, v))
    b_k_cumsum = b_k.sum(dim=-2).cumsum(dim=-2)
    context = torch.einsum("bhund,bhune->bhude", b_k, b_v).cumsum(dim=-3)
    context = F.pad(context, (0, 0, 0, 0, 1, 0), value=0.0)[:, :, :-1]
    if shift_den:  # (a near miss divides by the sum over its own bucket too)
        b_k_cumsum = F.pad(b_k_cumsum, (0, 0, 1, 0), value=0.0)[:, :, :-1]
    d_inv = 1.0 / torch.einsum("bhud,bhund->bhun", b_k_cumsum, b_q).clamp(min=eps)
    return torch.einsum("bhund,bhude,bhun->bhune", b_q, context, d_inv).reshape(*q.shape)


BLOCK_EXCLUSIVE = ["buckets of 4", "block-exclusive (not token-causal)"]
# no intra-bucket part: a bucket reads only the buckets before it -> linear_attention(causal, block=4)
BUCKETED_BLOCK_EXCLUSIVE = {
    "no_intra_part": (lambda q, k, v: bucketed_causal(q, k, v, intra=False), [*BLOCK_EXCLUSIVE, "φ=elu+1"]),
    "exclusive_cumsum_no_intra": (lambda q, k, v: bucketed_causal(q, k, v, "sub", intra=False), BLOCK_EXCLUSIVE),
    "flash_linear_part_alone": (lambda q, k, v: flash_groups(q, k, v, "none"), [*BLOCK_EXCLUSIVE, "scale 0.25"]),
    # FLASH itself: its relu² intra-group part stays as written, the global linear part is fused
    "flash_relu2_intra": (lambda q, k, v: flash_groups(q, k, v, "relu2"), [*BLOCK_EXCLUSIVE, "φ=relu"]),
    # its D_inv = 1 / clamp(q . (k summed per bucket, running sum shifted by one bucket), eps) is the normaliser
    "lucidrains_causal_linear_attn": (lucidrains_causal_linear_attn, [*BLOCK_EXCLUSIVE, "normaliser clamp(min=eps)"]),
}


@pytest.mark.parametrize("name", list(BUCKETED_BLOCK_EXCLUSIVE))
def test_bucketed_running_sum_alone_fused_block_exclusive(name):
    core, phrases = BUCKETED_BLOCK_EXCLUSIVE[name]
    torch.manual_seed(0)
    fused_matches_float64(Core(core), (torch.randn(2, 12, 16),), phrases)


def padded_to_whole_buckets(q, k, v):
    # the sequence zero-padded to a multiple of the bucket first, the output cut back: exact as written
    n = q.shape[2]
    q, k, v = (F.pad(t, (0, 0, 0, -n % 4)) for t in (q, k, v))
    return bucketed_causal(q, k, v, intra=False)[:, :, :n]


def test_bucketed_running_sum_of_a_padded_sequence_fused():
    torch.manual_seed(0)
    fused_matches_float64(Core(padded_to_whole_buckets), (torch.randn(2, 10, 16),), BLOCK_EXCLUSIVE)


BUCKET_NEAR_MISSES = {
    "lucidrains_own_bucket_in_normaliser": (
        lambda q, k, v: lucidrains_causal_linear_attn(q, k, v, shift_den=False),
        "not read as the op's normaliser",
    ),
    "shift_by_two": (lambda q, k, v: bucketed_causal(q, k, v, shift=2), "shifted by 2 buckets"),
    "cumsum_over_heads": (lambda q, k, v: bucketed_causal(q, k, v, axis=1), None),
}


@pytest.mark.parametrize("name", list(BUCKET_NEAR_MISSES))
def test_bucketed_near_miss_left_alone(name):
    core, reason = BUCKET_NEAR_MISSES[name]
    left_alone(Fn(core), tuple(torch.rand(2, 2, 12, 8) for _ in range(3)), reason)


class _ChunkLoopBufferMask(torch.nn.Module):
    """A chunk loop whose intra-chunk causal mask is a module buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(4, 4)))

    def forward(self, q, k, v):
        state, outs = None, []
        for qi, ki, vi in zip(q.split(4, 2), k.split(4, 2), v.split(4, 2), strict=True):
            out = torch.einsum("bhnm,bhme->bhne", torch.einsum("bhnd,bhmd->bhnm", qi, ki) * self.tril, vi)
            outs.append(out if state is None else out + torch.einsum("bhnd,bhde->bhne", qi, state))
            kv = torch.einsum("bhmd,bhme->bhde", ki, vi)
            state = kv if state is None else state + kv
        return torch.cat(outs, dim=2)


class _BucketBufferMask(torch.nn.Module):
    """Bucketed running sums plus the intra-bucket causal part, its mask a module buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(4, 4)))

    def forward(self, q, k, v):
        b, h, n, _ = q.shape
        q, k = F.elu(q) + 1, F.elu(k) + 1
        qb, kb, vb, kv = bucket_states(q, k, v, 4)
        out = torch.einsum("bhgcd,bhgde->bhgce", qb, kv) + (qb @ kb.transpose(-1, -2) * self.tril) @ vb
        return out.reshape(b, h, n, -1)


@pytest.mark.parametrize("make", [_ChunkLoopBufferMask, _BucketBufferMask], ids=["chunk_loop", "buckets"])
def test_buffer_mask_folded_by_other_rules_is_guarded_too(make):
    # chunk loops and bucketed sums fold a buffer's tril mask as well: a write to it must not go unseen
    torch.manual_seed(0)
    model = make().eval()
    args = tuple(torch.rand(2, 2, 16, 8) for _ in range(3))
    opt = fxfuse.optimize(model, args, patterns=["linear_attention"])
    assert fxfuse.report(opt).count("linear_attention") == 1, str(fxfuse.report(opt))
    with torch.no_grad():
        opt(*args)
        model.tril.fill_(1.0)
        with pytest.warns(UserWarning, match="buffer that a rewrite relies on changed"):
            got = opt(*args)
        assert torch.equal(got, model(*args))
