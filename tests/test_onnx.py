"""ONNX export: every fused op lowers to standard ONNX that ONNX Runtime runs like the PyTorch model.

Each test compares ONNX Runtime's output with the *original* PyTorch model itself (not only through the
export's own verification), and counts nodes by op type.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.export import Dim

import fxfuse
from examples import attention_models, spp_models
from fxfuse.onnx import ExportError
from fxfuse.onnx.check import run_onnx, tensor_leaves
from fxfuse.onnx.spp import adaptive_window
from fxfuse.passes.verify import compare

pytest.importorskip("onnxruntime")


def ort_error(path, model: nn.Module, inputs: tuple) -> float:
    """Max relative error of ONNX Runtime vs the PyTorch model; fails on NaN/inf mismatches."""
    with torch.no_grad():
        want = tensor_leaves(model(*inputs))
    check = compare(run_onnx(str(path), inputs), want, 1e-4)
    assert check.ok, check.reason
    return check.max_rel_err


@pytest.mark.parametrize(
    "make, pools",
    [
        (spp_models.make_yolo_spp, {"MaxPool": 3}),
        (spp_models.make_yolo_sppf, {"MaxPool": 3}),
        (spp_models.make_sppnet, {"MaxPool": 2, "GlobalMaxPool": 1}),
    ],
    ids=["yolo_spp", "yolo_sppf", "sppnet"],
)
def test_spp_models_export_as_maxpools(make, pools, tmp_path):
    model, inputs = make()
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert result.report.count("spp") == 1 and len(result.sites) == 1
    for op, n in pools.items():
        assert result.count(op) == n, result.node_counts
    assert not any(op.startswith("fxfuse") for op in result.node_counts)
    assert result.max_rel_err["example inputs"] < 1e-4
    assert ort_error(tmp_path / "m.onnx", model, inputs) < 1e-4


ATTENTION_MODELS = [m for m in attention_models.MODELS if m.__name__ != "AttentionHeavy"]


@pytest.mark.parametrize("cls", ATTENTION_MODELS, ids=lambda c: c.__name__)
def test_attention_models_one_attention_node_per_site(cls, tmp_path):
    model, inputs = cls.make()
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    sites = result.report.count("attention")
    assert sites >= 1 and len(result.sites) == sites
    assert ort_error(tmp_path / "m.onnx", model, inputs) < 1e-4
    if cls.__name__ == "GAUBlock":  # relu(s)**2: no ONNX Attention equivalent, said in the result
        assert result.count("Attention") == 0 and result.count("Relu") == 1
        assert "relu2" in result.sites[0].lowered_as
    else:
        assert result.count("Attention") == sites
        assert result.count("Softmax") == 0


def test_fully_masked_rows_match_pytorch(tmp_path):
    """ORT's Attention gives 0 where every key is masked; the model gives NaN (-inf fill)."""
    model, (x, mask) = attention_models.HandMHA.make()
    mask[1] = 0
    result = fxfuse.export_onnx(model, (x, mask), tmp_path / "m.onnx")
    assert result.count("Attention") == 1
    with torch.no_grad():
        assert model(x, mask)[1].isnan().all()
    ort_error(tmp_path / "m.onnx", model, (x, mask))


class MinFillAttention(nn.Module):
    """masked_fill with float32's lowest value (what Hugging Face uses): fully-masked rows average v."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = (q @ k.transpose(-1, -2)) * 0.25
        s = s.masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
        return s.softmax(-1) @ v


def test_lowest_fill_fully_masked_row_is_mean_of_v(tmp_path):
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0] = False
    model = MinFillAttention()
    result = fxfuse.export_onnx(model, (q, k, v, keep), tmp_path / "m.onnx")
    assert result.count("Attention") == 1
    ort_error(tmp_path / "m.onnx", model, (q, k, v, keep))


class SmallFillAttention(nn.Module):
    """masked_fill(-1e4) replaces scores: adding -1e4 would not be the same, so no Attention node."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = (q @ k.transpose(-1, -2)) * 0.25
        return s.masked_fill(~keep[:, None, None, :], -1e4).softmax(-1) @ v


