"""SuperTransformer, extraction, persistence, incremental decoding and counting."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from automoe.errors import AutomoeError, ConfigError
from automoe.model.counting import count, per_token_flops
from automoe.model.decode import beam_search, greedy
from automoe.model.subnet import SubTransformer, extract
from automoe.model.supernet import SuperTransformer
from automoe.model.transformer import ModelArgs
from automoe.space import load_space

VOCAB = 64


def make_supernet(name: str, seed: int = 0, pre_norm: bool = False) -> SuperTransformer:
    space = load_space(name)
    torch.manual_seed(seed)
    args = ModelArgs(
        vocab_size=VOCAB, qkv_dim=space.qkv_dim, max_embed_dim=max(space.encoder_embed_dim), pre_norm=pre_norm
    )
    return SuperTransformer(space=space, args=args).eval()


@pytest.fixture(scope="module")
def supernets():
    nets = {name: make_supernet(name) for name in ("small", "space0")}
    return nets | {"small_pre_norm": make_supernet("small", pre_norm=True)}


def batch(seed: int, b: int = 3, s: int = 9, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (b, s), generator=g)
    src[0, s - 3 :] = 0  # padding
    src[0, s - 4] = 3
    tgt = torch.randint(4, VOCAB, (b, t), generator=g)
    tgt[:, 0] = 2
    return src, tgt


@pytest.mark.parametrize("name, n_archs", [("small", 25), ("space0", 6), ("small_pre_norm", 10)])
def test_extracted_subtransformer_equals_the_supernet_slice(supernets, name, n_archs):
    net = supernets[name]
    rng = np.random.default_rng(11)
    space = net.space
    archs = [space.largest(), space.smallest(), space.largest_dense()] + [space.sample(rng) for _ in range(n_archs)]
    src, tgt = batch(1)
    outputs = []
    for arch in archs:
        sub = extract(net, arch)
        want, stats = net(src, tgt, arch)
        got, sub_stats = sub(src, tgt)
        assert (got - want).abs().max().item() <= 1e-5
        assert [s is None for s in stats] == [len(e) == 1 for e in arch.encoder_ffn + arch.decoder_ffn]
        # compact: nothing the arch does not use
        counted = count(arch, VOCAB, space.qkv_dim, pre_norm=net.args.pre_norm).params_total
        assert sum(p.numel() for p in sub.parameters()) == counted
        assert len(sub.core.encoder) == arch.encoder_layers and len(sub.core.decoder) == arch.decoder_layers
        assert [len(layer.moe.experts) for layer in sub.core.encoder] == [len(e) for e in arch.encoder_ffn]
        outputs.append(want)
    # the arch matters: different archs give different outputs from the same weights
    assert not torch.allclose(outputs[0], outputs[1])


def test_supernet_weights_are_shared_front_slices(supernets):
    net = supernets["small"]
    arch = net.space.smallest()
    src, tgt = batch(2)
    logits, _ = net(src, tgt, arch)
    logits.sum().backward()
    w = net.core.encoder[0].moe.experts[0].fc1.weight  # (1024, 256) in the supernet
    assert w.grad[: arch.encoder_ffn[0][0], : arch.encoder_embed_dim].abs().sum() > 0
    assert w.grad[arch.encoder_ffn[0][0] :].abs().sum() == 0 and w.grad[:, arch.encoder_embed_dim :].abs().sum() == 0
    assert net.core.encoder[0].moe.experts[1].fc1.weight.grad is None  # expert 2 is not in the smallest arch
    assert net.core.encoder[-1].self_attn.q_proj.weight.grad is None  # nor the third encoder layer
    net.zero_grad(set_to_none=True)


def test_train_mode_dropout_scales_with_width(supernets):
    net = supernets["small"]
    core = net.core
    core.train()
    try:
        p_big, _ = core._dropouts(256)
        p_small, _ = core._dropouts(192)
        assert p_big == pytest.approx(0.3) and p_small == pytest.approx(0.3 * 192 / 256)
    finally:
        core.eval()


def test_incremental_decoding_equals_the_full_forward(supernets):
    rng = np.random.default_rng(5)
    for name, net in supernets.items():
        for arch in [net.space.sample(rng) for _ in range(3)]:
            for model, a in ((net, arch), (extract(net, arch), None)):
                src, tgt = batch(3)
                full, _ = model(src, tgt, a)
                enc, cache, steps = model.encode(src, a), None, []
                for t in range(tgt.shape[1]):
                    logits, cache = model.decode(tgt[:, t : t + 1], enc, a, cache)
                    steps.append(logits)
                torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4), name


def test_decoding_cache_grows_and_reorders_rows(supernets):
    """Past the buffer's first capacities (16, 32 positions), and after rows are reordered,
    within a sentence's beams (in place) or across sentences, the steps equal the full pass."""
    net = supernets["small"]
    arch = net.space.sample(np.random.default_rng(8))
    src, tgt = batch(9, t=40)
    src[1] = src[2]  # rows 1 and 2 translate the same sentence: beams of one another
    enc = net.encode(src, arch)

    def steps(enc, cache, tokens, a, b):
        out = []
        for t in range(a, b):
            logits, cache = net.decode(tokens[:, t : t + 1], enc, arch, cache)
            out.append(logits)
        return torch.cat(out, 1), cache

    got, cache = steps(enc, None, tgt, 0, 40)
    torch.testing.assert_close(got, net(src, tgt, arch)[0], rtol=1e-4, atol=1e-4)
    cases = [([0, 2, 1], True, False), ([0, 2, 1], True, True), ([2, 0, 0], False, False)]
    for index, same_sources, grad in cases:  # in place (inference) / out of place (autograd)
        index = torch.tensor(index)
        with torch.set_grad_enabled(grad):
            _, cache = steps(enc, None, tgt, 0, 9)
            cache = cache.reorder(index, same_sources=same_sources)
            moved = torch.cat([tgt[index, :9], tgt[:, 9:20]], dim=1)  # row i: row index[i]'s past, own future
            enc_moved = enc if same_sources else net.encode(src[index], arch)
            got, _ = steps(enc_moved, cache, moved, 9, 20)
            want = net(src[index], moved, arch)[0][:, 9:20]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_beam_one_equals_greedy_and_beams_are_batch_independent(supernets):
    net = supernets["small"]
    rng = np.random.default_rng(6)
    for arch in [net.space.sample(rng) for _ in range(3)]:
        src, _ = batch(4, b=4)
        assert [h.tokens for h in beam_search(net, src, arch, beam=1)] == greedy(net, src, arch)
        together = beam_search(net, src, arch, beam=4)
        alone = [beam_search(net, src[i : i + 1, : int((src[i] != 0).sum())], arch, beam=4)[0] for i in range(4)]
        assert [h.tokens for h in together] == [h.tokens for h in alone]
        sub = extract(net, arch)
        assert [h.tokens for h in beam_search(sub, src, beam=4)] == [h.tokens for h in together]


