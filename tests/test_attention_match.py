"""The attention matcher: hand-written spellings found (and fused, matching the original), near misses left
alone with a reason, and Hugging Face eager attention found in every layer.

Every positive case runs end to end through `fxfuse.optimize` and compares with the original model on
fresh inputs; the matcher-level tests check what was understood (variant, inputs, GQA folding).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from examples import attention_models as am
from fxfuse.passes.attention import find_attention
from fxfuse.passes.canonicalize import canonicalize
from fxfuse.passes.capture import capture_graphs
from fxfuse.passes.site import Rejection, Site

B, N, DIM, HEADS = 2, 8, 32, 4
D = DIM // HEADS
NEG_INF = float("-inf")


class Spelling(nn.Module):
    """Projections to q, k, v [B, H, N, D] (kv_heads for k and v), then `fn(self, q, k, v, *extra)`."""

    def __init__(self, fn, kv_heads: int = HEADS, seq_first: bool = False) -> None:
        super().__init__()
        self.fn, self.kv_heads = fn, kv_heads
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * kv_heads * D)
        self.bias = nn.Parameter(torch.randn(HEADS, N, N))
        self.temperature = nn.Parameter(torch.rand(HEADS, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(B, N, HEADS, D).transpose(1, 2)
        k, v = (t.view(B, N, self.kv_heads, D).transpose(1, 2) for t in self.kv(x).chunk(2, -1))
        return self.fn(self, q, k, v, *extra)


def _sdpa_like(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(s, dim=-1) @ v


def _qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-2, -1)


def _causal_bool() -> torch.Tensor:
    i = torch.arange(N)
    return i[:, None] >= i[None, :]


def _hand_softmax(m, q, k, v):
    s = _qk(q, k) * D**-0.5
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def _max_values_softmax(m, q, k, v):
    s = _qk(q, k) / math.sqrt(D)
    e = (s - s.max(dim=-1, keepdim=True).values).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def _mqa_broadcast(m, q, k, v):
    return _sdpa_like(_qk(q, k) * D**-0.5, v)  # k, v: [B, 1, N, D], broadcast by matmul


def _bnhd_einsum(m, q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, H, D]
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * D**-0.5
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


def _kv_tiled(m, q, k, v):
    rep = HEADS // m.kv_heads  # .repeat tiles heads (h % Hkv): correct to fuse, not GQA's h // g
    return _sdpa_like(_qk(q, k.repeat(1, rep, 1, 1)) * D**-0.5, v.repeat(1, rep, 1, 1))


def _bloom_style(m, q, k, v, keep):
    # heads folded into the batch for baddbmm/bmm, the padding bias added in a [B, H, N, N] view of the scores
    q, k, v = (t.reshape(B * HEADS, N, D) for t in (q, k, v))
    slopes = torch.arange(1, HEADS + 1).repeat(B).float()[:, None, None] * torch.arange(N).float() / 8
    s = torch.baddbmm(slopes, q, k.transpose(1, 2), beta=1.0, alpha=D**-0.5).view(B, HEADS, N, N)
    pad = torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None], torch.finfo(torch.float32).min)
    p = torch.softmax(s + pad, dim=-1).view(B * HEADS, N, N)
    return torch.bmm(p, v)


def _diffusers_style(m, q, k, v):
    # heads folded into the batch; baddbmm with beta=0 on torch.empty (the added tensor is ignored)
    q, k, v = (t.reshape(B * HEADS, N, D) for t in (q, k, v))
    s = torch.baddbmm(torch.empty(B * HEADS, N, N), q, k.transpose(-1, -2), beta=0, alpha=D**-0.5)
    return torch.bmm(s.softmax(dim=-1), v)


def _falcon_style(m, q, k, v):
    s = q @ k.transpose(-1, -2)
    s /= math.sqrt(D)  # in place, as Hugging Face's Falcon does
    return F.softmax(s, dim=-1) @ v


POSITIVE = {
    # id: (module, extra inputs, expected variant fragments)
    "scale_on_q": (lambda m, q, k, v: _sdpa_like(_qk(q * D**-0.5, k), v), (), ["scale 0.3536"]),
    "split_sqrt_on_q_and_k": (
        lambda m, q, k, v: _sdpa_like(_qk(q * D**-0.25, k * D**-0.25), v), (), ["scale 0.3536"]),
    "no_scale": (lambda m, q, k, v: _sdpa_like(_qk(q, k), v), (), ["plain"]),
    "hand_softmax_amax": (_hand_softmax, (), ["scale 0.3536"]),
    "hand_softmax_max_values": (_max_values_softmax, (), ["scale 0.3536"]),
    "softmax_dim3": (lambda m, q, k, v: torch.softmax(_qk(q, k) * 0.3, dim=3) @ v, (), ["scale 0.3"]),
    "where_finfo_min_padding": (
        lambda m, q, k, v, keep: _sdpa_like(torch.where(keep[:, None, None], _qk(q, k), torch.finfo(q.dtype).min), v),
        ("keys",), ["mask bool"]),
    "causal_arange_masked_fill": (
        lambda m, q, k, v: _sdpa_like(_qk(q, k).masked_fill(~_causal_bool(), NEG_INF) * 0.25, v), (), ["causal"]),
    "causal_tril_ones_finfo_min": (
        lambda m, q, k, v: _sdpa_like(
            _qk(q, k).masked_fill(torch.tril(torch.ones(N, N)) == 0, torch.finfo(torch.float32).min), v),
        (), ["causal"]),
    "padding_and_causal_conjunction": (
        lambda m, q, k, v, keep: _sdpa_like(
            _qk(q, k).masked_fill(~(keep[:, None, :] & _causal_bool())[:, None], NEG_INF), v),
        ("keys",), ["causal", "mask bool"]),
    "bloom_baddbmm_with_batch_views": (_bloom_style, ("keys",), ["mask additive", "3-D"]),
    "gpt_neo_mask_then_causal_bias": (
        lambda m, q, k, v, keep: _sdpa_like(
            torch.where(keep[:, None, None], _qk(q, k), torch.finfo(torch.float32).min)
            + torch.where(_causal_bool(), 0.0, torch.finfo(torch.float32).min), v),
        ("keys",), ["mask additive"]),
    "bias_parameter_t5_style": (lambda m, q, k, v: _sdpa_like(_qk(q, k) + m.bias, v), (), ["mask additive"]),
    "scale_after_bias": (lambda m, q, k, v: _sdpa_like((_qk(q, k) + m.bias) * 0.125, v), (), ["mask additive"]),
    "per_head_temperature": (
        lambda m, q, k, v: _sdpa_like(_qk(q, k) * m.temperature, v), (), ["per-head temperature"]),
    "mqa_by_broadcast": (Spelling(_mqa_broadcast, kv_heads=1), (), ["mqa 4:1"]),
    "bnhd_layout_einsum": (_bnhd_einsum, (), ["scale"]),
    "kv_tiled_by_repeat": (Spelling(_kv_tiled, kv_heads=2), (), ["scale"]),
    "v_times_transposed_probabilities_psa": (  # Ultralytics' PSA attention: q, k, v as [B, H, D, N]
        lambda m, q, k, v: (v.transpose(-2, -1) @ torch.softmax(_qk(q, k) * 0.25, -1).transpose(-2, -1))
        .transpose(-2, -1), (), ["scale 0.25"]),
    "einsum_value_operand_first": (
        lambda m, q, k, v: torch.einsum("bhjd,bhij->bhid", v, torch.softmax(_qk(q, k), -1)), (), ["plain"]),
    "row_max_subtracted_detached": (
        lambda m, q, k, v: _sdpa_like((lambda s: s - s.amax(-1, keepdim=True).detach())(_qk(q, k) * 0.3), v),
        (), ["scale 0.3"]),
    "row_max_values_subtracted_then_masked": (
        lambda m, q, k, v: _sdpa_like(
            (lambda s: s - s.max(dim=-1, keepdim=True).values)(_qk(q, k)).masked_fill(~_causal_bool(), NEG_INF), v),
        (), ["causal"]),
    "float32_softmax_type_as": (  # Meta's Llama reference code
        lambda m, q, k, v: F.softmax(_qk(q, k).float() * 0.5, dim=-1).type_as(q) @ v, (), ["scale 0.5"]),
    "baddbmm_beta0_on_empty": (_diffusers_style, (), ["scale 0.3536", "3-D"]),
    "in_place_scale_falcon": (_falcon_style, (), ["scale 0.3536"]),
    "varlen_and_causal": (
        lambda m, q, k, v, seg: _sdpa_like(
            _qk(q, k).masked_fill(~((seg[:, :, None] == seg[:, None, :]) & _causal_bool())[:, None], NEG_INF), v),
        ("seg",), ["causal", "varlen"]),
    "relu2_zeroed_above_diagonal_after": (  # zeroing after a pointwise score function = masking before it
        lambda m, q, k, v: (torch.relu(_qk(q, k) * 0.1) ** 2).masked_fill(~_causal_bool(), 0) @ v, (),
        ["causal", "relu2"]),
    "relu2_zeroed_by_where_padding": (
        lambda m, q, k, v, keep: torch.where(keep[:, None, None], torch.relu(_qk(q, k)) ** 2, 0.0) @ v, ("keys",),
        ["mask bool", "relu2"]),
    "einsum_with_ellipsis": (
        lambda m, q, k, v: torch.einsum("...ij,...jd->...id", torch.einsum("... i d, ... j d -> ... i j", q, k)
                                        .softmax(-1), v), (), ["plain"]),
    "boolean_added_as_bias": (lambda m, q, k, v, keep: _sdpa_like(_qk(q, k) + keep[:, None, None], v), ("keys",),
                              ["mask additive"]),
    "temperature_on_merged_heads": (
        lambda m, q, k, v: torch.bmm(
            (torch.bmm(*(t.reshape(B * HEADS, N, D) for t in (q, k.transpose(-2, -1)))).view(B, HEADS, N, N)
             * m.temperature).view(B * HEADS, N, N).softmax(-1), v.reshape(B * HEADS, N, D)),
        (), ["per-head temperature", "3-D"]),
    "bias_added_in_a_5d_view_of_the_scores": (
        lambda m, q, k, v: _sdpa_like(
            (_qk(q, k).view(B, HEADS, N, 2, 4) + m.bias[:, :, :2, None]).view(B, HEADS, N, N), v),
        (), ["mask additive"]),
}  # fmt: skip

EXAMPLES = {
    "hand_mha_padding": (am.HandMHA, ["mask bool"], 1),
    "gpt_tril_buffer": (am.CausalGPTBlock, ["mask bool"], 1),
    "causal_triu_inline": (am.CausalInlineBlock, ["causal"], 1),
    "gqa_repeat_interleave": (am.GQABlock, ["gqa 8:2"], 1),
    "detr_self_and_cross": (am.DETRDecoderBlock, ["3-D"], 2),
    "vit_einsum": (am.ViTEinsumBlock, ["scale"], 1),
    "packed_varlen": (am.PackedVarlenBlock, ["varlen"], 1),
    "gau_relu2": (am.GAUBlock, ["relu2"], 1),
}


def _extra(kind: str) -> torch.Tensor:
    if kind == "seg":
        return torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2, 3, 3]])
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 5:] = False
    return keep


def _module(spec) -> nn.Module:
    return spec if isinstance(spec, nn.Module) else Spelling(spec)


def _optimize_and_compare(model: nn.Module, make_inputs, expect: int, fragments: list[str]) -> fxfuse.Report:
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():  # inference: a graph that trains also has its backward verified (test_verify_grad)
        opt = fxfuse.optimize(model, make_inputs(), patterns=["attention"])
    rep = fxfuse.report(opt)
    applied = [r for r in rep.rewrites if r.status == "applied"]
    assert rep.count("attention") == expect, str(rep)
    for frag in fragments:
        assert all(frag in r.variant for r in applied), str(rep)
    fresh = make_inputs()
    with torch.no_grad():
        want, got = model(*fresh), opt(*fresh)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, err
    return rep


@pytest.mark.parametrize("name", list(POSITIVE))
def test_spelling_is_fused(name: str) -> None:
    spec, extra, fragments = POSITIVE[name]
    model = _module(spec)
    make = lambda: (torch.randn(B, N, DIM), *(_extra(e) for e in extra))
    _optimize_and_compare(model, make, 1, fragments)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_model_is_fused(name: str) -> None:
    cls, fragments, count = EXAMPLES[name]
    model, inputs = cls.make()
    fresh = lambda: tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs)
    _optimize_and_compare(model, fresh, count, fragments)


class TorchMHA(nn.Module):
    """nn.MultiheadAttention with need_weights=True (its default) and a key padding mask; the caller drops
    the averaged weights, so they are dead code, and the scores come from baddbmm(mask, q, k^T)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, HEADS)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, key_padding_mask=~keep)[0]