class BottomRightCausal(nn.Module):
    """Causal cross attention aligned bottom-right (offset Nk - Nq): ONNX is_causal is top-left."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        s = (q @ k.transpose(-1, -2)) * 0.25
        return s.masked_fill(~tri, float("-inf")).softmax(-1) @ v


def test_replacing_fill_lowers_to_explicit_subgraph(tmp_path):
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    keep = torch.rand(2, 5) < 0.6
    keep[0] = False
    result = fxfuse.export_onnx(SmallFillAttention(), (q, k, v, keep), tmp_path / "m.onnx")
    assert result.count("Attention") == 0 and result.count("Softmax") == 1
    assert "replaces scores" in result.sites[0].lowered_as
    ort_error(tmp_path / "m.onnx", SmallFillAttention(), (q, k, v, keep))


def test_causal_offset_becomes_a_mask_not_is_causal(tmp_path):
    inputs = (torch.randn(2, 2, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    result = fxfuse.export_onnx(BottomRightCausal(), inputs, tmp_path / "m.onnx")
    assert result.count("Attention") == 1 and "offset 4" in result.sites[0].lowered_as
    ort_error(tmp_path / "m.onnx", BottomRightCausal(), inputs)


def test_layout_round_trip_folds_to_one_reshape():
    from onnx import TensorProto, helper

    from fxfuse.onnx.layout import fold_layout_round_trips

    def model(perm2: list[int], out: list[int]):
        nodes = [
            helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 1]),
            helper.make_node("Reshape", ["a", "s"], ["b"]),
            helper.make_node("Transpose", ["b"], ["y"], perm=perm2),
        ]
        shape = helper.make_tensor("s", TensorProto.INT64, [4], [1, 2, 3, 4])
        info = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
        shapes = [info("a", [2, 3, 4]), info("b", [1, 2, 3, 4])]
        graph = helper.make_graph(
            nodes, "g", [info("x", [2, 4, 3])], [info("y", out)], [shape], value_info=shapes
        )
        return helper.make_model(graph)

    undone = model([0, 1, 3, 2], [1, 2, 4, 3])  # every element back where x had it
    assert fold_layout_round_trips(undone) == 1
    assert [n.op_type for n in undone.graph.node] == ["Reshape"]
    moved = model([0, 2, 1, 3], [1, 3, 2, 4])
    assert fold_layout_round_trips(moved) == 0 and len(moved.graph.node) == 3


def test_adaptive_pool_with_dynamic_hw_names_op_and_line(tmp_path):
    model, inputs = spp_models.make_sppnet()
    with pytest.raises(ExportError, match=r"fxfuse::spp at .*spp_models\.py:\d+.*dynamic"):
        fxfuse.export_onnx(
            model, inputs, tmp_path / "m.onnx", dynamic_shapes={"x": {2: Dim("h", min=16, max=256)}}
        )
    assert not (tmp_path / "m.onnx").exists()


def test_adaptive_pool_with_uneven_windows_is_refused(tmp_path):
    model, _ = spp_models.make_sppnet()
    with pytest.raises(ExportError, match=r"4x4 bins over 10x10"):
        fxfuse.export_onnx(model, (torch.randn(1, 3, 40, 40),), tmp_path / "m.onnx")


def test_adaptive_window():
    assert adaptive_window(8, 4) == (2, 2)
    assert adaptive_window(7, 3) == (3, 2)  # windows [0,3) [2,5) [4,7)
    assert adaptive_window(10, 4) is None  # starts 0, 2, 5, 7


def test_dynamic_batch_and_size_verified_at_second_shape(tmp_path):
    model, inputs = spp_models.make_yolo_sppf()
    h = Dim("h", min=2, max=64)
    result = fxfuse.export_onnx(
        model, inputs, tmp_path / "m.onnx", dynamic_shapes={"x": {0: Dim("b", max=8), 2: 8 * h, 3: 8 * h}}
    )
    assert len(result.max_rel_err) == 2
    ort_error(tmp_path / "m.onnx", model, (torch.randn(3, 3, 96, 96),))


def test_fused_nodes_are_local_functions_ort_runs(tmp_path):
    model, inputs = attention_models.HandMHA.make()
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx", fused_nodes=True)
    assert result.count("fxfuse.attention") == 1 and result.count("Attention") == 0
    import onnx

    proto = onnx.load(tmp_path / "m.onnx")
    (function,) = proto.functions
    assert function.domain == "fxfuse" and [n.op_type for n in function.node].count("Attention") == 1
    ort_error(tmp_path / "m.onnx", model, inputs)


def test_optimized_module_exports_its_original(tmp_path):
    model, inputs = spp_models.make_yolo_spp()
    opt = fxfuse.optimize(model, inputs)
    result = fxfuse.export_onnx(opt, inputs, tmp_path / "m.onnx")
    assert result.count("MaxPool") == 3
    assert "MaxPool cascade" in str(result)


def test_cli_export(tmp_path, capsys):
    from fxfuse.cli import main

    assert main(["export", "examples.spp_models:make_sppnet", "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").exists()
    assert "GlobalMaxPool" in capsys.readouterr().out


def _tiny_hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 12))
    if name == "bert":
        cfg = transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 7:] = 0
        return transformers.BertModel(cfg).eval(), (ids, mask)
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=100,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            use_cache=False,
            attn_implementation="eager",
        )
        return transformers.GPT2Model(cfg).eval(), (ids,)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation="eager",
    )
    return transformers.LlamaModel(cfg).eval(), (ids,)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hugging_face_attention_sites_become_attention_nodes(name, tmp_path):
    model, inputs = _tiny_hf(name)
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert result.report.count("attention") == 2, str(result.report)
    assert result.count("Attention") == 2 and result.count("Softmax") == 0
    assert ort_error(tmp_path / "m.onnx", model, inputs) < 1e-4


def test_hugging_face_kv_cache_is_left_out_with_a_note(tmp_path):
    # GPT-2 as configured by default returns its KV cache (a DynamicCache, which torch.export cannot output)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  attn_implementation="eager")  # fmt: skip
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    result = fxfuse.export_onnx(model, (ids,), tmp_path / "m.onnx")
    assert model.config.use_cache, "the user's config must be restored"
    assert result.count("Attention") == 2 and any("use_cache=False" in n for n in result.notes), str(result)
    with torch.no_grad():
        want = model(ids, use_cache=False).last_hidden_state
    check = compare(run_onnx(str(tmp_path / "m.onnx"), (ids,))[:1], [want], 1e-4)
    assert check.ok, check.reason


def test_keyword_inputs_encoder_decoder(tmp_path):
    # T5 needs decoder_input_ids as a keyword; the dict's keys name the ONNX inputs
    transformers = pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_decoder_layers=1,
                                num_heads=4, attn_implementation="eager")  # fmt: skip
    model = transformers.T5Model(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 9)), "decoder_input_ids": torch.randint(0, 100, (2, 5))}
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert result.report.count("attention") == 3 and result.count("Attention") == 3, str(result)
    assert [i.name for i in onnx.load(tmp_path / "m.onnx").graph.input] == list(inputs)
    assert result.sites[0].location.startswith("encoder.block.0"), "module paths are the model's own"
    with torch.no_grad():
        want = model(**inputs, use_cache=False).last_hidden_state
    check = compare(run_onnx(str(tmp_path / "m.onnx"), tuple(inputs.values()))[:1], [want], 1e-4)
    assert check.ok, check.reason


def test_keyword_inputs_need_identifier_keys(tmp_path):
    model, (x,) = attention_models.CausalGPTBlock.make()
    with pytest.raises(ValueError, match="identifiers"):
        fxfuse.export_onnx(model, {"not valid": x}, tmp_path / "m.onnx")


def test_hugging_face_gqa_with_dynamic_batch_and_sequence(tmp_path):
    model, inputs = _tiny_hf("llama")
    dims = {0: Dim("batch", max=8), 1: Dim("seq", min=2, max=32)}
    result = fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx", dynamic_shapes=(dims,))
    assert result.count("Attention") == 2 and len(result.max_rel_err) == 2
    assert ort_error(tmp_path / "m.onnx", model, (torch.randint(0, 100, (3, 20)),)) < 1e-4


def test_dropout_in_training_mode_is_turned_off_and_mode_restored(tmp_path):
    model, inputs = attention_models.CausalGPTBlock.make()
    model.train()
    fxfuse.export_onnx(model, inputs, tmp_path / "m.onnx")
    assert model.training
    assert math.isfinite(ort_error(tmp_path / "m.onnx", model.eval(), inputs))
