"""One trainer for the supernet and for the retrained SubTransformer.

An update (fairseq's semantics): every worker takes `update_freq` micro-batches of at
most `max_tokens`, so N workers put N times the tokens of one into an update; more
rounds are cut while the update holds fewer than `tokens_per_update` target tokens. The
micro-batches are cut from one global stream and dealt round-robin, the update's
arch(s) run on each, gradients are summed over workers, clipped, stepped. The loss is
summed over tokens and divided by the update's global token count, so N workers compute
the update one process computes with `update_freq` N times as large.

The run owns the process RNG: dropout draws from torch's global generator, so its state
is seeded at the start and saved in / restored from every checkpoint; everything else
(arch sampling, data order) is derived from the seed and the update count.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from automoe.config import to_dict
from automoe.cpu import cpu_flags
from automoe.data.dataset import ParallelSplit, PreparedData, TokenBatchSampler
from automoe.errors import AutomoeError
from automoe.io import atomic_write_text
from automoe.model.counting import layer_name
from automoe.model.moe import load_balancing_loss, router_z_loss
from automoe.plots import figure
from automoe.space import ArchConfig
from automoe.train import checkpoint
from automoe.train.distributed import World
from automoe.train.schedule import learning_rate
from automoe.train.store import RunStore

MetricsHook = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainConfig:
    max_updates: int = 300
    max_tokens: int = 4096  # micro-batch cap: sentences x the longest source or target in it (padded)
    update_freq: int = 1  # micro-batches per worker per update (fairseq's --update-freq)
    tokens_per_update: int = 0  # at least this many real target tokens per update (more rounds of micro-batches)
    lr: float = 1e-3
    warmup_updates: int = 50
    schedule: Literal["cosine", "inverse_sqrt"] = "cosine"
    min_lr: float = 1e-5
    adam_betas: tuple[float, ...] = (0.9, 0.98)
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    norm: Literal["post", "pre"] = "post"  # layer norm placement (post: the paper's; pre: final norms added)
    dropout: float = 0.3
    attention_dropout: float = 0.1
    aux_loss_weight: float = 0.0  # Switch load balancing (0.01 when on)
    z_loss_weight: float = 0.0
    clip_norm: float = 0.0  # 0 = no clipping
    valid_interval: int = 100  # validate and checkpoint every N updates (and at the end)
    valid_max_sentences: int = 500  # a fixed validation subset
    keep_last: int = 3
    average_last: int = 1  # the final model averages the last N checkpoints (1 = the best one)
    log_interval: int = 10
    threads: int = 2
    seed: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast dtype for forward passes (weights, optimizer and loss stay fp32). auto: bf16 on
    # Ampere and later GPUs and on CPUs with native bf16 (avx512_bf16 / AMX), fp16 with a
    # gradient scaler on older GPUs, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        if self.tokens_per_update < 0:
            raise ValueError(
                f"tokens_per_update must be >= 0 (0: one micro-batch per update), got {self.tokens_per_update}"
            )
        positive = (
            "max_updates",
            "max_tokens",
            "update_freq",
            "valid_interval",
            "valid_max_sentences",
            "keep_last",
            "average_last",
            "log_interval",
            "threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if self.warmup_updates < 0:
            raise ValueError(f"warmup_updates must be >= 0, got {self.warmup_updates}")
        for name in ("label_smoothing", "dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.average_last > self.keep_last:
            raise ValueError(f"average_last ({self.average_last}) cannot exceed keep_last ({self.keep_last})")


@dataclass
class TrainResult:
    weights: dict[str, torch.Tensor]  # the final model: best checkpoint, or the average of the last N
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    valid_history: list[dict[str, float]] = field(default_factory=list)


def _cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (emulated bf16 is slower than fp32)."""
    return any(flag in cpu_flags() for flag in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run uses on `device` (None: plain fp32). auto: bf16 where it is
    native (GPUs of compute capability 8.0 and later, CPUs with bf16 instructions), fp16 on
    older GPUs (they emulate bf16), else fp32."""
    if precision in ("fp32", "bf16", "fp16"):
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else None


def batch_stream(
    sampler: TokenBatchSampler, tgt_lengths: np.ndarray, tokens_per_update: int, per_round: int = 1
) -> Iterator[list]:
    """Updates as lists of micro-batches (index arrays) from the endless sampler: rounds of
    `per_round` micro-batches (workers x update_freq), more rounds while the update holds
    fewer than `tokens_per_update` real target tokens. Every worker gets the same number."""
    it = iter(sampler)
    while True:
        batches, tokens = [], 0
        while not batches or tokens < tokens_per_update:
            for _ in range(per_round):
                b = next(it)
                batches.append(b)
                tokens += int(tgt_lengths[b].sum())
        yield batches


def auxiliary_loss(stats, aux_weight: float, z_weight: float) -> torch.Tensor:
    """Switch load balancing and router z-loss, summed over the MoE layers (Switch sums the
    per-layer losses; averaging would weaken them as MoE layers are added). Dense layers
    (stats None) add nothing."""
    total = torch.zeros(())
    if aux_weight or z_weight:
        for s in stats:
            if s is not None:
                total = total + aux_weight * load_balancing_loss(s, 1.0) + z_weight * router_z_loss(s)
    return total


def shift_right(tgt: torch.Tensor, bos_id: int, pad_id: int) -> torch.Tensor:
    """Decoder input: BOS, then the target without its last token; padding stays padding (B, T)."""
    out = tgt.roll(1, dims=1)
    out[:, 0] = bos_id
    return out.masked_fill(tgt == pad_id, pad_id)


def smoothed_nll(logits: torch.Tensor, target: torch.Tensor, eps: float, pad_id: int):
    """(label-smoothed loss, NLL), both summed over non-pad tokens, from one log-softmax:
    (1 - eps) * NLL + eps * mean over the vocabulary of -log p (torch's label_smoothing)."""
    lprobs = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)  # (B * T, V)
    target = target.flatten()
    keep = target != pad_id
    lprobs, target = lprobs[keep], target[keep]
    nll = -lprobs.gather(1, target[:, None]).sum()
    smooth = -lprobs.mean(dim=-1).sum()
    return (1.0 - eps) * nll + eps * smooth, nll


def train(
    cfg: TrainConfig,
    model: torch.nn.Module,
    data: PreparedData,
    work_dir: Path,
    *,
    world: World,
    archs_for_update: Callable[[int], list[ArchConfig | None]],
    valid_archs: dict[str, ArchConfig | None],
    identity: dict[str, Any],
    on_metrics: MetricsHook | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train (or resume) in `work_dir`; returns the final weights and summary metrics."""
    torch.set_num_threads(cfg.threads)
    store = RunStore.from_env(re.sub(r"[^A-Za-z0-9_.-]+", "_", desc), lambda: identity)
    ckpt_dir = work_dir / "checkpoints" if store is None else store.cache()  # a store: outside the output
    if store is not None:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download per node; its workers share the files
            fetched = store.pull(ckpt_dir)
            print(f"{desc}: run store {store.uri}: {len(fetched)} file(s) fetched", file=sys.stderr)
        world.barrier()
    train_split, valid_split = data.split("train"), data.split("valid")
    args = model.args
    model.to(world.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    sampler = TokenBatchSampler(train_split.src.lengths, train_split.tgt.lengths, cfg.max_tokens, cfg.seed)
    valid_batches = _valid_batches(valid_split, cfg)

    state = _resume(ckpt_dir, identity, world)
    if state is None:
        torch.manual_seed(cfg.seed + world.rank)
        start, history, valid_history, best = 0, [], [], None
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"][world.rank] if world.rank < len(state["rng"]) else state["rng"][0])
        cuda_rng = state.get("cuda_rng") or []
        if world.device.type == "cuda" and cuda_rng:  # dropout on a GPU draws from its own generator
            torch.cuda.set_rng_state(cuda_rng[world.rank] if world.rank < len(cuda_rng) else cuda_rng[0], world.device)
        start, history, valid_history, best = state["update"], state["history"], state["valid"], state["best"]
        if world.is_main:
            print(f"{desc}: resuming at update {start} from {state['path'].name}", file=sys.stderr)

    stream = batch_stream(sampler, train_split.tgt.lengths, cfg.tokens_per_update, world.size * cfg.update_freq)
    dtype = autocast_dtype(cfg.precision, world.device)
    amp = torch.autocast(world.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    # fp16: losses scaled so small gradients do not flush to zero; a no-op for other dtypes
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == torch.float16)
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    bar = tqdm(
        total=cfg.max_updates,
        initial=start,
        desc=desc,
        disable=not world.is_main,
        mininterval=1.0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t_last, tokens_since, speed = time.perf_counter(), 0, 0.0
    train_seconds, train_tokens = 0.0, 0  # this process's updates, validation and checkpoints left out
    for update in range(start, cfg.max_updates):
        t_update = time.perf_counter()
        batches = next(stream)
        n_tokens = sum(int(train_split.tgt.lengths[b].sum()) for b in batches)
        mine = batches[world.rank :: world.size]
        lr = learning_rate(
            update, peak=cfg.lr, warmup=cfg.warmup_updates, total=cfg.max_updates, kind=cfg.schedule, final=cfg.min_lr
        )
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        opt.zero_grad(set_to_none=True)
        sums = np.zeros(3)  # loss, nll, aux (token-weighted)
        loads: dict[str, float] = {}
        archs = archs_for_update(update)
        for arch in archs:
            decoder_layers = (arch if arch is not None else model.arch).decoder_layers  # a SubTransformer: its own
            for idx in mine:
                src, tgt = (t.to(world.device) for t in train_split.collate(idx))
                with amp:
                    logits, stats = model(src, shift_right(tgt, args.bos_id, args.pad_id), arch)
                loss, nll = smoothed_nll(logits, tgt, cfg.label_smoothing, args.pad_id)
                routed = [s for s in stats if s is not None]
                aux = auxiliary_loss(stats, cfg.aux_loss_weight, cfg.z_loss_weight).to(world.device)
                b_tokens = int((tgt != args.pad_id).sum())
                total = (loss + aux * b_tokens) / n_tokens
                scaler.scale(total).backward()
                sums += np.array([loss.item(), nll.item(), float(aux) * b_tokens])
                loads = _expert_load(stats, decoder_layers) if routed else loads
        synced = _sum_gradients(world, params)  # every worker then holds the same grads: one scaler decision
        scaler.unscale_(opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else math.inf))
        scaler.step(opt)  # fp16: skipped when a gradient overflowed (the scale then halves)
        scaler.update()

        loss_sum, nll_sum, aux_sum = world.sum(sums.tolist())
        train_seconds += time.perf_counter() - t_update
        train_tokens += n_tokens
        n_arch = len(archs)
        row = {
            "update": update + 1,
            "loss": loss_sum / n_tokens / n_arch,
            "nll": nll_sum / n_tokens / n_arch,
            "aux": aux_sum / n_tokens / n_arch,
            "lr": lr,
            "grad_norm": grad_norm,
            "target_tokens": float(n_tokens),
            "micro_batches": float(len(batches)),
            "sync_mb": synced / 2**20,
        }
        tokens_since += n_tokens
        done = update + 1
        if done % cfg.log_interval == 0 or done == cfg.max_updates:
            now = time.perf_counter()
            speed = row["tokens_per_s"] = tokens_since * n_arch / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            if on_metrics and world.is_main:
                on_metrics({k: v for k, v in row.items() if k != "update"} | loads, done)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}", refresh=False)
        bar.update(1)

        if done % cfg.valid_interval == 0 or done == cfg.max_updates:
            valid = validate(model, valid_split, valid_batches, valid_archs, world, amp)
            valid_history.append({"update": done, **valid})
            if on_metrics and world.is_main:
                on_metrics({f"valid_{k}": v for k, v in valid.items()}, done)
            is_best = best is None or valid["mean"] < best["mean"]
            if is_best:
                best = {"update": done, **valid}
            saved = _checkpoint(
                ckpt_dir, done, model, opt, sampler, history, valid_history, best, identity, cfg, world, is_best, scaler
            )
            if store is not None and saved is not None:  # rank 0: durable before training goes on
                store.push(saved)
                if is_best:
                    store.push(ckpt_dir / checkpoint.BEST)
                store.keep_only({p.name for p in checkpoint.listing(ckpt_dir)}, checkpoint.PATTERN)
    bar.close()

    weights = _final_weights(ckpt_dir, cfg) if world.is_main else {}  # only rank 0 writes the output
    summary = {
        "updates": float(history[-1]["update"]) if history else 0.0,  # run (resumed ones included), not asked for
        "final_train_loss": history[-1]["loss"] if history else math.nan,
        "best_valid_loss": best["mean"] if best else math.nan,
        "best_update": float(best["update"]) if best else math.nan,
        # what the run actually saw (every arch of an update sees the same tokens)
        "target_tokens_seen": float(sum(r.get("target_tokens", 0.0) for r in history)),
        "micro_batches_per_update": float(np.mean([r.get("micro_batches", 0.0) for r in history])) if history else 0.0,
        "bf16_autocast": float(dtype == torch.bfloat16),
        "fp16_autocast": float(dtype == torch.float16),
        # target tokens per second of training (all workers together; validation left out)
        "train_tokens_per_s": train_tokens / train_seconds if train_seconds else 0.0,
    }
    return TrainResult(weights, summary, history, valid_history)


def _sum_gradients(world: World, params: list[torch.nn.Parameter]) -> int:
    """Sum gradients over workers (bytes shipped per worker); a parameter no worker used is
    not shipped and keeps grad None (Adam skips it, exactly as in a single process)."""
    return world.sum_gradients(params)


def _expert_load(stats, decoder_layers: int) -> dict[str, float]:
    """Share of assignments taken by the busiest expert, per MoE layer (1/n is perfectly
    balanced); `stats` has the encoder's layers, then the decoder's."""
    out = {}
    n_enc = len(stats) - decoder_layers
    for i, s in enumerate(stats):
        if s is not None:
            counts = s.tokens_per_expert.float()
            out[f"expert_load_max/{layer_name(i, n_enc)}"] = float(counts.max() / counts.sum().clamp(min=1))
    return out


def _valid_batches(split: ParallelSplit, cfg: TrainConfig) -> list[np.ndarray]:
    n = min(len(split), cfg.valid_max_sentences)
    lens = np.maximum(split.src.lengths[:n], split.tgt.lengths[:n])
    sampler = TokenBatchSampler(lens, lens, max(cfg.max_tokens, int(lens.max())), seed=0, shuffle=False)
    return sampler.plan(0)


@torch.no_grad()
def validate(
    model, split: ParallelSplit, batches, archs: dict[str, ArchConfig | None], world: World, amp
) -> dict[str, float]:
    """Per-token NLL on the fixed validation subset for each representative arch, and their mean."""
    model.eval()
    args = model.args
    out = {}
    for name, arch in archs.items():
        nll, tokens = 0.0, 0
        for b in batches[world.rank :: world.size]:
            src, tgt = (t.to(world.device) for t in split.collate(b))
            with amp:
                logits, _ = model(src, shift_right(tgt, args.bos_id, args.pad_id), arch)
            nll += float(
                F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=args.pad_id, reduction="sum")
            )
            tokens += int((tgt != args.pad_id).sum())
        nll, tokens = world.sum([nll, float(tokens)])
        out[name] = nll / tokens
    out["mean"] = float(np.mean([out[name] for name in archs]))
    return out


def _checkpoint(
    ckpt_dir, done, model, opt, sampler, history, valid_history, best, identity, cfg, world, is_best, scaler
) -> Path | None:
    """Rank 0 writes the checkpoint (every rank's RNG states in it); returns its path there."""
    cuda = world.device.type == "cuda"
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(world.device) if cuda else None)
    states = [mine]
    if world.size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world.size
        dist.all_gather_object(gathered, mine)
        states = gathered
    if world.is_main:
        payload = {
            "update": done,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": [cpu for cpu, _ in states],
            "cuda_rng": [gpu for _, gpu in states] if cuda else [],
            "scaler": scaler.state_dict(),  # empty unless fp16
            "history": history,
            "valid": valid_history,
            "best": best,
            "identity": identity,
            "config": to_dict(cfg),
        }
        path = checkpoint.save(ckpt_dir, done, payload, cfg.keep_last)
        if is_best:
            checkpoint.save_best(ckpt_dir, path)
    world.barrier()
    return path if world.is_main else None


def _resume(ckpt_dir: Path, identity: dict[str, Any], world: World) -> dict[str, Any] | None:
    found = checkpoint.load_latest(ckpt_dir)
    if found is None:
        return None
    payload, path = found
    if payload.get("identity") != identity:
        # checkpoints of another configuration, data set or arch: start over, keep nothing stale
        world.barrier()
        if world.is_main:
            print(f"note: {ckpt_dir} holds checkpoints of a different run; starting from scratch", file=sys.stderr)
            for old in checkpoint.listing(ckpt_dir) + [ckpt_dir / checkpoint.BEST]:
                old.unlink(missing_ok=True)
        world.barrier()
        return None
    return payload | {"path": path}


def _final_weights(ckpt_dir: Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Best checkpoint (lowest mean validation loss), or the average of the last N."""
    if cfg.average_last > 1:
        return checkpoint.average(checkpoint.listing(ckpt_dir)[: cfg.average_last])
    best = ckpt_dir / checkpoint.BEST
    if not best.is_file():
        raise AutomoeError(f"{ckpt_dir}: no best checkpoint was written")
    return checkpoint.read(best)["model"]


def write_curves(out_dir: Path, history: list[dict[str, float]], valid: list[dict[str, float]], title: str) -> None:
    """curves.csv (DVC plots) and training_curve.png."""
    keys = ["update", "loss", "nll", "lr", "grad_norm"]
    lines = [",".join(keys)] + [",".join(f"{row[k]:.6g}" for k in keys) for row in history]
    atomic_write_text(out_dir / "curves.csv", "\n".join(lines) + "\n")
    if valid:
        names = [k for k in valid[0] if k != "update"]
        rows = [",".join(["update", *names])] + [",".join(f"{r[k]:.6g}" for k in ["update", *names]) for r in valid]
        atomic_write_text(out_dir / "valid_curves.csv", "\n".join(rows) + "\n")
    with figure(out_dir / "training_curve.png", size=(7, 4)) as ax:
        ax.plot([r["update"] for r in history], [r["nll"] for r in history], label="train NLL", alpha=0.7)
        for name in [k for k in (valid[0] if valid else {}) if k != "update"]:
            ax.plot([r["update"] for r in valid], [r[name] for r in valid], marker="o", label=f"valid NLL ({name})")
        ax.set_xlabel("update")
        ax.set_ylabel("NLL per target token")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)


def read_valid_history(path: Path) -> list[dict[str, float]]:
    """Rows of valid_curves.csv as dicts."""
    lines = path.read_text().splitlines()
    names = lines[0].split(",")
    return [dict(zip(names, map(float, line.split(",")), strict=True)) for line in lines[1:]]
