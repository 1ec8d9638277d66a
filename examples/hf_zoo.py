"""Hugging Face models as shipped, from tiny random configs with eager attention: does `optimize` fuse every
attention site, and do the outputs still match?

    python -m examples.hf_zoo            # every model (about two minutes)
    python -m examples.hf_zoo bloom t5   # some of them

Prints one line per model: fused sites, rejected sites (with reasons), max relative error of the first
output against the original model. Needs `transformers` (installed by `pip install -e '.[dev]'`).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable

import torch

import fxfuse

Factory = Callable[[], tuple[torch.nn.Module, dict]]


def zoo() -> dict[str, Factory]:
    import transformers as t

    ids = lambda n=7: torch.randint(0, 99, (2, n))  # noqa: E731
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # the second sequence is padded: the padding mask matters
    common = dict(vocab_size=99, attn_implementation="eager")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **common)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4, attn_implementation="eager")  # fmt: skip
    seq2seq = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, **common)  # fmt: skip
    t5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_decoder_layers=1, num_heads=4, **common)
    text = lambda model: (model, dict(input_ids=ids(), attention_mask=mask))  # noqa: E731
    image = lambda model, size=16: (model, dict(pixel_values=torch.randn(2, 3, size, size)))  # noqa: E731
    return {
        "bert": lambda: text(t.BertModel(t.BertConfig(**small))),
        "roberta": lambda: text(t.RobertaModel(t.RobertaConfig(pad_token_id=1, **small))),
        "distilbert": lambda: text(t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                                         **common))),  # fmt: skip
        "electra": lambda: text(t.ElectraModel(t.ElectraConfig(embedding_size=32, **small))),
        "albert": lambda: text(t.AlbertModel(t.AlbertConfig(embedding_size=16, **small))),
        "deberta_v2": lambda: text(t.DebertaV2Model(t.DebertaV2Config(**small))),
        "gpt2": lambda: text(t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, **common))),
        "gpt_neox": lambda: text(t.GPTNeoXModel(t.GPTNeoXConfig(**small))),
        "opt": lambda: text(t.OPTModel(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   ffn_dim=37, word_embed_proj_dim=32, **common))),  # fmt: skip
        "bloom": lambda: text(t.BloomModel(t.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common))),
        "falcon": lambda: text(t.FalconModel(t.FalconConfig(new_decoder_architecture=False, alibi=False, **small))),
        "llama": lambda: text(t.LlamaModel(t.LlamaConfig(num_key_value_heads=2, **small))),
        "mistral": lambda: text(t.MistralModel(t.MistralConfig(num_key_value_heads=2, **small))),
        "qwen2": lambda: text(t.Qwen2Model(t.Qwen2Config(num_key_value_heads=2, **small))),
        "gemma": lambda: text(t.GemmaModel(t.GemmaConfig(num_key_value_heads=1, head_dim=8, **small))),
        "phi": lambda: text(t.PhiModel(t.PhiConfig(**small))),
        "t5": lambda: (t.T5Model(t.T5Config(**t5)), dict(input_ids=ids(), decoder_input_ids=ids(5))),
        "mt5": lambda: (t.MT5Model(t.MT5Config(**t5)), dict(input_ids=ids(), decoder_input_ids=ids(5))),
        "bart": lambda: (t.BartModel(t.BartConfig(**seq2seq)),
                         dict(input_ids=ids(), attention_mask=mask, decoder_input_ids=ids(5))),  # fmt: skip
        "whisper": lambda: (
            t.WhisperModel(t.WhisperConfig(pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                                           num_mel_bins=8, max_source_positions=8, **seq2seq)),
            dict(input_features=torch.randn(2, 8, 16), decoder_input_ids=ids(5)),
        ),  # fmt: skip
        "clip_text": lambda: text(t.CLIPTextModel(t.CLIPTextConfig(**small))),
        "clip_vision": lambda: image(t.CLIPVisionModel(t.CLIPVisionConfig(**vision))),
        "vit": lambda: image(t.ViTModel(t.ViTConfig(**vision))),
        "deit": lambda: image(t.DeiTModel(t.DeiTConfig(**vision))),
        "dinov2": lambda: image(t.Dinov2Model(t.Dinov2Config(**vision))),
        "swin": lambda: image(t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1],
                                                       num_heads=[2, 4], window_size=4, attn_implementation="eager")),
                              32),  # fmt: skip
        "mobilevit": lambda: image(t.MobileViTModel(t.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2,
            attn_implementation="eager")), 32),  # fmt: skip
    }


def _first(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def check(name: str, make: Factory) -> tuple[int, list[str], float]:
    """(fused attention sites, reasons of rejected sites, max relative error of the first output)."""
    torch.manual_seed(0)
    model, kwargs = make()
    model.eval()
    opt = fxfuse.optimize(model)
    with torch.no_grad():
        want, got = _first(model(**kwargs)), _first(opt(**kwargs))
    rep = fxfuse.report(opt)
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    return rep.count("attention"), sorted({r.reason for r in rep.rejected("attention")}), err


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    models = zoo()
    names = argv or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(models)}", file=sys.stderr)
        return 2
    worst = 0.0
    for name in names:
        start = time.perf_counter()
        fused, rejected, err = check(name, models[name])
        worst = max(worst, err)
        print(f"{name:12s} fused {fused:2d}  rejected {len(rejected)}  max rel err {err:.1e}  "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
        for reason in rejected:
            print(f"{'':12s} rejected: {reason}")
    print(f"worst max rel err {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