def test_save_and_load_round_trip(supernets, tmp_path):
    net = supernets["small"]
    arch = net.space.sample(np.random.default_rng(9))
    sub = extract(net, arch)
    sub.save(tmp_path / "model.pt", vocab={"spm_sha256": "abc", "vocab_size": VOCAB})
    loaded, vocab = SubTransformer.load(tmp_path / "model.pt")
    assert loaded.arch == arch and vocab["vocab_size"] == VOCAB and loaded.args == sub.args
    src, tgt = batch(5)
    torch.testing.assert_close(loaded.eval()(src, tgt)[0], sub(src, tgt)[0], rtol=0, atol=0)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(AutomoeError, match="bad.pt: not a readable model file"):
        SubTransformer.load(tmp_path / "bad.pt")
    with pytest.raises(AutomoeError, match="missing.pt: model file not found"):
        SubTransformer.load(tmp_path / "missing.pt")


def test_extract_rejects_an_arch_outside_the_space(supernets):
    net = supernets["small"]
    bad = dataclasses.replace(net.space.smallest(), encoder_embed_dim=320)
    with pytest.raises(ConfigError, match="arch.encoder_embed_dim: 320"):
        extract(net, bad)


@pytest.mark.parametrize("name", ["small", "space0"])
def test_dense_gflops_match_the_flop_counter(supernets, name):
    net = supernets[name]
    rng = np.random.default_rng(7)
    dense = [net.space.largest_dense(), net.space.smallest()]
    dense += [
        dataclasses.replace(
            a, encoder_ffn=tuple(e[:1] for e in a.encoder_ffn), decoder_ffn=tuple(e[:1] for e in a.decoder_ffn)
        )
        for a in (net.space.sample(rng) for _ in range(3))
    ]
    src, tgt = batch(8, b=1, s=30, t=30)
    src[0, -1] = 3
    for arch in dense:
        sub = extract(net, arch)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            sub(src, tgt)
        measured = counter.get_total_flops() / 1e9
        assert count(arch, VOCAB, net.space.qkv_dim).gflops == pytest.approx(measured, rel=0.02)


