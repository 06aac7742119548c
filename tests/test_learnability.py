"""A few hundred updates on a tiny reverse task: beam search must produce the right outputs."""

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from automoe.model.decode import beam_search, greedy
from automoe.model.inference import for_inference
from automoe.model.subnet import extract
from automoe.model.supernet import SuperTransformer
from automoe.model.transformer import ModelArgs
from automoe.space import ArchConfig, load_space

TINY_SPACE = {
    "name": "tiny",
    "encoder_embed_dim": [64],
    "decoder_embed_dim": [64],
    "encoder_layers": [2],
    "decoder_layers": [1, 2],
    "ffn_dim": [128, 64],
    "self_attn_heads": [4, 2],
    "ende_attn_heads": [4, 2],
    "ende_span": [1, 2],
    "n_experts": [1, 2],
    "top_k": [1],
    "qkv_dim": 64,
    "heterogeneous": True,
}
PAD, BOS, EOS, FIRST, VOCAB = 0, 2, 3, 4, 16


def reverse_batch(rng: np.random.Generator, n: int):
    lengths = rng.integers(3, 8, n)
    seqs = [rng.integers(FIRST, VOCAB, int(k)).tolist() for k in lengths]
    width = max(lengths) + 1
    src = torch.full((n, width), PAD)
    tgt_in = torch.full((n, width), PAD)
    tgt_out = torch.full((n, width), PAD)
    for i, s in enumerate(seqs):
        rev = s[::-1]
        src[i, : len(s) + 1] = torch.tensor(s + [EOS])
        tgt_in[i, : len(s) + 1] = torch.tensor([BOS] + rev)
        tgt_out[i, : len(s) + 1] = torch.tensor(rev + [EOS])
    return src, tgt_in, tgt_out, seqs


def test_supernet_learns_to_reverse_and_beam_search_decodes_it(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    space = load_space(path)
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=VOCAB, qkv_dim=64, max_embed_dim=64, dropout=0.0, attention_dropout=0.0)
    net = SuperTransformer(space=space, args=args)
    arch = ArchConfig.from_dict(
        {
            "encoder_embed_dim": 64,
            "decoder_embed_dim": 64,
            "encoder_ffn": [[128, 64], [64, 128]],
            "decoder_ffn": [[128, 64], [128]],
            "encoder_self_heads": [4, 2],
            "decoder_self_heads": [4, 4],
            "decoder_ende_heads": [4, 2],
            "decoder_ende_span": [2, 1],
            "top_k": 1,
        }
    ).validate(space)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, betas=(0.9, 0.98))
    # cosine decay: a constant 3e-3 leaves loss spikes at the end that a float-rounding change can move
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 0.5 * (1 + np.cos(np.pi * u / 300)))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(300):
        src, tgt_in, tgt_out, _ = reverse_batch(rng, 64)
        logits, _ = net(src, tgt_in, arch)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.1 < np.mean(losses[:20])

    net.eval()
    src, _, _, seqs = reverse_batch(np.random.default_rng(123), 50)
    want = [s[::-1] for s in seqs]
    compact = extract(net, arch)  # heterogeneous MoE: the supernet slice, then its int8 serving layout
    for model, a in ((net, arch), (compact, None), (for_inference(compact, "int8"), None)):
        beams = [h.tokens for h in beam_search(model, src, a, beam=4, max_len_a=1.0, max_len_b=5)]
        assert np.mean([b == w for b, w in zip(beams, want, strict=True)]) >= 0.9
        assert np.mean([g == w for g, w in zip(greedy(model, src, a), want, strict=True)]) >= 0.9
