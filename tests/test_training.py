"""The trainer through its two stages: learnability, exact resume after SIGKILL, data
parallelism with torchrun, checkpoints and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env

from automoe.model.counting import count
from automoe.model.subnet import SubTransformer
from automoe.model.supernet import SuperTransformer
from automoe.space import load_space
from automoe.stages import prepare_data, retrain, train_supernet
from automoe.train import checkpoint
from automoe.train.trainer import read_valid_history

TINY = str(Path(__file__).parent / "data" / "tiny_space.yaml")
TINY_ARCH = """\
encoder_embed_dim: 64
decoder_embed_dim: 64
encoder_ffn: [[128, 64], [64]]
decoder_ffn: [[128, 64, 64]]
encoder_self_heads: [4, 2]
decoder_self_heads: [4]
decoder_ende_heads: [2]
decoder_ende_span: [2]
top_k: 1
"""


def sets(section: str, **values) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{section}.{key.replace('__', '.')}={value}"]
    return out


def tiny_train(section: str, updates: int, **extra) -> list[str]:
    base = {
        "train__max_updates": updates,
        "train__max_tokens": 1024,
        "train__tokens_per_update": 2048,
        "train__warmup_updates": 5,
        "train__valid_interval": 5,
        "train__valid_max_sentences": 100,
        "train__log_interval": 5,
        "train__lr": 0.003,
        "space": TINY,
    }
    if section == "retrain":
        base["init_from_supernet"] = "false"  # from scratch unless a test says otherwise
    return sets(section, **(base | extra))


@pytest.fixture(scope="module")
def prepared(multi30k, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "prepared"
    args = [
        "--out",
        str(out),
        *sets("prepare_data", max_train_pairs=2000, vocab_size=500, max_len=64, mirror=str(multi30k)),
    ]
    assert prepare_data.main(args) == 0
    return out


def cli(*args: str, **env: str) -> list[str]:
    return [sys.executable, "-m", "automoe.cli", *args]


def test_supernet_validation_loss_falls_on_multi30k(prepared, tmp_path, capsys):
    out = tmp_path / "supernet"
    assert train_supernet.main(["--data", str(prepared), "--out", str(out), *tiny_train("train_supernet", 40)]) == 0
    valid = read_valid_history(out / "valid_curves.csv")
    assert [r["update"] for r in valid] == [5, 10, 15, 20, 25, 30, 35, 40]
    for name in ("largest", "smallest", "random"):
        assert valid[-1][name] < valid[0][name] - 0.5
    net, vocab = SuperTransformer.load(out / "supernet.pt")
    assert vocab["vocab_size"] == 500 and net.space.name == "tiny"
    assert (out / "training_curve.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "train_supernet: done (best_update=" in err
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["micro_batches_per_update"] >= 2  # 2,048 target tokens from micro-batches of <= 1,024 padded
    assert metrics["target_tokens_seen"] >= 40 * 2048


def test_retrain_learns_a_synthetic_copy_task(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(12)]
    folder = tmp_path / "copy"
    folder.mkdir()
    for split, n in (("train", 3000), ("valid", 100), ("test", 100)):
        lines = [" ".join(rng.choice(words, int(rng.integers(2, 7)))) for _ in range(n)]
        (folder / f"{split}.en").write_text("\n".join(lines) + "\n")
        (folder / f"{split}.de").write_text("\n".join(lines) + "\n")
    prep = tmp_path / "prep"
    assert (
        prepare_data.main(
            [
                "--out",
                str(prep),
                *sets(
                    "prepare_data",
                    source="paths",
                    vocab_size=40,
                    paths__train=f"{folder}/train.{{lang}}",
                    paths__valid=f"{folder}/valid.{{lang}}",
                    paths__test=f"{folder}/test.{{lang}}",
                ),
            ]
        )
        == 0
    )
    (tmp_path / "arch.yaml").write_text(TINY_ARCH)
    out = tmp_path / "model"
    args = [
        "--data",
        str(prep),
        "--arch",
        str(tmp_path / "arch.yaml"),
        "--out",
        str(out),
        *tiny_train(
            "retrain",
            400,
            train__dropout=0.0,
            train__attention_dropout=0.1,  # the recipe this bound was measured with, whatever params.yaml says
            train__label_smoothing=0.0,
            train__valid_interval=100,
            train__max_tokens=512,
            train__tokens_per_update=512,
            train__warmup_updates=20,
        ),
    ]
    assert retrain.main(args) == 0, capsys.readouterr().err
    valid = read_valid_history(out / "valid_curves.csv")
    assert valid[-1]["model"] < 0.1 and valid[0]["model"] > 1.0  # copying, not a unigram model
    model, vocab = SubTransformer.load(out / "model.pt")
    space = load_space(TINY)
    compact = count(model.arch, vocab["vocab_size"], space.qkv_dim, pre_norm=model.args.pre_norm).params_total
    assert sum(p.numel() for p in model.parameters()) == compact


def test_a_fine_tuned_model_reports_expert_loads_under_the_layers_they_belong_to(prepared, tmp_path):
    """A fine-tuned model carries its own arch (no arch is passed per update): its MoE layers'
    loads are named by side and index (TINY_ARCH: encoder layer 0 and decoder layer 0)."""
    (tmp_path / "arch.yaml").write_text(TINY_ARCH)
    overrides = [a for a in tiny_train("retrain", 2, train__valid_interval=2, train__log_interval=1) if a != "--set"]
    cfg = retrain.load_config(ROOT / "params.yaml", overrides)
    seen: dict[str, float] = {}
    inputs = retrain.RetrainInputs(prepared, str(tmp_path / "arch.yaml"))
    retrain.run(cfg, inputs, tmp_path / "out", on_metrics=lambda metrics, step: seen.update(metrics))
    loads = sorted(k for k in seen if k.startswith("expert_load_max/"))
    assert loads == ["expert_load_max/dec0", "expert_load_max/enc0"]


def run_to_end(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


def test_sigkill_then_resume_gives_the_uninterrupted_result(prepared, tmp_path):
    env = subprocess_env(AUTOMOE_TRACKING="0")
    common = ["train_supernet", "--data", str(prepared), *tiny_train("train_supernet", 30, train__dropout=0.3)]
    run_to_end(common + ["--out", str(tmp_path / "a")], env)

    b = tmp_path / "b"
    proc = subprocess.Popen(
        cli(*common, "--out", str(b)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (b / "checkpoints" / "checkpoint_0000015.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "supernet.pt").exists()
    resumed = run_to_end(common + ["--out", str(b)], env)
    assert "resuming at update 15" in resumed.stderr or "resuming at update 20" in resumed.stderr
    assert_same_weights(tmp_path / "a" / "supernet.pt", b / "supernet.pt")
    assert (tmp_path / "a" / "curves.csv").read_text() == (b / "curves.csv").read_text()


def test_corrupt_checkpoint_falls_back_to_an_older_one(prepared, tmp_path):
    env = subprocess_env(AUTOMOE_TRACKING="0")
    common = [
        "train_supernet",
        "--data",
        str(prepared),
        "--out",
        str(tmp_path / "run"),
        *tiny_train("train_supernet", 15, train__dropout=0.0),
    ]
    run_to_end(common, env)
    reference = tmp_path / "reference.pt"
    reference.write_bytes((tmp_path / "run" / "supernet.pt").read_bytes())
    newest = checkpoint.listing(tmp_path / "run" / "checkpoints")[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # torn file
    proc = run_to_end(common, env)
    assert f"{newest.name}: corrupt checkpoint" in proc.stderr and "resuming at update 10" in proc.stderr
    assert_same_weights(reference, tmp_path / "run" / "supernet.pt")


def test_torchrun_two_workers_match_one_process(prepared, tmp_path):
    env = subprocess_env(AUTOMOE_TRACKING="0", OMP_NUM_THREADS="1")
    args = [
        "train_supernet",
        "--data",
        str(prepared),
        *tiny_train("train_supernet", 8, train__dropout=0.0, train__attention_dropout=0.0, train__threads=1),
    ]
    # two workers take two micro-batches per round: one process does with update_freq 2
    run_to_end(args + sets("train_supernet", train__update_freq=2) + ["--out", str(tmp_path / "one")], env)
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "automoe.cli",
    ]
    proc = subprocess.run(
        torchrun + args[0:] + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = np.loadtxt(tmp_path / "one" / "curves.csv", delimiter=",", skiprows=1)
    two = np.loadtxt(tmp_path / "two" / "curves.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(two[:, 1], one[:, 1], rtol=1e-4)  # loss per update
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert metrics[0]["micro_batches_per_update"] == metrics[1]["micro_batches_per_update"]
    assert metrics[1]["micro_batches_per_update"] % 2 == 0  # whole rounds: each worker as many as the other
    # validation of the final weights agrees too (Adam magnifies rounding in near-zero gradients,
    # so weights are compared through what they compute)
    valid_one = read_valid_history(tmp_path / "one" / "valid_curves.csv")
    valid_two = read_valid_history(tmp_path / "two" / "valid_curves.csv")
    for a, b in zip(valid_one, valid_two, strict=True):
        assert a == pytest.approx(b, rel=1e-3)


def test_sampled_archs_depend_only_on_seed_and_update():
    space = load_space(TINY)
    cfg = train_supernet.TrainSupernetConfig(space=TINY)
    first = [train_supernet.update_archs(space, cfg, u) for u in range(20)]
    assert first == [train_supernet.update_archs(space, cfg, u) for u in range(20)]
    assert len({a[0] for a in first}) > 10
    sandwich = train_supernet.TrainSupernetConfig(space=TINY, sampling="sandwich")
    largest, smallest, sampled = train_supernet.update_archs(space, sandwich, 3)
    assert (largest, smallest, sampled) == (space.largest(), space.smallest(), first[3][0])


def test_budget_aware_sampling_trains_only_what_the_search_can_choose():
    space = load_space("small")
    limit = 0.5 * count(space.largest_dense(), 1, space.qkv_dim).gflops_no_embed
    uniform = train_supernet.TrainSupernetConfig(space="small")
    cfg = train_supernet.TrainSupernetConfig(space="small", sample_max_gflops=0.5)
    free = [train_supernet.update_archs(space, uniform, u)[0] for u in range(200)]
    assert any(count(a, 1, space.qkv_dim).gflops_no_embed > limit for a in free)  # the limit binds
    within = [train_supernet.update_archs(space, cfg, u)[0] for u in range(200)]
    costs = [count(a, 1, space.qkv_dim).gflops_no_embed for a in within]
    assert max(costs) <= limit and len(set(within)) > 150  # under the limit, and still varied
    assert within == [train_supernet.update_archs(space, cfg, u)[0] for u in range(200)]  # seeded
    with pytest.raises(Exception, match="sample_max_gflops"):
        train_supernet.load_config({"train_supernet": {"sample_max_gflops": -1}})


def test_checkpoint_averaging(tmp_path):
    for update, value in ((1, 1.0), (2, 2.0), (3, 6.0)):
        checkpoint.save(tmp_path, update, {"update": update, "model": {"w": torch.full((2,), value)}}, keep_last=2)
    assert [p.name for p in checkpoint.listing(tmp_path)] == ["checkpoint_0000003.pt", "checkpoint_0000002.pt"]
    torch.testing.assert_close(checkpoint.average(checkpoint.listing(tmp_path))["w"], torch.full((2,), 4.0))


def test_mismatched_vocab_is_refused(prepared, multi30k, tmp_path, capsys):
    net = tmp_path / "supernet"
    post_ln = tiny_train("train_supernet", 5, train__norm="post")
    assert train_supernet.main(["--data", str(prepared), "--out", str(net), *post_ln]) == 0
    other = tmp_path / "other"
    assert (
        prepare_data.main(
            ["--out", str(other), *sets("prepare_data", max_train_pairs=500, vocab_size=300, mirror=str(multi30k))]
        )
        == 0
    )
    (tmp_path / "arch.yaml").write_text(TINY_ARCH)
    capsys.readouterr()
    rc = retrain.main(
        [
            "--data",
            str(other),
            "--arch",
            str(tmp_path / "arch.yaml"),
            "--supernet",
            str(net / "supernet.pt"),
            "--out",
            str(tmp_path / "r"),
            *tiny_train("retrain", 5, init_from_supernet="true", train__norm="post"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "supernet.pt: its vocabulary" in err and "differs from the prepared data" in err
    assert not (tmp_path / "r").exists()

    # inherited weights keep the supernet's norm placement: another one is refused
    common = ["--data", str(prepared), "--arch", str(tmp_path / "arch.yaml"), "--supernet", str(net / "supernet.pt")]
    rc = retrain.main(
        [*common, "--out", str(tmp_path / "r"), *tiny_train("retrain", 5, init_from_supernet="true", train__norm="pre")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "retrain.train.norm: 'pre', but the supernet" in err and "is post-LN" in err
    # the policy is recorded with the model
    import json

    assert (
        retrain.main(
            [
                *common,
                "--out",
                str(tmp_path / "ok"),
                *tiny_train(
                    "retrain",
                    2,
                    init_from_supernet="true",
                    train__norm="post",
                    train__dropout=0.25,
                    train__attention_dropout=0.05,
                ),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["init_from_supernet"] == 1.0
    # the supernet's weights, the fine-tuning's regularisation (the supernet trained without dropout)
    tuned, _ = SubTransformer.load(tmp_path / "ok" / "model.pt")
    supernet, _ = SuperTransformer.load(net / "supernet.pt")
    assert (supernet.args.dropout, supernet.args.attention_dropout) == (0.0, 0.0)
    assert (tuned.args.dropout, tuned.args.attention_dropout) == (0.25, 0.05)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "{tmp}/nowhere"], "nowhere: not a prepared-data folder"),
        (["--set", "retrain.train.lr=0"], "retrain.train: lr must be in (0, 1], got 0.0"),
        (["--set", "retrain.train.max_updates=0"], "retrain.train: max_updates must be >= 1"),
        (["--set", "retrain.train.schedul=cosine"], "retrain.train.schedul: unknown key"),
        (["--arch", "{tmp}/bad_arch.yaml"], "arch.encoder_embed_dim: 100 is not in the space's choices"),
        (["--arch", "{tmp}/missing.yaml"], "missing.yaml: file not found"),
        (["--set", "retrain.init_from_supernet=true"], "init_from_supernet is true but no --supernet"),
    ],
)
def test_retrain_bad_input(prepared, tmp_path, capsys, args, needle):
    (tmp_path / "arch.yaml").write_text(TINY_ARCH)
    (tmp_path / "bad_arch.yaml").write_text(TINY_ARCH.replace("encoder_embed_dim: 64", "encoder_embed_dim: 100"))
    base = {"--data": str(prepared), "--arch": str(tmp_path / "arch.yaml"), "--out": str(tmp_path / "out")}
    given = [a.format(tmp=tmp_path) for a in args]
    for flag in list(base):
        if flag in given:
            base.pop(flag)
    argv = [x for kv in base.items() for x in kv] + tiny_train("retrain", 5) + given
    assert retrain.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_smoothed_loss_equals_torch_label_smoothing():
    from automoe.train.trainer import smoothed_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    target = torch.randint(1, 11, (3, 5), generator=g)
    target[0, 3:] = 0  # padding
    loss, nll = smoothed_nll(logits, target, 0.1, pad_id=0)
    want = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=0, label_smoothing=0.1, reduction="sum"
    )
    want_nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum"
    )
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(nll, want_nll)


def test_batch_units_and_tokens_seen():
    """max_tokens caps a micro-batch's padded size (rows x longest side); tokens_per_update
    counts real target tokens, 0 meaning one micro-batch per update."""
    from automoe.data.dataset import TokenBatchSampler
    from automoe.train.trainer import TrainConfig, batch_stream

    rng = np.random.default_rng(0)
    src, tgt = rng.integers(3, 30, 500), rng.integers(3, 30, 500)
    sampler = TokenBatchSampler(src, tgt, 256, seed=0)
    for b in sampler.plan(0):
        assert len(b) * max(src[b].max(), tgt[b].max()) <= 256  # padded, either side
    one = batch_stream(TokenBatchSampler(src, tgt, 256, seed=0), tgt, 0)
    assert all(len(next(one)) == 1 for _ in range(20))
    many = batch_stream(TokenBatchSampler(src, tgt, 256, seed=0), tgt, 600)
    for _ in range(20):
        update = next(many)
        tokens = [int(tgt[b].sum()) for b in update]
        assert sum(tokens) >= 600 and sum(tokens[:-1]) < 600  # just enough micro-batches
    with pytest.raises(ValueError, match="tokens_per_update"):
        TrainConfig(tokens_per_update=-1)
    with pytest.raises(ValueError, match="update_freq"):
        TrainConfig(update_freq=0)


def test_every_worker_gets_micro_batches_of_its_own():
    """N workers take N x update_freq micro-batches per update (fairseq's semantics): with
    the defaults 2 workers put twice one worker's tokens into an update, and a token target
    adds whole rounds, so no worker ever waits on a zero-weighted dummy."""
    from automoe.data.dataset import TokenBatchSampler
    from automoe.train.trainer import batch_stream

    rng = np.random.default_rng(1)
    src, tgt = rng.integers(3, 30, 2000), rng.integers(3, 30, 2000)

    def updates(tokens_per_update, per_round, n=30):
        stream = batch_stream(TokenBatchSampler(src, tgt, 256, seed=0), tgt, tokens_per_update, per_round)
        return [next(stream) for _ in range(n)]

    one, two = updates(0, 1), updates(0, 2)
    assert all(len(u) == 1 for u in one) and all(len(u) == 2 for u in two)
    ratio = sum(int(tgt[b].sum()) for u in two for b in u) / sum(int(tgt[b].sum()) for u in one for b in u)
    assert 1.8 < ratio < 2.2  # twice the target tokens per update
    for update in updates(700, 2):
        tokens = [int(tgt[b].sum()) for b in update]
        assert len(update) % 2 == 0 and sum(tokens) >= 700 and sum(tokens[:-2]) < 700  # whole rounds, just enough


def test_precision_setting_picks_the_autocast_dtype(monkeypatch):
    from automoe.train import trainer

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trainer.autocast_dtype("fp32", cuda) is None
    assert trainer.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert trainer.autocast_dtype("fp16", cpu) is torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # Ampere: native bf16
    assert trainer.autocast_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # Turing: fp16, scaled
    assert trainer.autocast_dtype("auto", cuda) is torch.float16
    monkeypatch.setattr(trainer, "_cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower: fp32
    assert trainer.autocast_dtype("auto", cpu) is None
    monkeypatch.setattr(trainer, "_cpu_has_native_bf16", lambda: True)
    assert trainer.autocast_dtype("auto", cpu) is torch.bfloat16


def test_half_precision_autocast_learns_like_fp32(prepared, tmp_path):
    """bf16 autocast (the default where bf16 is native) and fp16 autocast with its gradient
    scaler (the default on pre-Ampere GPUs; CPU autocast runs the same code) train the
    supernet as fp32 does: the same validation curve to within a small margin; metrics say
    which ran and an fp16 checkpoint keeps the scaler's state for a resume."""
    import json

    curves = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        args = ["--data", str(prepared), "--out", str(out), *tiny_train("train_supernet", 20)]
        assert train_supernet.main([*args, "--set", f"train_supernet.train.precision={precision}"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["bf16_autocast"] == float(precision == "bf16")
        assert metrics["fp16_autocast"] == float(precision == "fp16")
        curves[precision] = read_valid_history(out / "valid_curves.csv")
        scaler = checkpoint.load_latest(out / "checkpoints")[0]["scaler"]
        assert bool(scaler) == (precision == "fp16") and (precision != "fp16" or scaler["scale"] > 1)
    first, last = curves["fp32"][0]["mean"], curves["fp32"][-1]["mean"]
    assert last < first - 0.5  # it learns ...
    for precision in ("bf16", "fp16"):
        for a, b in zip(curves["fp32"], curves[precision], strict=True):
            assert abs(a["mean"] - b["mean"]) < 0.1 * (first - last)  # ... and half precision follows its curve


def _python_loop_plan(lens, max_tokens, seed, epoch, shuffle):
    """The batch plan as a Python step per example (the sampler's former code): the oracle."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lens)) if shuffle else np.arange(len(lens))
    order = order[np.argsort(lens[order], kind="stable")]
    batches, start, longest = [], 0, 0
    for i, idx in enumerate(order):
        longest_if_added = max(longest, int(lens[idx]))
        if (i - start + 1) * longest_if_added > max_tokens:
            batches.append(order[start:i])
            start, longest_if_added = i, int(lens[idx])
        longest = longest_if_added
    batches.append(order[start:])
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


@pytest.mark.parametrize("max_tokens", [40, 256, 1000, 4096])
def test_vectorised_batch_plan_equals_the_per_example_loop(max_tokens):
    from automoe.data.dataset import TokenBatchSampler

    rng = np.random.default_rng(max_tokens)
    src, tgt = rng.integers(1, 40, 5000), rng.integers(1, 40, 5000)
    src[:50] = 40  # a run of the longest length
    for shuffle in (True, False):
        sampler = TokenBatchSampler(src, tgt, max_tokens, seed=7, shuffle=shuffle)
        for epoch in (0, 3):
            want = _python_loop_plan(np.maximum(src, tgt), max_tokens, 7, epoch, shuffle)
            got = sampler.plan(epoch)
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)


def _sync_worker(rank, port, out):
    import torch.distributed as dist

    from automoe.train.distributed import World

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(3)]
        params[rank].grad = torch.full((1000,), float(rank + 1))  # p0 used by rank 0, p1 by rank 1, p2 by none
        params[0].grad = params[0].grad if rank == 0 else torch.ones(1000) * 10  # p0 used by both
        shipped = World(rank, 2, torch.device("cpu")).sum_gradients(params, bucket_bytes=4000)
        torch.save({"shipped": shipped, "grads": [p.grad for p in params]}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gradient_sync_ships_only_what_some_worker_used(tmp_path):
    """Two gloo workers: a parameter one worker used is summed (the other sends zeros), one
    both used is summed, one nobody used is not shipped and keeps no gradient (Adam then
    leaves it alone, as one process would)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_sync_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["shipped"] == 2 * 1000 * 4  # two of three parameters, fp32
        torch.testing.assert_close(got["grads"][0], torch.full((1000,), 11.0))  # 1 + 10
        torch.testing.assert_close(got["grads"][1], torch.full((1000,), 2.0))  # rank 1's only
        assert got["grads"][2] is None