def test_moe_active_gflops_follow_the_routing(supernets):
    net = supernets["small"]
    arch = dataclasses.replace(net.space.largest(), top_k=1)
    src, tgt = batch(9, b=1, s=30, t=30)
    src = src.clamp(min=4)  # 30 real tokens: the count is for an unpadded 30 + 30 pass
    sub = extract(net, arch)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, stats = sub(src, tgt)
    routed = count(arch, VOCAB, net.space.qkv_dim, routing=stats)
    assert routed.gflops == pytest.approx(counter.get_total_flops() / 1e9, rel=0.02)
    assert routed.gflops < routed.gflops_all_experts
    src_flops, tgt_flops = per_token_flops(arch, net.space.qkv_dim, 30, 30, VOCAB, stats)
    assert (src_flops.sum() + tgt_flops.sum()) / 1e9 == pytest.approx(routed.gflops, rel=1e-9)


def test_counts_at_measured_expert_loads(supernets):
    """Loads over a corpus (each expert's share of the assignments) give FLOPs and active
    parameters that follow where tokens go:
    a model whose tokens go to its big experts uses more than uniform routing says."""
    net = supernets["small"]
    base = net.space.largest()
    arch = dataclasses.replace(
        base,
        encoder_ffn=((1024, 256),) * base.encoder_layers,
        decoder_ffn=((256, 1024),) * base.decoder_layers,
        top_k=1,
    )
    # (one forward's routing is counted as its loads: test_moe_active_gflops_follow_the_routing
    # checks that count against torch's FLOP counter)
    n = arch.encoder_layers + arch.decoder_layers
    big = [np.array([1.0, 0.0])] * arch.encoder_layers + [np.array([0.0, 1.0])] * arch.decoder_layers
    small = [1 - x for x in big]
    uniform = count(arch, VOCAB, net.space.qkv_dim)
    on_big, on_small = (count(arch, VOCAB, net.space.qkv_dim, loads=x) for x in (big, small))
    assert on_small.params_active < uniform.params_active < on_big.params_active
    assert on_small.gflops < uniform.gflops < on_big.gflops < uniform.gflops_all_experts
    # uniform loads are uniform routing
    assert count(arch, VOCAB, net.space.qkv_dim, loads=[np.full(2, 0.5)] * n) == uniform
    with pytest.raises(ValueError, match="expert loads for"):
        count(arch, VOCAB, net.space.qkv_dim, loads=big[:-1])


def test_evaluate_reports_expert_loads_and_gflops_at_the_measured_routing(supernets):
    """evaluate's loads are the test sentences' routing summed per layer (checked against
    the router statistics of the same forward passes), named by layer; the GFLOPs at them
    are test_counts_at_measured_expert_loads'."""
    from automoe.stages.evaluate import _named_loads, _routing
    from automoe.train.trainer import shift_right

    net = supernets["small"]
    base = net.space.largest()
    arch = dataclasses.replace(base, encoder_ffn=((1024, 256, 512),) * base.encoder_layers, top_k=1)
    model = extract(net, arch).eval()

    class Split:  # what evaluate reads of a prepared split: token ids per sentence
        src, tgt = [], []

    for seed in range(4):
        src, tgt = batch(20 + seed, b=1, s=12, t=9)
        Split.src.append(src[0].clamp(min=4).numpy())
        Split.tgt.append(tgt[0, 1:].numpy())
    _, loads = _routing(model, Split, 4)
    summed = [np.zeros(len(e)) for e in arch.encoder_ffn + arch.decoder_ffn]
    with torch.inference_mode():
        for src, tgt in zip(Split.src, Split.tgt, strict=True):
            prev = shift_right(torch.from_numpy(tgt)[None], model.args.bos_id, model.args.pad_id)
            _, stats = model(torch.from_numpy(src)[None], prev)
            for layer, st in enumerate(stats):
                summed[layer] += st.tokens_per_expert.numpy()
    for layer, load in enumerate(loads):
        np.testing.assert_allclose(load, summed[layer] / summed[layer].sum(), rtol=1e-12)
    named = _named_loads(loads, arch.encoder_layers)
    assert list(named) == [f"enc{i}" for i in range(arch.encoder_layers)] + [
        f"dec{j}" for j in range(arch.decoder_layers)
    ]
    assert all(len(v) == 3 for k, v in named.items() if k.startswith("enc"))