def test_torch_multihead_attention_is_fused() -> None:
    make = lambda: (torch.randn(N, B, DIM), _extra("keys"))
    _optimize_and_compare(TorchMHA(), make, 1, ["mask additive", "3-D"])


def test_half_precision_with_float32_softmax_is_found() -> None:
    def fn(m, q, k, v):
        return torch.softmax(_qk(q, k).float() * D**-0.5, dim=-1).to(q.dtype) @ v

    # Matcher level only: verify's "large" case overflows the original's fp16 q @ k (inf -> NaN) where
    # the fused op accumulates in float32, so end to end this is the driver's call.
    (site,) = _sites(Spelling(fn).half(), (torch.randn(B, N, DIM, dtype=torch.float16),))
    assert isinstance(site, Site) and site.variant == "scale 0.3536"


def _sites(model: nn.Module, inputs: tuple) -> list[Site | Rejection]:
    found = []
    for gm, _ in capture_graphs(model.eval(), inputs):
        found += find_attention(canonicalize(gm).graph_module, "auto")
    return found


@pytest.mark.parametrize("expand", [False, True], ids=["repeat_interleave", "expand_reshape"])
def test_gqa_reads_unrepeated_kv(expand: bool) -> None:
    model = am.GQABlock(expand=expand)
    (site,) = _sites(model, (torch.randn(2, 11, 64),))
    assert isinstance(site, Site) and "gqa 8:2" in site.variant
    kv_shapes = [tuple(n.meta["val"].shape) for n in site.inputs[1:3]]
    assert kv_shapes == [(2, 11, 2, 8)] * 2  # [B, N, Hkv, D]: the repeat is folded away


