"""Translation throughput: the compact model vs Hugging Face MarianMT of identical dimensions.

Both have random weights, d=256, 3+3 layers, 4 heads, FFN 1024, post-LN, sinusoidal
positions, a shared vocabulary; both translate the same batch of 32 real source sentences
with beam 4 and generate exactly the same number of tokens. Goal: ours >= 2x MarianMT.
    python bench/translate_vs_marian.py [--json out.json]      (needs: pip install transformers)
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved, report, setup

from automoe.model.decode import beam_search
from automoe.model.inference import for_inference
from automoe.model.subnet import SubTransformer
from automoe.model.transformer import ModelArgs
from automoe.space import ArchConfig

D, LAYERS, HEADS, FFN, VOCAB = 256, 3, 4, 1024, 8000


def ours() -> SubTransformer:
    arch = ArchConfig(
        encoder_embed_dim=D,
        decoder_embed_dim=D,
        encoder_ffn=((FFN,),) * LAYERS,
        decoder_ffn=((FFN,),) * LAYERS,
        encoder_self_heads=(HEADS,) * LAYERS,
        decoder_self_heads=(HEADS,) * LAYERS,
        decoder_ende_heads=(HEADS,) * LAYERS,
        decoder_ende_span=(1,) * LAYERS,
    )
    return SubTransformer(arch=arch, args=ModelArgs(vocab_size=VOCAB, qkv_dim=D, max_embed_dim=D)).eval()


def marian():
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(
        vocab_size=VOCAB,
        d_model=D,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        activation_function="relu",
        scale_embedding=True,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        max_position_embeddings=512,
        share_encoder_decoder_embeddings=True,
        dropout=0.0,
    )
    return MarianMTModel(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    setup()
    torch.manual_seed(0)
    model, hf = for_inference(ours()), marian()  # ours in its serving layout, as Translator runs it
    src = torch.randint(4, VOCAB, (args.batch, args.src_len))
    src[:, -1] = 3
    n = args.new_tokens

    def run_ours():
        hyps = beam_search(model, src, beam=4, max_len_a=0.0, max_len_b=n, min_len=n)
        assert all(len(h.tokens) == n for h in hyps)

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(
            input_ids=src,
            attention_mask=src.ne(0),
            num_beams=4,
            min_new_tokens=n + 1,
            max_new_tokens=n + 1,
            do_sample=False,
            early_stopping=True,
        )
        assert out.shape[1] == n + 2  # the start token and n + 1 decoder steps, as ours (n tokens + EOS)

    t = interleaved({"ours": run_ours, "marian": run_hf}, repeats=args.repeats, warmup=1)
    tokens = args.batch * n
    report(
        "translate_vs_marian",
        {
            "batch": args.batch,
            "beam": 4,
            "generated_tokens": tokens,
            "ours_tokens_per_s": tokens / t["ours"],
            "marian_tokens_per_s": tokens / t["marian"],
            "speedup_ours_over_marian": t["marian"] / t["ours"],
        },
        args.json,
    )


if __name__ == "__main__":
    main()