def test_heterogeneous_experts_make_per_token_cost_adaptive(supernets):
    net = supernets["small"]
    base = net.space.largest()
    arch = dataclasses.replace(base, encoder_ffn=((1024, 256),) * base.encoder_layers, top_k=1)
    src, tgt = batch(10, b=1, s=30, t=30)
    src = src.clamp(min=4)
    _, stats = extract(net, arch)(src, tgt)
    src_flops, _ = per_token_flops(arch, net.space.qkv_dim, 30, 30, VOCAB, stats)
    assert len(np.unique(src_flops)) > 1  # tokens routed to the big expert cost more


def test_param_counts_active_and_without_embeddings():
    space = load_space("small")
    dense = space.largest_dense()
    c = count(dense, VOCAB, space.qkv_dim)
    assert c.params_active == c.params_total  # dense: every weight is used by every token
    assert c.params_total - c.params_total_no_embed == VOCAB * 256
    moe = count(space.largest(), VOCAB, space.qkv_dim)
    assert moe.params_total > c.params_total and moe.params_active < moe.params_total


def _brute_force_best(model, src, max_tokens: int, length_penalty: float, min_len: int = 0):
    """The best translation by enumerating every target of up to `max_tokens` tokens plus
    EOS (pad and BOS excluded), scored as beam search scores: sum of log-probabilities
    (EOS included) / length ** length_penalty."""
    import itertools

    args = model.args
    words = [t for t in range(args.vocab_size) if t not in (args.pad_id, args.bos_id, args.eos_id)]
    best = (None, -float("inf"))
    with torch.no_grad():
        for n in range(min_len, max_tokens + 1):
            for seq in itertools.product(words, repeat=n):
                full = list(seq) + [args.eos_id]
                tgt_in = torch.tensor([[args.bos_id, *full[:-1]]])
                lprobs = torch.log_softmax(model(src, tgt_in)[0][0].float(), dim=-1)
                lprobs[:, [args.pad_id, args.bos_id]] = -torch.inf
                total = float(lprobs[torch.arange(len(full)), torch.tensor(full)].sum())
                score = total / len(full) ** length_penalty
                if score > best[1]:
                    best = (list(seq), score)
    return best


@pytest.mark.parametrize("length_penalty,min_len,seed", [(0.6, 0, 0), (1.0, 0, 1), (0.6, 2, 2)])
def test_beam_search_matches_brute_force_search_on_a_tiny_model(length_penalty, min_len, seed):
    """With a beam wide enough to keep every hypothesis, beam search is exhaustive search:
    its best translation and score equal brute-force enumeration over a 7-token vocabulary."""
    space = load_space("small")
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=7, qkv_dim=space.qkv_dim, max_embed_dim=256, dropout=0.0)
    arch = space.sample(np.random.default_rng(seed))
    model = SubTransformer(arch=arch, args=args).eval()
    with torch.no_grad():  # sharper distributions than the initial near-uniform ones
        model.core.embed.weight.mul_(6.0)
    src = torch.tensor([[4, 5, 6, 4, 3]])
    max_tokens = 3
    want_tokens, want_score = _brute_force_best(model, src, max_tokens, length_penalty, min_len)
    (hyp,) = beam_search(
        model, src, beam=200, length_penalty=length_penalty, max_len_a=0.0, max_len_b=max_tokens, min_len=min_len
    )
    assert hyp.tokens == want_tokens
    assert hyp.score == pytest.approx(want_score, abs=1e-4)
    # a narrow beam can only do as well or worse
    (narrow,) = beam_search(
        model, src, beam=2, length_penalty=length_penalty, max_len_a=0.0, max_len_b=max_tokens, min_len=min_len
    )
    assert narrow.score <= want_score + 1e-4