def test_tiled_kv_is_not_folded_as_gqa() -> None:
    # k.repeat(1, 2, 1, 1) makes query head h read kv head h % 2, not GQA's h // 2: keep the tiled tensors
    (site,) = _sites(POSITIVE["kv_tiled_by_repeat"][0], (torch.randn(B, N, DIM),))
    assert isinstance(site, Site) and "gqa" not in site.variant
    assert [tuple(n.meta["val"].shape) for n in site.inputs[1:3]] == [(B, HEADS, N, D)] * 2


def test_causal_mask_is_not_an_input_tensor_of_the_op() -> None:
    model, inputs = am.CausalInlineBlock.make()
    (site,) = _sites(model, inputs)
    assert site.variant.startswith("causal")
    triu = site.inputs[3]
    assert site.input_gen(3, triu.meta["val"], "normal", 0).isneginf().sum() == 45  # the real constant


def test_training_dropout_is_read() -> None:
    def fn(m, q, k, v):
        return F.dropout(torch.softmax(_qk(q, k) * 0.125, -1), 0.1, training=m.training) @ v

    model = Spelling(fn).train()
    with torch.no_grad():
        found = []
        for gm, _ in capture_graphs(model, (torch.randn(B, N, DIM),)):
            found += find_attention(canonicalize(gm).graph_module, "reference")
    assert [type(s) for s in found] == [Site] and "dropout 0.1" in found[0].variant


