"""Generated attention spellings: a seeded generator of attention modules and a judge for each.

A `Spelling` picks one option per axis (scale, mask, normalization, products, layout, GQA, score
function) and its `forward` writes attention that way; `near_misses` are look-alikes whose fused form
would give other numbers, so they must be left alone. `judge` optimizes one case and classifies it:

    fused     - an attention rewrite applied, output as accurate as the original (float64 truth)
    wrong     - the output is further from the float64 truth than the original's own error allows
    tolerance - the only rejection is the verifier's tolerance (a numerics question, not a matcher miss)
    missed    - not fused; the report's reason is kept
    untouched - a near miss left alone: count 0 and bitwise the original output
    touched   - a near miss that was rewritten or whose output changed

Larger runs: `python -m tests.spellings --n 2000 --seed 0` (`make spellings`) prints the counts and every
miss's reason; it exits 1 on a wrong result, a touched near miss or under 95 % of the valid cases fused.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import fxfuse

B, N, H, D = 2, 8, 4, 8
DIM = H * D

AXES = {
    "scale": ("mul_scores", "div_scores", "in_place", "on_q", "on_k", "split_sqrt", "none", "temperature"),
    "mask": (
        "none", "additive", "bool_masked_fill", "where_finfo_min", "causal_tril_where",
        "causal_triu_masked_fill", "causal_additive", "causal_offset", "sliding_window", "causal_sliding_window",
        "extended_padding", "float_bias", "block_mask_added", "fill_1e9", "tf_additive_1e4", "alibi_causal",
        "plus_zero",
    ),
    "norm": (
        "torch", "functional", "method", "softmax_dtype", "upcast_to", "upcast_type_as", "manual_amax",
        "manual_max_values",
    ),
    "product": ("matmul", "bmm", "einsum", "einsum_ellipsis", "v_pt"),
    "layout": ("bhnd", "bnhd", "merged"),
    "gqa": ("none", "repeat_interleave", "expand_reshape"),
    "score_fn": ("softmax", "relu2", "relu2_causal_zeroed"),
}  # fmt: skip

# Look-alikes whose fused form would change the numbers: each must be left alone.
NEAR_MISSES = (
    "softmax_over_queries", "probs_returned", "probs_summed", "softmax_then_zeroed", "softmax_then_weighted",
    "exp_without_max", "relu2_then_filled_nonzero", "tanh_softcap", "value_contracts_queries",
    "two_score_products", "column_max_subtracted", "sink_column_dropped", "heads_mixed", "nan_to_num_probs",
)  # fmt: skip


@dataclass(frozen=True)
class Choice:
    scale: str = "mul_scores"
    mask: str = "none"
    norm: str = "torch"
    product: str = "matmul"
    layout: str = "bhnd"
    gqa: str = "none"
    score_fn: str = "softmax"
    near_miss: str = ""

    @property
    def name(self) -> str:
        if self.near_miss:
            return f"near_miss-{self.near_miss}-{self.layout}"
        return "-".join(getattr(self, a) for a in AXES)


def _valid(c: Choice) -> bool:
    """Combinations that are well defined (not a judgement on the matcher)."""
    if c.product == "bmm" and c.layout != "merged":
        return False  # bmm is 3-D: it is the merged layout's product
    if c.product == "v_pt" and c.layout == "bnhd":
        return False
    if c.score_fn != "softmax" and c.norm != "torch":
        return False  # the normalization axis only exists for softmax
    if c.score_fn == "relu2_causal_zeroed" and c.mask.startswith("causal"):
        return False
    return True


def sample(rng: random.Random) -> Choice:
    while True:
        c = Choice(**{a: rng.choice(opts) for a, opts in AXES.items()})
        if _valid(c):
            return c


class Spelling(nn.Module):
    """Projections to q [B, N, H, D] and k, v [B, N, Hkv, D], then attention as `choice` spells it."""

    def __init__(self, choice: Choice) -> None:
        super().__init__()
        self.c = choice
        self.kv_heads = H if choice.gqa == "none" else H // 2
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * self.kv_heads * D)
        self.temperature = nn.Parameter(torch.rand(H, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(H, N, N))
        self.sinks = nn.Parameter(torch.randn(H))  # gpt-oss: one extra logit per head
        self.mix = nn.Parameter(torch.randn(H, H))  # talking heads (vit-pytorch's CaiT)
        self.register_buffer("slopes", 2.0 ** (-8 * torch.arange(1, H + 1) / H).view(H, 1, 1))
        self.register_buffer("triu_inf", torch.full((N, N), float("-inf")).triu(1))

    def extra_inputs(self, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        keep = torch.rand(B, N, generator=gen) < 0.7
        keep[:, 0] = True  # every row keeps a key: no NaN rows in the original
        if self.c.mask == "additive" or self.c.near_miss == "softmax_then_weighted":
            return (torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None], torch.finfo(torch.float32).min),)
        if self.c.mask in ("bool_masked_fill", "where_finfo_min", "extended_padding", "fill_1e9", "tf_additive_1e4"):
            return (keep,)
        if self.c.near_miss in ("softmax_then_zeroed", "nan_to_num_probs"):
            return (keep,)
        if self.c.mask == "block_mask_added":
            blocks = torch.arange(N) // 3
            return ((blocks[:, None] == blocks[None, :]).expand(B, 1, N, N).clone(),)
        return ()

    def _gqa(self, t: torch.Tensor) -> torch.Tensor:
        # t: [B, N, Hkv, D] -> [B, N, H, D], query head h reading kv head h // r
        r = H // self.kv_heads
        if self.c.gqa == "repeat_interleave":
            return t.repeat_interleave(r, dim=2)
        if self.c.gqa == "expand_reshape":
            return t[:, :, :, None].expand(B, N, self.kv_heads, r, D).reshape(B, N, H, D)
        return t

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        c = self.c
        q = self.q(x).view(B, N, H, D)
        k, v = (self._gqa(t.view(B, N, self.kv_heads, D)) for t in self.kv(x).chunk(2, -1))
        if c.layout != "bnhd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        if c.layout == "merged":
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
        if c.scale == "on_q":
            q = q * D**-0.5
        elif c.scale == "on_k":
            k = k / math.sqrt(D)
        elif c.scale == "split_sqrt":
            q, k = q * D**-0.25, k * D**-0.25
        if c.near_miss:
            o = self._near_miss(q, k, v, *extra)
        else:
            s = self._scores(q, k)
            s = self._scale_and_mask(s, *extra)
            p = self._normalize(s)
            o = self._value(p, v)
        if c.layout == "merged":
            o = o.view(B, H, N, D)
        if c.layout != "bnhd":
            o = o.transpose(1, 2)
        return o.reshape(B, N, DIM)

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[B, H, N, M] (or [B*H, N, M] merged) from the layout's q, k."""
        c, lay = self.c, self.c.layout
        if c.product == "bmm":
            return torch.bmm(q, k.transpose(1, 2))
        if c.product in ("einsum", "einsum_ellipsis"):
            eq = {
                ("einsum", "bhnd"): "bhnd,bhmd->bhnm", ("einsum", "bnhd"): "bnhd,bmhd->bhnm",
                ("einsum", "merged"): "bnd,bmd->bnm", ("einsum_ellipsis", "bhnd"): "... i d, ... j d -> ... i j",
                ("einsum_ellipsis", "bnhd"): "...nhd,...mhd->...hnm",
                ("einsum_ellipsis", "merged"): "...id,...jd->...ij",
            }[(c.product, lay)]  # fmt: skip
            return torch.einsum(eq, q, k)
        if lay == "bnhd":
            return q.transpose(1, 2) @ k.permute(0, 2, 3, 1)
        return q @ k.transpose(-2, -1)

    def _four_d(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(B, H, N, N) if self.c.layout == "merged" else s

    def _back(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(B * H, N, N) if self.c.layout == "merged" else s

    def _scale_and_mask(self, s: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        c = self.c
        if c.scale == "mul_scores":
            s = s * D**-0.5
        elif c.scale == "div_scores":
            s = s / math.sqrt(D)
        elif c.scale == "in_place":
            s /= math.sqrt(D)
        elif c.scale == "temperature":
            s = self._back(self._four_d(s) * self.temperature)
        i = torch.arange(N, device=s.device)
        neg, fmin = float("-inf"), torch.finfo(s.dtype).min
        if c.mask == "additive":
            s = self._back(self._four_d(s) + extra[0])
        elif c.mask == "bool_masked_fill":
            s = self._back(self._four_d(s).masked_fill(~extra[0][:, None, None, :], neg))
        elif c.mask == "where_finfo_min":
            s = self._back(torch.where(extra[0][:, None, None, :], self._four_d(s), fmin))
        elif c.mask == "causal_tril_where":
            s = torch.where(torch.tril(torch.ones(N, N, dtype=torch.bool, device=s.device)), s, neg)
        elif c.mask == "causal_triu_masked_fill":
            s = s.masked_fill(torch.triu(torch.ones(N, N, device=s.device), diagonal=1).bool(), fmin)
        elif c.mask == "causal_additive":
            s = s + self.triu_inf
        elif c.mask == "causal_offset":
            s = s.masked_fill(torch.triu(torch.ones(N, N, dtype=torch.bool, device=s.device), diagonal=2), neg)
        elif c.mask == "sliding_window":
            keep = (i[:, None] - i[None, :]).abs() <= 2
            s = s.masked_fill(~keep, neg)
        elif c.mask == "causal_sliding_window":
            keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
            s = torch.where(keep, s, fmin)
        elif c.mask == "extended_padding":  # Hugging Face's extended attention mask: (1 - keep) * finfo.min
            s = self._back(self._four_d(s) + (1.0 - extra[0][:, None, None, :].to(s.dtype)) * fmin)
        elif c.mask == "float_bias":
            s = self._back(self._four_d(s) + self.bias)
        elif c.mask == "block_mask_added":
            s = self._back(self._four_d(s) + extra[0])  # a 0/1 bias, not a mask
        elif c.mask == "fill_1e9":  # The Annotated Transformer: a moderate fill
            s = self._back(self._four_d(s).masked_fill(extra[0][:, None, None, :] == 0, -1e9))
        elif c.mask == "tf_additive_1e4":  # BERT as first ported from TensorFlow
            s = self._back(self._four_d(s) + (1.0 - extra[0][:, None, None, :].float()) * -10000.0)
        elif c.mask == "alibi_causal":  # ALiBi: a per-head linear distance penalty, causal by a -inf triangle
            s = self._back(self._four_d(s) + self.slopes * (i[None, :] - i[:, None]) + self.triu_inf)
        elif c.mask == "plus_zero":  # DeBERTa without relative attention adds rel_att = 0
            s = s + 0
        return s

    def _normalize(self, s: torch.Tensor) -> torch.Tensor:
        c = self.c
        if c.score_fn != "softmax":
            p = torch.relu(s) ** 2
            if c.score_fn == "relu2_causal_zeroed":
                p = p.masked_fill(torch.ones(N, N, dtype=torch.bool, device=s.device).triu(1), 0.0)
            return p
        if c.norm == "torch":
            return torch.softmax(s, dim=-1)
        if c.norm == "functional":
            return F.softmax(s, dim=-1)
        if c.norm == "method":
            return s.softmax(-1)
        if c.norm == "softmax_dtype":
            return torch.softmax(s, -1, dtype=torch.float32).to(s.dtype)
        if c.norm == "upcast_to":
            return s.float().softmax(-1).to(s.dtype)
        if c.norm == "upcast_type_as":
            return F.softmax(s.float(), dim=-1).type_as(s)
        if c.norm == "manual_amax":
            e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        else:
            e = (s - s.max(dim=-1, keepdim=True).values).exp()
        return e / e.sum(dim=-1, keepdim=True)

    def _value(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c, lay = self.c, self.c.layout
        if c.product == "bmm":
            return torch.bmm(p, v)
        if c.product == "v_pt":
            return (v.transpose(-2, -1) @ p.transpose(-2, -1)).transpose(-2, -1)
        if c.product in ("einsum", "einsum_ellipsis"):
            eq = {
                ("einsum", "bhnd"): "bhnm,bhmd->bhnd", ("einsum", "bnhd"): "bhnm,bmhd->bnhd",
                ("einsum", "merged"): "bnm,bmd->bnd", ("einsum_ellipsis", "bhnd"): "... i j, ... j d -> ... i d",
                ("einsum_ellipsis", "bnhd"): "...hnm,...mhd->...nhd",
                ("einsum_ellipsis", "merged"): "...ij,...jd->...id",
            }[(c.product, lay)]  # fmt: skip
            return torch.einsum(eq, p, v)
        if lay == "bnhd":
            return (p @ v.transpose(1, 2)).transpose(1, 2)
        return p @ v

    def _near_miss(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """Attention look-alikes (q, k, v in the layout's shape; bnhd is transposed to [B, H, N, D])."""
        if self.c.layout == "bnhd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-2, -1) * D**-0.5
        kind = self.c.near_miss
        if kind == "softmax_over_queries":
            o = s.softmax(-2) @ v
        elif kind == "probs_returned":
            p = s.softmax(-1)
            o = p @ v + p[..., :D]  # p is used a second time
        elif kind == "probs_summed":
            p = s.softmax(-1)
            o = p @ v + p.sum(-1, keepdim=True)
        elif kind == "softmax_then_zeroed":
            # zeroing after a softmax leaves the rows un-renormalized: not the same as masking before it
            o = self._back(self._four_d(s.softmax(-1)).masked_fill(~extra[0][:, None, None, :], 0.0)) @ v
        elif kind == "softmax_then_weighted":
            o = self._back(self._four_d(s.softmax(-1)) * extra[0].exp()) @ v
        elif kind == "exp_without_max":
            e = s.exp()
            o = e / e.sum(-1, keepdim=True) @ v
        elif kind == "relu2_then_filled_nonzero":
            o = (torch.relu(s) ** 2).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), 0.5) @ v
        elif kind == "tanh_softcap":
            o = torch.softmax(torch.tanh(s / 5) * 5, -1) @ v
        elif kind == "value_contracts_queries":
            o = s.softmax(-1).transpose(-2, -1) @ v
        elif kind == "two_score_products":
            o = torch.softmax(s + q @ v.transpose(-2, -1), -1) @ v
        elif kind == "column_max_subtracted":
            o = torch.softmax(s - s.amax(-2, keepdim=True), -1) @ v
        elif kind == "sink_column_dropped":  # the kept probabilities sum to less than 1
            sink = self.sinks.view(1, H, 1, 1).expand(B, H, N, 1).reshape(*s.shape[:-1], 1)
            o = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1] @ v
        elif kind == "heads_mixed":  # every head's scores depend on every head's q @ k^T
            o = self._back(torch.einsum("bhij,hg->bgij", self._four_d(s), self.mix).contiguous()).softmax(-1) @ v
        else:  # nan_to_num_probs: fully masked rows give 0 here, NaN in a fused op
            masked = self._four_d(s).masked_fill(~extra[0][:, None, None, :], float("-inf"))
            o = torch.nan_to_num(self._back(masked).softmax(-1)) @ v
        if self.c.layout == "bnhd":
            o = o.transpose(1, 2)
        return o


def near_miss(rng: random.Random) -> Choice:
    return Choice(near_miss=rng.choice(NEAR_MISSES), layout=rng.choice(("bhnd", "bnhd", "merged")))


def generate(seed: int, n: int, near_miss_share: float = 0.2) -> list[Choice]:
    """`n` distinct cases, about `near_miss_share` of them near misses, reproducible from `seed`."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        c = near_miss(rng) if rng.random() < near_miss_share else sample(rng)
        if c not in seen or len(seen) > 20000:
            seen.add(c)
            out.append(c)
    return out


@dataclass
class Outcome:
    choice: Choice
    verdict: str
    detail: str = ""
    err: float = 0.0
    eager_err: float = 0.0


def _rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


def judge(choice: Choice, seed: int = 0, backend: str = "auto") -> Outcome:
    """Optimize one generated case and classify it (see the module docstring)."""
    torch._dynamo.reset()  # one code object for every case: each would add a guard entry to dynamo's cache
    torch.manual_seed(seed)
    model = Spelling(choice).eval()
    gen = torch.Generator().manual_seed(seed)
    inputs = lambda: (torch.randn(B, N, DIM, generator=gen), *model.extra_inputs(gen))
    opt = fxfuse.optimize(model, inputs(), patterns=["attention"], backend=backend)
    rep = fxfuse.report(opt)
    fresh = inputs()
    got = opt(*fresh).detach()  # in the captured grad mode: another mode would capture again
    with torch.no_grad():
        want = model(*fresh)
        truth = copy.deepcopy(model).double()(*(t.double() if t.is_floating_point() else t for t in fresh))
    reasons = "; ".join(sorted({r.reason for r in rep.rejected("attention")})) or "; ".join(rep.notes)
    if choice.near_miss:
        same = torch.equal(got, want)
        ok = same and rep.count("attention") == 0
        return Outcome(choice, "untouched" if ok else "touched", reasons if ok else str(rep))
    err, eager_err = _rel(got, truth), _rel(want, truth)
    if not err <= max(1e-5, 2 * eager_err):  # NaN fails too
        return Outcome(choice, "wrong", str(rep), err, eager_err)
    if rep.count("attention") >= 1:
        return Outcome(choice, "fused", "", err, eager_err)
    tol = rep.rejected("attention") and all("tolerance" in r.reason for r in rep.rejected("attention"))
    return Outcome(choice, "tolerance" if tol else "missed", reasons, err, eager_err)


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(o.verdict for o in self.outcomes)

    @property
    def valid(self) -> int:
        return sum(not o.choice.near_miss for o in self.outcomes)

    @property
    def fused_share(self) -> float:
        """Fused among the valid cases that the matcher decides (verifier tolerance rejections excluded)."""
        decided = self.valid - self.counts["tolerance"]
        return self.counts["fused"] / decided if decided else 1.0

    def summary(self) -> str:
        c = self.counts
        near = len(self.outcomes) - self.valid
        return (
            f"valid {self.valid}: fused {c['fused']} ({100 * self.fused_share:.1f}% of those the matcher decides), "
            f"missed {c['missed']}, rejected by verification tolerance {c['tolerance']}, wrong {c['wrong']}; "
            f"near misses {near}: untouched {c['untouched']}, touched {c['touched']}"
        )


def run(seed: int, n: int, verbose: bool = False) -> Tally:
    tally = Tally()
    for choice in generate(seed, n):
        out = judge(choice, seed)
        tally.outcomes.append(out)
        if verbose and out.verdict not in ("fused", "untouched"):
            print(f"{out.verdict:9s} {choice.name}: {out.detail[:300]}", flush=True)
    return tally


def main() -> int:
    ap = argparse.ArgumentParser(description="Generated attention spellings: fused / missed / wrong counts")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    tally = run(args.seed, args.n, verbose=True)
    reasons = Counter(o.detail.split(";")[0][:120] for o in tally.outcomes if o.verdict == "missed")
    for why, count in reasons.most_common():
        print(f"{count:5d}  {why}")
    print(tally.summary())
    print(f"{len(tally.outcomes)} cases in {time.perf_counter() - t0:.0f} s (seed {args.seed})")
    c = tally.counts
    return 1 if c["wrong"] or c["touched"] or tally.fused_share < 0.95 else 0


if __name__ == "__main__":
    raise SystemExit(main())
