"""Incremental decoding: greedy and batched beam search.

Both work with any model that has `encode(src, arch)` and
`decode(tokens, enc, arch, cache) -> (logits, cache)`: a SuperTransformer with an arch,
or a compact SubTransformer (arch None). Each step feeds one new token per hypothesis;
self-attention keys/values and the encoder-decoder keys/values come from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from automoe.model.transformer import EncoderOut
from automoe.space import ArchConfig


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # sum of log-probabilities (EOS included) / length ** length_penalty


def max_lengths(src: torch.Tensor, pad_id: int, a: float, b: int) -> torch.Tensor:
    """Most target tokens (before EOS) per sentence: a * source length + b."""
    return (a * (src != pad_id).sum(dim=1).float() + b).long()


@torch.no_grad()
def greedy(
    model, src: torch.Tensor, arch: ArchConfig | None = None, max_len_a: float = 1.2, max_len_b: int = 10
) -> list[list[int]]:
    args = model.args
    limits = max_lengths(src, args.pad_id, max_len_a, max_len_b)
    enc = model.encode(src, arch)
    engine = getattr(model, "compiled", None)  # greedy is beam 1: the same path, the same tokens
    if engine is not None and engine.usable(1, int(limits.max())):
        model._own(arch)
        return [tokens for tokens, _ in engine.beam_search(enc, limits.tolist(), 1, 1.0, 0)]
    batch = src.shape[0]
    out = torch.empty(batch, 0, dtype=torch.long, device=src.device)
    last = torch.full((batch, 1), args.bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    cache = None
    for step in range(int(limits.max()) + 1):
        logits, cache = model.decode(last, enc, arch, cache)
        lprobs = logits[:, -1].float()
        lprobs[:, [args.pad_id, args.bos_id]] = -torch.inf
        nxt = lprobs.argmax(dim=-1)
        nxt = torch.where(step >= limits, args.eos_id, nxt)  # forced EOS at the length limit
        nxt = torch.where(finished, args.pad_id, nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        finished |= nxt == args.eos_id
        if bool(finished.all()):
            break
        last = nxt[:, None]
    return [[t for t in row if t not in (args.eos_id, args.pad_id)] for row in out.tolist()]


@torch.no_grad()
def beam_search(
    model,
    src: torch.Tensor,
    arch: ArchConfig | None = None,
    beam: int = 4,
    length_penalty: float = 0.6,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 0,
    encoded: EncoderOut | None = None,
) -> list[Hypothesis]:
    """Best hypothesis per sentence. A sentence is done once `beam` hypotheses ended with EOS
    (an EOS among the top `beam` candidates ends a hypothesis); at the length limit only EOS
    is allowed, before `min_len` tokens EOS is not. `encoded`: `model.encode(src, arch)`
    when the caller already has it (the latency protocol times the encoder apart)."""
    args = model.args
    batch, device = src.shape[0], src.device
    per_sentence = max_lengths(src, args.pad_id, max_len_a, max_len_b)  # (B,)
    limits = per_sentence.repeat_interleave(beam)  # (B * beam,)
    enc = model.encode(src, arch) if encoded is None else encoded
    engine = getattr(model, "compiled", None)  # a CPU serving layout's compiled decoder (model/compiled.py)
    if engine is not None and engine.usable(beam, int(per_sentence.max())):
        model._own(arch)
        found = engine.beam_search(enc, per_sentence.tolist(), beam, length_penalty, min_len)
        return [Hypothesis(tokens, score) for tokens, score in found]
    enc = enc.repeat_interleave(beam)
    last = torch.full((batch * beam, 1), args.bos_id, dtype=torch.long, device=device)  # each row's newest token
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = -torch.inf  # all beams start identical: keep one alive at step 0
    # back-pointers instead of growing token tensors: after step i, row r holds token
    # chosen[i][r] and continues row came_from[i][r] of step i - 1
    chosen: list[torch.Tensor] = []
    came_from: list[torch.Tensor] = []
    ended: list[tuple[int, int, int, float]] = []  # (sentence, step, row, score)
    n_ended = [0] * batch
    base = (torch.arange(batch, device=device) * beam)[:, None]  # (B, 1)
    never = torch.tensor([args.pad_id, args.bos_id], device=device)
    first_limit = int(limits.min())
    cache = None
    for step in range(int(limits.max()) + 1):
        logits, cache = model.decode(last, enc, arch, cache)
        lprobs = F.log_softmax(logits[:, -1].float(), dim=-1).index_fill_(1, never, -torch.inf)  # (B * beam, V)
        if step < min_len:
            lprobs[:, args.eos_id] = -torch.inf
        if step >= first_limit:  # at the length limit only EOS, at its own log-probability
            at_limit = step >= limits
            eos_lprobs = lprobs[at_limit, args.eos_id]
            lprobs[at_limit] = -torch.inf
            lprobs[at_limit, args.eos_id] = eos_lprobs
        vocab = lprobs.shape[-1]
        cand = lprobs.add_(scores.view(-1, 1)).view(batch, beam * vocab)  # in place: no (B * beam, V) allocation
        top_scores, top_idx = cand.topk(2 * beam, dim=1)  # (B, 2 * beam), best first
        top_beam, top_tok = top_idx // vocab, top_idx % vocab
        is_eos = (top_tok == args.eos_id) & (top_scores > -torch.inf)

        # hypotheses ending here: EOS among the first `beam` candidates of unfinished sentences
        if step >= min_len:
            hits = is_eos[:, :beam].nonzero().tolist()
            if hits:
                row_scores, rows = top_scores[:, :beam].tolist(), (base + top_beam[:, :beam]).tolist()
                for b, j in hits:
                    if n_ended[b] < beam:
                        n_ended[b] += 1
                        ended.append((b, step, rows[b][j], row_scores[b][j] / (step + 1) ** length_penalty))
                if min(n_ended) >= beam:
                    break

        # continue with the best `beam` candidates that are not EOS (candidates come sorted)
        scores, keep = top_scores.masked_fill(is_eos, -torch.inf).topk(beam, dim=1)  # (B, beam)
        origin = (base + top_beam.gather(1, keep)).view(-1)  # (B * beam,) rows to continue from
        last = top_tok.gather(1, keep).view(-1, 1)
        chosen.append(last.view(-1))
        came_from.append(origin)
        cache = cache.reorder(origin, same_sources=True)
    return _best(ended, chosen, came_from, batch)


def _best(ended: list[tuple[int, int, int, float]], chosen, came_from, batch: int) -> list[Hypothesis]:
    """The best ended hypothesis per sentence, its tokens read back along the back-pointers."""
    best: dict[int, tuple[int, int, float]] = {}
    for b, step, row, score in ended:
        if b not in best or score > best[b][2]:
            best[b] = (step, row, score)
    tokens = torch.stack(chosen).tolist() if chosen else []  # (steps, B * beam)
    parents = torch.stack(came_from).tolist() if came_from else []
    out = []
    for b in range(batch):
        step, row, score = best[b]
        prefix = []
        for i in range(step - 1, -1, -1):  # the tokens before the EOS at `step`
            prefix.append(tokens[i][row])
            row = parents[i][row]
        out.append(Hypothesis(prefix[::-1], score))
    return out