NEGATIVE = {
    # id: (fn, extra inputs, fragment of the rejection reason)
    "probabilities_returned": (
        lambda m, q, k, v: (lambda p: (p @ v, p))(torch.softmax(_qk(q, k), -1)), (), "also used by"),
    "probabilities_summed": (
        lambda m, q, k, v: (lambda p: p @ v + p.sum())(torch.softmax(_qk(q, k), -1)), (), "also used by"),
    "softmax_over_query_axis": (lambda m, q, k, v: torch.softmax(_qk(q, k), dim=-2) @ v, (), "not the key axis"),
    "mask_after_softmax": (
        lambda m, q, k, v, keep: (torch.softmax(_qk(q, k), -1) * keep[:, None, None]) @ v, ("keys",),
        "after the softmax"),
    "exp_without_max": (
        lambda m, q, k, v: (lambda e: e / e.sum(-1, keepdim=True) @ v)(_qk(q, k).exp()), (), "overflows"),
    "score_gate_varies_along_keys": (
        lambda m, q, k, v: _sdpa_like(_qk(q, k) * torch.sigmoid(_qk(q, k)), v), (), "varies along the key axis"),
    "finite_fill_then_bias": (
        lambda m, q, k, v, keep: _sdpa_like(_qk(q, k).masked_fill(~keep[:, None, None], -1e4) + m.bias, v),
        ("keys",), "filled with -10000"),
    "two_fill_values": (
        lambda m, q, k, v, keep: _sdpa_like(
            _qk(q, k).masked_fill(~keep[:, None, None], -1e4).masked_fill(~_causal_bool(), NEG_INF), v),
        ("keys",), "different values"),
    "tanh_softcap": (lambda m, q, k, v: _sdpa_like(torch.tanh(_qk(q, k) / 30) * 30, v), (), "tanh"),
    "value_product_contracts_queries": (
        lambda m, q, k, v: torch.softmax(_qk(q, k), -1).transpose(-1, -2) @ v, (), "not the key axis"),
    "v_times_probabilities_untransposed": (
        lambda m, q, k, v: v.transpose(-2, -1) @ torch.softmax(_qk(q, k), -1), (), "not the key axis"),
    "row_max_then_zero_fill": (
        lambda m, q, k, v, keep: _sdpa_like(
            (lambda s: (s - s.amax(-1, keepdim=True)).masked_fill(~keep[:, None, None], 0.0))(_qk(q, k)), v),
        ("keys",), "moderate fill"),
    "column_max_subtracted": (
        lambda m, q, k, v: _sdpa_like((lambda s: s - s.amax(-2, keepdim=True))(_qk(q, k)), v), (), "outside"),
    "scores_returned": (
        lambda m, q, k, v: (lambda s: (_sdpa_like(s, v), s))(_qk(q, k) * 0.1), (), "outside the pattern"),
    "two_score_products": (
        lambda m, q, k, v: _sdpa_like(_qk(q, k) + _qk(q, v), v), (), "ambiguous"),
    "relu_without_square": (lambda m, q, k, v: torch.relu(_qk(q, k)) @ v, (), None),
    "softmax_then_zeroed": (  # the kept probabilities are not renormalized: not masking before the softmax
        lambda m, q, k, v, keep: torch.softmax(_qk(q, k), -1).masked_fill(~keep[:, None, None], 0) @ v, ("keys",),
        "before the value product"),
    "relu2_then_filled_nonzero": (
        lambda m, q, k, v: (torch.relu(_qk(q, k)) ** 2).masked_fill(~_causal_bool(), 0.5) @ v, (),
        "before the value product"),
    "ellipsis_einsum_contracts_queries": (
        lambda m, q, k, v: torch.einsum("...ij,...id->...jd", torch.softmax(_qk(q, k), -1), v), (),
        "not the key axis"),
    "boolean_added_to_probabilities": (
        lambda m, q, k, v, keep: (torch.softmax(_qk(q, k), -1) + keep[:, None, None]) @ v, ("keys",),
        "before the value product"),
    "temperature_varies_along_keys_in_a_view": (
        lambda m, q, k, v: torch.bmm(
            (torch.bmm(*(t.reshape(B * HEADS, N, D) for t in (q, k.transpose(-2, -1)))).view(B, HEADS, N, N)
             * m.bias[:, :1, :]).view(B * HEADS, N, N).softmax(-1), v.reshape(B * HEADS, N, D)),
        (), "varies along the key axis"),
    "softmax_over_part_of_the_keys_in_a_5d_view": (
        lambda m, q, k, v: _qk(q, k).view(B, HEADS, N, 2, 4).softmax(-1).view(B, HEADS, N, N) @ v, (),
        "before the value product"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_near_miss_is_left_alone(name: str) -> None:
    fn, extra, reason = NEGATIVE[name]
    model = Spelling(fn).eval()
    inputs = (torch.randn(B, N, DIM), *(_extra(e) for e in extra))
    opt = fxfuse.optimize(model, inputs, patterns=["attention"])
    rep = fxfuse.report(opt)
    assert rep.count("attention") == 0, str(rep)
    if reason is not None:
        assert any(reason in r.reason for r in rep.rejected("attention")), str(rep)
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=0, atol=0)


def test_constant_mask_written_in_place_is_not_taken_for_causal() -> None:
    # tril(ones) looks causal where it is made, but a later in-place write changes it: not a constant
    def fn(m, q, k, v):
        keep = torch.ones(N, N, dtype=torch.bool).tril()
        keep[0, 1:3] = True
        return _sdpa_like(_qk(q, k).masked_fill(~keep, NEG_INF), v)

    rep = _optimize_and_compare(Spelling(fn), lambda: (torch.randn(B, N, DIM),), 1, ["mask bool"])
    assert all("causal" not in r.variant for r in rep.rewrites), str(rep)


def test_classifier_softmax_is_not_reported() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Softmax(-1)).eval()
    assert _sites(model, (torch.randn(3, 8),)) == []


