import math

import pytest
import torch
import torch.nn.functional as F

from automoe.model.moe import MoE, RouterStats, load_balancing_loss, router_z_loss


def reference_ffn(expert, x, hidden):
    """The dense FFN written out, with the expert's front-sliced weights."""
    d = x.shape[-1]
    h = F.relu(x @ expert.fc1.weight[:hidden, :d].T + expert.fc1.bias[:hidden])
    return h @ expert.fc2.weight[:d, :hidden].T + expert.fc2.bias[:d]


def reference_moe(moe, x, dims, top_k):
    """Token by token: y = sum over the top-k experts of p_i * expert_i(x)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = (tokens.double() @ moe.router.weight[: len(dims), : x.shape[-1]].double().T).softmax(-1)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        gates, chosen = probs[t].topk(min(top_k, len(dims)))
        for g, e in zip(gates.tolist(), chosen.tolist(), strict=True):
            out[t] += g * reference_ffn(moe.experts[e], tokens[t : t + 1], dims[e])[0]
    return out.view_as(x)


@pytest.fixture
def moe():
    torch.manual_seed(0)
    return MoE(embed_dim=32, ffn_dims=(64, 64, 64, 64))


def test_one_expert_equals_the_dense_ffn_outputs_and_gradients(moe):
    x = torch.randn(3, 5, 24, requires_grad=True)
    y, stats = moe(x, (48,))
    assert stats is None
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_ffn(moe.experts[0], x_ref, 48)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, moe.experts[0].fc1.weight, moe.experts[0].fc2.bias], grad_out)
    want = torch.autograd.grad(y_ref, [x_ref, moe.experts[0].fc1.weight, moe.experts[0].fc2.bias], grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert moe.router.weight.grad is None


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dims", [(64, 16), (16, 48, 32), (64, 64, 16, 32)])
def test_dispatch_equals_token_by_token_reference(moe, dims, top_k):
    x = torch.randn(4, 6, 32)
    y, stats = moe(x, dims, top_k=top_k)
    torch.testing.assert_close(y, reference_moe(moe, x, dims, top_k).float(), rtol=1e-5, atol=1e-5)
    assert stats.expert_index.shape == (24, top_k)
    assert int(stats.tokens_per_expert.sum()) == 24 * top_k and stats.dropped == 0
    torch.testing.assert_close(stats.probs.sum(-1), torch.ones(24))


def test_gradients_reach_router_and_only_used_experts(moe):
    x = torch.randn(2, 8, 32)
    y, stats = moe(x, (64, 16, 32))
    y.sum().backward()
    assert moe.router.weight.grad[:3].abs().sum() > 0
    assert moe.router.weight.grad[3:].abs().sum() == 0  # the 4th expert is not in this arch
    used = set(stats.expert_index.flatten().tolist())
    for e in range(4):
        has_grad = moe.experts[e].fc1.weight.grad is not None and moe.experts[e].fc1.weight.grad.abs().sum() > 0
        assert has_grad == (e in used)


def test_router_is_fp32_under_bf16_autocast(moe):
    x = torch.randn(2, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = moe(x, (64, 32))
    assert stats.logits.dtype == torch.float32 and stats.probs.dtype == torch.float32
    y_fp32, stats_fp32 = moe(x, (64, 32))
    torch.testing.assert_close(y.float(), y_fp32, rtol=0.05, atol=0.05)
    # a near tie that bf16 cannot tell apart (logits 1.0 and 1.001; bf16's spacing at 1 is 2**-7):
    # fp32 routing sends every token to expert 1, under autocast too
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, :32] = 1.0 / 32
        moe.router.weight[1, :32] = 1.001 / 32
    ones = torch.ones(2, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = moe(ones, (64, 32))
    _, stats_fp32 = moe(ones, (64, 32))
    assert torch.equal(stats.logits, stats_fp32.logits)
    assert stats.expert_index.flatten().tolist() == [1] * 8


def test_capacity_factor_drops_overflow_tokens(moe):
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(64, 32)
    x[:, 0] = 1.0
    y_all, stats_all = moe(x, (64, 64))
    assert stats_all.tokens_per_expert.tolist() == [64, 0] and stats_all.dropped == 0
    y, stats = moe(x, (64, 64), capacity_factor=0.5)  # capacity = ceil(0.5 * 64 / 2) = 16
    assert stats.dropped == 48
    kept = y.abs().sum(-1) > 0
    assert kept.sum() == 16 and kept[:16].all()  # first come, first served
    torch.testing.assert_close(y[:16], y_all[:16])


def test_load_balancing_loss_matches_the_switch_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    chosen = probs.argmax(-1, keepdim=True)
    stats = RouterStats(probs.log(), probs, chosen, torch.bincount(chosen.flatten(), minlength=3), 0)
    f = torch.tensor([3 / 4, 1 / 4, 0.0])
    p = probs.mean(0)
    torch.testing.assert_close(load_balancing_loss(stats, alpha=0.01), 0.01 * 3 * (f * p).sum())
    uniform = torch.full((8, 4), 0.25)
    balanced = RouterStats(uniform.log(), uniform, torch.arange(8).remainder(4)[:, None], torch.full((4,), 2), 0)
    torch.testing.assert_close(load_balancing_loss(balanced, alpha=0.01), torch.tensor(0.01))  # the minimum


def test_router_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    stats = RouterStats(logits, logits.softmax(-1), logits.argmax(-1, keepdim=True), torch.tensor([0, 2]), 0)
    want = (math.log(2) ** 2 + math.log(math.exp(1) + math.exp(3)) ** 2) / 2
    assert router_z_loss(stats).item() == pytest.approx(want)


def test_padding_is_not_routed_and_counts_in_no_statistic(moe):
    """With `keep`, only real tokens reach the router and the experts: statistics and
    outputs of the real tokens equal a run on the real tokens alone; padding rows are zero."""
    dims = (64, 16, 32)
    x = torch.randn(3, 7, 32)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 4:] = False
    keep[2, 2:] = False
    y, stats = moe(x, dims, top_k=1, keep=keep)
    y_real, stats_real = moe(x[keep], dims, top_k=1)
    torch.testing.assert_close(y[keep], y_real)
    assert torch.all(y[~keep] == 0)
    assert int(stats.tokens_per_expert.sum()) == int(keep.sum()) == stats.probs.shape[0]
    torch.testing.assert_close(stats.tokens_per_expert, stats_real.tokens_per_expert)
    torch.testing.assert_close(load_balancing_loss(stats), load_balancing_loss(stats_real))
    capped, capped_stats = moe(x, dims, top_k=1, keep=keep, capacity_factor=1.0)  # capacity from real tokens
    assert capped_stats.dropped == moe(x[keep], dims, top_k=1, capacity_factor=1.0)[1].dropped


def test_the_model_routes_no_padding():
    """Encoder and decoder pass their padding masks to every MoE layer: router statistics of a
    padded batch count exactly the real tokens."""
    from automoe.model.subnet import SubTransformer
    from automoe.model.transformer import ModelArgs
    from automoe.space import load_space

    space = load_space("small")
    arch = space.largest()
    torch.manual_seed(0)
    model = SubTransformer(arch=arch, args=ModelArgs(vocab_size=50, qkv_dim=256, max_embed_dim=256)).eval()
    src = torch.randint(4, 50, (2, 9))
    src[1, 5:] = 0
    tgt = torch.randint(4, 50, (2, 6))
    tgt[0, 3:] = 0
    _, stats = model(src, tgt)
    enc, dec = stats[: arch.encoder_layers], stats[arch.encoder_layers :]
    assert all(int(s.tokens_per_expert.sum()) == int((src != 0).sum()) * arch.top_k for s in enc)
    assert all(int(s.tokens_per_expert.sum()) == int((tgt != 0).sum()) * arch.top_k for s in dec)


def test_auxiliary_losses_are_summed_over_moe_layers():
    """Switch sums the load-balancing loss over layers: two MoE layers give twice one layer's
    loss, and dense layers add nothing."""
    from automoe.train.trainer import auxiliary_loss

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    chosen = probs.argmax(-1, keepdim=True)
    s = RouterStats(probs.log(), probs, chosen, torch.bincount(chosen.flatten(), minlength=3), 0)
    one = auxiliary_loss([s], 0.01, 0.001)
    torch.testing.assert_close(one, load_balancing_loss(s, 0.01) + 0.001 * router_z_loss(s))
    torch.testing.assert_close(auxiliary_loss([s, None, s], 0.01, 0.001), 2 * one)
    assert float(auxiliary_loss([s, s], 0.0, 0.0)) == 0.0