def _hf(name: str):
    """(model, make_kwargs, attention layers) for a tiny random Hugging Face model with eager attention."""
    transformers = pytest.importorskip("transformers")
    ids = lambda n=7: torch.randint(0, 99, (2, n))
    common = dict(vocab_size=99, attn_implementation="eager")
    if name == "bert_padding_mask":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, **common)  # fmt: skip
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        return transformers.BertModel(cfg), lambda: dict(input_ids=ids(), attention_mask=mask), 2
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                      eos_token_id=0, **common)  # fmt: skip
        return transformers.GPT2Model(cfg), lambda: dict(input_ids=ids()), 2
    if name == "llama_gqa":
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=37, **common)  # fmt: skip
        return transformers.LlamaModel(cfg), lambda: dict(input_ids=ids()), 2
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, image_size=16, patch_size=4,
                                     attn_implementation="eager")  # fmt: skip
        return transformers.ViTModel(cfg), lambda: dict(pixel_values=torch.randn(2, 3, 16, 16)), 2
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                                **common)  # fmt: skip
    return transformers.T5Model(cfg), lambda: dict(input_ids=ids(), decoder_input_ids=ids(5)), 6


HF_VARIANTS = {
    "bert_padding_mask": "mask additive",
    "gpt2": "causal",
    "llama_gqa": "gqa 4:2",
    "vit": "scale 0.3536",
    "t5": "",
}


@pytest.mark.parametrize("name", list(HF_VARIANTS))
def test_hugging_face_eager_attention(name: str) -> None:
    torch.manual_seed(0)
    model, make_kwargs, layers = _hf(name)
    model.eval()
    opt = fxfuse.optimize(model, patterns=["attention"])
    with torch.no_grad():
        opt(**make_kwargs())
    rep = fxfuse.report(opt)
    assert rep.count("attention") == layers, str(rep)
    assert all(HF_VARIANTS[name] in r.variant for r in rep.rewrites), str(rep)
    kwargs = make_kwargs()
    with torch.no_grad():
        want, got = model(**kwargs).last_hidden_state, opt(**kwargs).last_hidden_state
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5



# More architectures as shipped, from examples/hf_zoo.py (tiny random configs, eager attention): sites each
MORE_HF = {"falcon": 2, "bloom": 2, "bart": 3, "whisper": 3, "swin": 3, "mistral": 2}


@pytest.mark.parametrize("name", list(MORE_HF))
def test_more_hugging_face_architectures(name: str) -> None:
    pytest.importorskip("transformers")
    from examples import hf_zoo

    fused, rejected, err = hf_zoo.check(name, hf_zoo.zoo()[name])
    assert fused == MORE_HF[name] and not rejected, (fused, rejected)
    assert err < 1e-5


class ScalarBiasAttention(nn.Module):
    """A 0-d tensor added to every score (a learned or passed-in offset): legal broadcasting, once a crash
    of the CPU path (SDPA takes masks of rank >= 2), now a bias like any other."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-2, -1) / 8.0 + offset, dim=-1) @ v


def test_zero_dim_tensor_added_to_the_scores_is_a_bias() -> None:
    make = lambda: (*torch.randn(3, 2, 4, 16, 64), torch.randn(()))
    _optimize_and_compare(ScalarBiasAttention(), make, 1, ["mask additive"])


@pytest.mark.parametrize(
    "fn",
    [lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ (v * 0.5),
     lambda q, k, v: torch.softmax(q @ (k * 2).transpose(-2, -1), -1) @ (v / 3).transpose(1, 2).transpose(1, 2)],
    ids=["v_times", "v_divided_viewed"],
)  # fmt: skip
def test_scale_on_v_is_kept_by_the_matcher(fn):
    # checked with verification off: only the matcher stands between a dropped scale and the user
    class Fn(nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    inputs = tuple(torch.randn(2, 2, 16, 8) for _ in range(3))
    opt = fxfuse.optimize(Fn(), inputs, patterns=["attention"], verify=False)
    assert fxfuse.report(opt).count("attention") == 1, fxfuse.report(opt)
    with torch.no_grad():
        want = Fn()(*(x.double() for x in inputs))
        assert (opt(*inputs).double() - want).abs().max() < 1e-5
