"""Latency measurement, the predictor and the evolutionary search."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_SPACE, subprocess_env

from automoe.errors import AutomoeError, ConfigError, DataError
from automoe.latency import measure as m
from automoe.latency.predictor import FitConfig, fit, scores
from automoe.latency.table import LatencyTable, read_table
from automoe.search.evolution import EvolutionConfig, evolve, key, random_search
from automoe.search.pareto import pareto_front
from automoe.space import FEATURE_NAMES, ArchConfig, arch_features, load_space
from automoe.stages import measure_latency, prepare_data, search, train_supernet

SMALL = load_space("small")


def test_trimmed_mean_ignores_the_tails():
    assert m.trimmed_mean(list(range(1, 11))) == pytest.approx(5.5)
    noisy = [10.0] * 18 + [1000.0, 0.001]
    assert m.trimmed_mean(noisy) == pytest.approx(10.0)
    assert m.trimmed_mean([3.0, 5.0]) == 4.0  # too few runs to trim


def test_fingerprint_and_table_refuse_other_hardware(tmp_path):
    import torch

    hw = m.fingerprint(torch.device("cpu"))
    assert {"cpu_model", "cpu_cores", "threads", "torch", "device", "id"} <= set(hw)
    table = LatencyTable(tmp_path, hw)
    table.append(0, SMALL.smallest(), 1.0, 2.0)
    other = dict(hw, threads=hw["threads"] + 7, id="someotherid")
    with pytest.raises(DataError, match=f"threads: {hw['threads']} there, {hw['threads'] + 7} here"):
        LatencyTable(tmp_path, other)
    with open(tmp_path / "latency.csv", "a") as fh:
        fh.write('1,3.0,4.0,7.0,abc,"{torn')  # a kill in the middle of a row
    rows = LatencyTable(tmp_path, hw).rows()
    assert [r["arch_id"] for r in rows] == [0] and rows[0]["latency_ms"] == 3.0


@pytest.fixture(scope="module")
def tiny_supernet(multi30k, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    prep = root / "prepared"
    assert (
        prepare_data.main(
            [
                "--out",
                str(prep),
                "--set",
                "prepare_data.max_train_pairs=500",
                "--set",
                "prepare_data.vocab_size=300",
                "--set",
                f"prepare_data.mirror={multi30k}",
            ]
        )
        == 0
    )
    sets = [
        f"train_supernet.space={TINY_SPACE}",
        "train_supernet.train.max_updates=4",
        "train_supernet.train.valid_interval=2",
        "train_supernet.train.valid_max_sentences=30",
    ]
    assert (
        train_supernet.main(
            ["--data", str(prep), "--out", str(root / "supernet"), *[a for s in sets for a in ("--set", s)]]
        )
        == 0
    )
    return prep, root / "supernet" / "supernet.pt"


def test_measure_latency_resumes_after_sigkill_without_duplicates(tiny_supernet, tmp_path):
    prep, net = tiny_supernet
    out = tmp_path / "latency"
    args = [
        sys.executable,
        "-m",
        "automoe.cli",
        "measure_latency",
        "--data",
        str(prep),
        "--supernet",
        str(net),
        "--out",
        str(out),
        "--set",
        "measure_latency.n_archs=14",
        "--set",
        "measure_latency.repeats=3",
        "--set",
        "measure_latency.warmup=1",
        "--set",
        "measure_latency.threads=1",
    ]
    env = subprocess_env(AUTOMOE_TRACKING="0")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    table = out / "latency.csv"
    while not (table.is_file() and table.read_text().count("\n") >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_rows = table.read_text().count("\n") - 1
    assert 4 <= killed_rows < 17
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = LatencyTable(out, json.loads((out / "hardware.json").read_text())).rows()
    assert sorted(r["arch_id"] for r in rows) == list(range(17))
    space = load_space(TINY_SPACE)
    expected = measure_latency.archs_to_measure(space, measure_latency.MeasureLatencyConfig(n_archs=14))
    assert expected[-1] == space.largest_dense()  # the baseline of relative budgets is measured
    assert {r["arch_id"]: r["arch"] for r in rows} == {i: key(a) for i, a in enumerate(expected)}
    assert all(r["latency_ms"] > 0 for r in rows)


def test_measure_latency_measures_the_serving_precision_and_keeps_tables_apart(tiny_supernet, tmp_path, capsys):
    prep, net = tiny_supernet
    quick = ["n_archs=1", "repeats=1", "warmup=0", "sources=1", "threads=1"]
    argv = ["--data", str(prep), "--supernet", str(net), *[a for s in quick for a in ("--set", f"measure_latency.{s}")]]
    assert (
        measure_latency.main([*argv, "--out", str(tmp_path / "int8"), "--set", "measure_latency.precision=int8"]) == 0
    )
    hw = json.loads((tmp_path / "int8" / "hardware.json").read_text())
    assert hw["precision"] == "int8" and hw["id"] != m.fingerprint(torch.device("cpu"))["id"]
    # an fp32 rerun into the int8 table is refused: its rows would mix two serving layouts
    assert measure_latency.main([*argv, "--out", str(tmp_path / "int8")]) == 2
    assert "precision: int8 there, fp32 here" in capsys.readouterr().err  # what differs, named
    gpu = ["--set", "measure_latency.precision=int8", "--set", "measure_latency.device=cuda"]
    assert measure_latency.main([*argv, "--out", str(tmp_path / "gpu"), *gpu]) == 2
    assert "int8 serving runs on the CPU only" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_measure_latency_scales_every_chunk_to_one_reference(tiny_supernet, tmp_path, monkeypatch):
    """A machine whose speed drifts between chunks (here 1x, 1.5x, 2x, ...) moves no row
    against another: each chunk is timed beside the dense reference and scaled to its first
    timing; a resumed run scales to the same reference (reference.json)."""
    from automoe.latency.measure import Latency

    calls = []

    def drifting(models, *args, **kwargs):
        calls.append(len(models))
        drift = 1.0 + 0.5 * (len(calls) - 1)
        return [Latency(1.0 * drift, synthetic_latency(x.arch) * drift) for x in models]

    monkeypatch.setattr(measure_latency.m, "measure_many", drifting)
    prep, net = tiny_supernet
    out = tmp_path / "lat"
    sets = ["n_archs=9", "chunk=4", "threads=1"]
    argv = ["--data", str(prep), "--supernet", str(net), "--out", str(out)]
    assert measure_latency.main([*argv, *[a for s in sets for a in ("--set", f"measure_latency.{s}")]]) == 0
    assert calls == [5, 5, 5]  # 12 archs in chunks of 4, each beside the reference
    rows, _ = read_table(out)
    archs = [ArchConfig.from_dict(json.loads(r["arch"])) for r in rows]
    truth = np.array([1.0 + synthetic_latency(a) for a in archs])
    np.testing.assert_allclose([r["latency_ms"] for r in rows], truth, rtol=1e-4)  # as the first chunk timed
    reference = json.loads((out / "reference.json").read_text())["latency_ms"]
    space = load_space(TINY_SPACE)
    assert reference == pytest.approx(1.0 + synthetic_latency(space.largest_dense()), rel=1e-6)


def test_a_resumed_table_keeps_no_row_of_an_arch_it_no_longer_measures(tiny_supernet, tmp_path, monkeypatch, capsys):
    """The table persists across runs (dvc: persist), so a rerun with another arch list
    (here another seed; likewise a changed sampler) used to keep every row whose id it had,
    whatever arch that id now stood for. Now rows are kept only where the arch matches:
    the table equals a fresh run's, and only what changed is measured again."""
    from automoe.latency.measure import Latency

    timed = []

    def fake(models, *args, **kwargs):
        timed.extend(key(x.arch) for x in models[1:])
        return [Latency(1.0, synthetic_latency(x.arch)) for x in models]

    monkeypatch.setattr(measure_latency.m, "measure_many", fake)
    prep, net = tiny_supernet
    out = tmp_path / "lat"

    def measure(seed: int, folder) -> list[dict]:
        sets = [f"seed={seed}", "n_archs=6", "threads=1"]
        argv = ["--data", str(prep), "--supernet", str(net), "--out", str(folder)]
        assert measure_latency.main([*argv, *[a for s in sets for a in ("--set", f"measure_latency.{s}")]]) == 0
        return read_table(folder)[0]

    measure(1, out)
    timed.clear()
    rows = measure(2, out)
    assert "rows of archs this configuration no longer measures were dropped" in capsys.readouterr().err
    space = load_space(TINY_SPACE)
    before, expected = (
        measure_latency.archs_to_measure(space, measure_latency.MeasureLatencyConfig(seed=seed, n_archs=6))
        for seed in (1, 2)
    )
    assert sorted((r["arch_id"], r["arch"]) for r in rows) == [(i, key(a)) for i, a in enumerate(expected)]
    changed = [key(b) for a, b in zip(before, expected, strict=True) if a != b]
    assert len(changed) >= 4 and sorted(timed) == sorted(changed)  # the extremes and the reference were kept
    fresh = measure(2, tmp_path / "fresh")
    assert sorted((r["arch_id"], r["arch"]) for r in rows) == sorted((r["arch_id"], r["arch"]) for r in fresh)


def test_a_table_measured_with_another_supernet_or_protocol_is_measured_afresh(
    tiny_supernet, tmp_path, monkeypatch, capsys
):
    """dvc keeps the folder across runs, and rows used to be kept by arch alone: a rerun
    after the supernet was retrained (its routers set the MoE archs' latency) or with
    another timing protocol (here another beam) measured nothing and served the old rows.
    Now such a rerun measures every row and the reference again; the same supernet at
    another path, or a resume under the same protocol, keeps them."""
    from automoe.latency.measure import Latency
    from automoe.model.supernet import SuperTransformer

    timed = []

    def fake(models, sources, beam, *args, **kwargs):
        timed.append(len(models) - 1)
        return [Latency(1.0, synthetic_latency(x.arch) * beam) for x in models]

    monkeypatch.setattr(measure_latency.m, "measure_many", fake)
    prep, net = tiny_supernet
    out = tmp_path / "lat"

    def measure(supernet, *sets) -> list[float]:
        timed.clear()
        sets = ["n_archs=6", "threads=1", *sets]
        argv = ["--data", str(prep), "--supernet", str(supernet), "--out", str(out)]
        assert measure_latency.main([*argv, *[a for s in sets for a in ("--set", f"measure_latency.{s}")]]) == 0
        return [r["latency_ms"] for r in read_table(out)[0]]

    first = measure(net)
    assert sum(timed) == 9
    copy = tmp_path / "copy" / "supernet.pt"
    copy.parent.mkdir()
    copy.write_bytes(net.read_bytes())
    assert measure(copy) == first and timed == []  # same content: nothing to measure
    assert "afresh" not in capsys.readouterr().err
    beam4 = measure(net, "beam=4")
    assert sum(timed) == 9 and "beam: 5 there, 4 here; measuring it afresh" in capsys.readouterr().err
    assert beam4 == pytest.approx([1 + (x - 1) * 4 / 5 for x in first], rel=1e-3)  # the new protocol, every row
    model, vocab = SuperTransformer.load(net)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    retrained = tmp_path / "retrained.pt"
    model.save(retrained, vocab)
    measure(retrained, "beam=4")
    assert sum(timed) == 9 and "supernet_sha256" in capsys.readouterr().err


def test_merging_shards_rescales_them_to_the_first_shards_reference(tmp_path):
    """Each shard scaled its rows to its own timing of the dense reference (100 and 125 ms
    here, the second pod on a slower moment): merged, every row is on the first's scale."""
    from automoe.latency.table import save_space
    from automoe.model.kernels import PLAN_FILE

    space = load_space(TINY_SPACE)
    hw = m.fingerprint(torch.device("cpu"))
    archs = [space.largest(), space.smallest(), space.largest_dense()]
    for shard, (ref, rows) in enumerate([(100.0, [(0, 10.0), (2, 100.0)]), (125.0, [(1, 5.0)])]):
        folder = tmp_path / f"shard{shard}"
        table = LatencyTable(folder, hw)
        for arch_id, ms in rows:
            table.append(arch_id, archs[arch_id], 1.0, ms - 1.0)
        (folder / "reference.json").write_text(json.dumps({"arch": "largest_dense", "latency_ms": ref}))
        save_space(folder, space)
    measure_latency.merge_main([str(tmp_path / "shard0"), str(tmp_path / "shard1")], str(tmp_path / "merged"))
    rows, _ = read_table(tmp_path / "merged")
    assert [r["arch_id"] for r in rows] == [0, 1, 2]
    assert [r["latency_ms"] for r in rows] == pytest.approx([10.0, 5.0 * 100 / 125, 100.0])
    assert json.loads((tmp_path / "merged" / "reference.json").read_text())["latency_ms"] == 100.0
    assert (tmp_path / "merged" / PLAN_FILE).is_file()


def synthetic_latency(arch) -> float:
    """A known, nonlinear latency model: decoder depth x width dominates, as on a CPU."""
    active = np.mean([min(arch.top_k, len(e)) * np.mean(e) for e in arch.decoder_ffn])
    return (
        0.02 * arch.decoder_layers * arch.decoder_embed_dim * (1 + active / 2048)
        + 0.004 * arch.encoder_layers * arch.encoder_embed_dim
        + 0.5 * np.mean(arch.decoder_ende_span)
        + 1.0
    )


def flops_latency(arch) -> float:
    """A latency that is not a function of the predictor's features by construction: the
    analytic GFLOPs of a 30 + 30-token pass (attention over the real lengths, output
    projection over a 1,000-word vocabulary, routers, the active experts) at 20
    GFLOP/s, plus fixed costs per decoder layer and step and per MoE layer."""
    from automoe.model.counting import count

    c = count(arch, 1000, SMALL.qkv_dim)
    moe_layers = sum(len(e) > 1 for e in arch.encoder_ffn + arch.decoder_ffn)
    return c.gflops / 20 * 1e3 + 30 * 0.02 * arch.decoder_layers + 0.05 * moe_layers + 1.0


def test_predictor_gives_dense_and_moe_encoders_the_same_real_budget():
    """Routing costs per encoder MoE layer too (router, dispatch, a product per expert):
    a latency with that cost is learnt without bias for either kind of encoder. With
    decoder-only MoE features, a linear predictor over-predicted dense encoders by 4%
    and under-predicted MoE ones by 3%, so a dense-only arm lost budget to the predictor."""
    rng = np.random.default_rng(0)

    def dense_encoder(a):  # the same arch with one expert (its first) per encoder layer
        return dataclasses.replace(a, encoder_ffn=tuple((e[0],) for e in a.encoder_ffn))

    base = [SMALL.sample(rng) for _ in range(150)]
    archs = [a if i % 2 else dense_encoder(a) for i, a in enumerate(base)]
    archs += [dense_encoder(a) if i % 2 else a for i, a in enumerate(base)]  # each one's twin in the other half
    moe = np.array([any(len(e) > 1 for e in a.encoder_ffn) for a in archs])
    x = np.stack([arch_features(a) for a in archs])
    y = np.array([flops_latency(a) + 0.5 * sum(len(e) > 1 for e in a.encoder_ffn) for a in archs])
    predictor = fit(x[:150], y[:150], x[150:], y[150:], FitConfig(layers=0, weight_decay=1e-3), SMALL.digest(), {})
    error_pct = (predictor.predict_features(x[150:]) / y[150:] - 1) * 100
    held_out_moe = moe[150:]
    assert held_out_moe.sum() > 30 and (~held_out_moe).sum() > 30
    assert abs(error_pct[held_out_moe].mean()) < 1 and abs(error_pct[~held_out_moe].mean()) < 1, error_pct


def test_predictor_learns_a_latency_it_was_not_built_from(tmp_path):
    rng = np.random.default_rng(0)
    archs = [SMALL.sample(rng) for _ in range(400)]
    x = np.stack([arch_features(a) for a in archs])
    y = np.array([flops_latency(a) for a in archs])
    predictor = fit(x[:300], y[:300], x[300:350], y[300:350], FitConfig(epochs=300, seed=0), SMALL.digest(), {})
    s = scores(y[350:], predictor.predict_features(x[350:]))
    assert s["mape_pct"] < 2 and s["r2"] > 0.99 and s["kendall_tau"] > 0.9
    predictor.save(tmp_path / "p.pt")
    from automoe.latency.predictor import LatencyPredictor

    loaded = LatencyPredictor.load(tmp_path / "p.pt")
    np.testing.assert_allclose(loaded.predict(archs[:5]), predictor.predict(archs[:5]), rtol=1e-6)
    loaded.check_space(SMALL)
    with pytest.raises(AutomoeError, match="trained for another search space"):
        loaded.check_space(load_space("space0"))


def test_linear_predictor_recovers_a_linear_latency_model(tmp_path):
    """layers 0: the closed-form fit reproduces a latency that is linear in the features,
    survives save/load, and bad sizes are refused."""
    rng = np.random.default_rng(1)
    archs = [SMALL.sample(rng) for _ in range(140)]
    x = np.stack([arch_features(a) for a in archs])
    weights = rng.uniform(0.5, 2.0, len(FEATURE_NAMES)) / x.std(0).clip(min=1e-9)
    y = x @ weights + 3.0
    predictor = fit(x[:100], y[:100], x[100:110], y[100:110], FitConfig(layers=0), SMALL.digest(), {})
    np.testing.assert_allclose(predictor.predict_features(x[110:]), y[110:], rtol=1e-4)
    nonlinear = np.array([synthetic_latency(a) for a in archs])
    approx = fit(x[:100], nonlinear[:100], x[:0], nonlinear[:0], FitConfig(layers=0, weight_decay=0.01), "d", {})
    assert scores(nonlinear[100:], approx.predict_features(x[100:]))["r2"] > 0.9
    predictor.save(tmp_path / "linear.pt")
    from automoe.latency.predictor import LatencyPredictor

    loaded = LatencyPredictor.load(tmp_path / "linear.pt")
    np.testing.assert_allclose(loaded.predict(archs[:5]), predictor.predict(archs[:5]), rtol=1e-6)
    for bad in ({"layers": -1}, {"layers": 2, "hidden": 0}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match="layers must be"):
            FitConfig(**bad)


def target_distance(target):
    """Fitness with a known optimum (0 at `target`): L1 distance of architecture features."""
    t = arch_features(target)
    scale = np.maximum(np.abs(t), 1.0)
    return lambda archs: [float(np.abs((arch_features(a) - t) / scale).sum()) for a in archs]


def gflops_cost(a):
    from automoe.model.counting import count

    return count(a, 1000, SMALL.qkv_dim).gflops


SMALL_EVOLUTION = EvolutionConfig(
    population=30, parents=8, mutations=12, crossovers=10, mutation_prob=0.3, iterations=12
)


def test_evolution_finds_a_known_optimum_and_beats_random_search():
    target = SMALL.sample(np.random.default_rng(42))
    genes = np.array(SMALL.encode(target))

    def fitness(archs):  # 0 exactly at the target: the number of genes that differ from it
        return [float((np.array(SMALL.encode(a)) != genes).sum()) for a in archs]

    cfg = EvolutionConfig(population=30, parents=8, mutations=12, crossovers=10, mutation_prob=0.05, iterations=60)
    result = evolve(SMALL, cfg, fitness, gflops_cost, budget=1e9, seed=3)
    assert result.best.arch == target and result.best.fitness == 0
    baseline = random_search(SMALL, len(result.evaluated), fitness, gflops_cost, budget=1e9, seed=3)
    assert baseline.best.fitness >= 5  # same number of evaluations, nowhere near
    best_so_far = [h["best_fitness"] for h in result.history]
    assert best_so_far == sorted(best_so_far, reverse=True)  # never gets worse


def test_the_budget_binds_and_seeds_reproduce():
    """Fitness pulls toward the most expensive arch, so the budget is what stops the search:
    the winner sits just under it (the search uses the budget, not a fraction of it), and
    every cost it recorded is the arch's real cost."""
    fitness = target_distance(SMALL.largest())
    budget = 0.5 * gflops_cost(SMALL.largest_dense())
    free = evolve(SMALL, SMALL_EVOLUTION, fitness, gflops_cost, 1e9, seed=5)
    assert free.best.cost > budget  # without the budget the search goes over it
    a = evolve(SMALL, SMALL_EVOLUTION, fitness, gflops_cost, budget, seed=5)
    assert 0.85 * budget <= a.best.cost <= budget
    assert all(c.cost <= budget and gflops_cost(c.arch) == pytest.approx(c.cost) for c in a.evaluated)
    b = evolve(SMALL, SMALL_EVOLUTION, fitness, gflops_cost, budget, seed=5)
    assert key(a.best.arch) == key(b.best.arch) and a.history == b.history
    c = evolve(SMALL, SMALL_EVOLUTION, fitness, gflops_cost, budget, seed=6)
    assert [key(x.arch) for x in c.evaluated] != [key(x.arch) for x in a.evaluated]


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    fitness = target_distance(SMALL.sample(np.random.default_rng(1)))
    full = evolve(SMALL, SMALL_EVOLUTION, fitness, gflops_cost, 1e9, seed=9)

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dying(archs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during iteration 5
            raise Killed
        return fitness(archs)

    state = tmp_path / "state.json"
    with pytest.raises(Killed):
        evolve(SMALL, SMALL_EVOLUTION, dying, gflops_cost, 1e9, seed=9, state_path=state)
    assert json.loads(state.read_text())["iteration"] == 4
    resumed = evolve(SMALL, SMALL_EVOLUTION, fitness, gflops_cost, 1e9, seed=9, state_path=state)
    assert [key(c.arch) for c in resumed.population] == [key(c.arch) for c in full.population]
    assert resumed.history == full.history


def test_pareto_front():
    pts = [(1, 5), (2, 4), (2, 6), (3, 4.5), (4, 1), (5, 2)]
    assert pareto_front(pts, cost=lambda p: p[0], loss=lambda p: p[1]) == [(1, 5), (2, 4), (4, 1)]


def test_search_stage_on_a_tiny_supernet(tiny_supernet, tmp_path, capsys):
    prep, net = tiny_supernet
    out = tmp_path / "search"
    sets = [
        "search.population=8",
        "search.parents=3",
        "search.mutations=3",
        "search.crossovers=2",
        "search.iterations=2",
        "search.budget.kind=gflops",
        "search.budget.value=0.6",
        "search.valid_sentences=30",
        "search.random_baseline=true",
    ]
    assert (
        search.main(
            ["--data", str(prep), "--supernet", str(net), "--out", str(out), *[a for s in sets for a in ("--set", s)]]
        )
        == 0
    ), capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"] == pytest.approx(0.6 * metrics["dense_cost"])
    # the reported winner is what the files say, re-measured independently of the search
    from automoe.data.dataset import PreparedData
    from automoe.model.supernet import SuperTransformer
    from automoe.space import ArchConfig

    best = ArchConfig.from_yaml(out / "best_arch.yaml")
    supernet, _ = SuperTransformer.load(net)
    again = search.ValidLoss(supernet, PreparedData.open(prep), 30, 4096)([best])[0]
    assert again == pytest.approx(metrics["best_fitness"], abs=1e-5)
    # a held-out subset (bench/search_vs_random.py): sentences 10-29 and 0-9 make up 0-29, token-weighted
    data = PreparedData.open(prep)
    tokens = data.split("valid").tgt.lengths
    head, tail = (search.ValidLoss(supernet, data, n, 4096, start=a)([best])[0] for a, n in ((0, 10), (10, 20)))
    assert head != tail
    assert (head * tokens[:10].sum() + tail * tokens[10:30].sum()) / tokens[:30].sum() == pytest.approx(again, rel=1e-5)
    with pytest.raises(ConfigError, match="from sentence 5000"):
        search.ValidLoss(supernet, data, 10, 4096, start=5000)
    assert count_gflops(best, net) == pytest.approx(metrics["best_cost"], rel=1e-6)
    assert count_gflops(best, net) <= metrics["budget"]
    import csv

    with open(out / "population.csv") as fh:
        population = list(csv.DictReader(fh))
    with open(out / "random.csv") as fh:
        randoms = list(csv.DictReader(fh))
    # the winner is the fittest of the final population, all of which meets the budget
    assert all(float(r["cost"]) <= metrics["budget"] for r in population)
    assert min(float(r["fitness"]) for r in population) == pytest.approx(metrics["best_fitness"], abs=1e-5)
    assert min(float(r["fitness"]) for r in randoms) == pytest.approx(metrics["random_best_fitness"], abs=1e-5)
    for name in (
        "best_arch.yaml",
        "population.csv",
        "pareto.csv",
        "history.csv",
        "random.csv",
        "pareto.png",
        "convergence.png",
    ):
        assert (out / name).is_file(), name
    assert all(float(r["cost"]) <= metrics["budget"] for r in population)


def test_infeasible_budget_states_the_floor(tiny_supernet, tmp_path, capsys):
    prep, net = tiny_supernet
    sets = ["search.budget.kind=gflops", "search.budget.value=0.000001", "search.budget.relative_to_dense=false"]
    rc = search.main(
        [
            "--data",
            str(prep),
            "--supernet",
            str(net),
            "--out",
            str(tmp_path / "s"),
            *[a for s in sets for a in ("--set", s)],
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "is below the smallest the space reaches (about" in err and "GFLOPs" in err


def test_predicted_budget_needs_a_predictor(tiny_supernet, tmp_path, capsys):
    prep, net = tiny_supernet
    assert search.main(["--data", str(prep), "--supernet", str(net), "--out", str(tmp_path / "s")]) == 2
    assert "needs --predictor" in capsys.readouterr().err


def test_evolution_config_is_validated():
    with pytest.raises(ValueError, match="parents"):
        EvolutionConfig(population=5, parents=10)
    with pytest.raises(ConfigError, match="search: parents"):
        search.load_config({"search": {"population": 5, "parents": 10}})


def test_predicted_latency_search_chain(tiny_supernet, tmp_path, capsys):
    from automoe.stages import train_predictor

    prep, net = tiny_supernet
    lat, pred, out = tmp_path / "latency", tmp_path / "predictor", tmp_path / "search"
    measure_sets = ["measure_latency.n_archs=14", "measure_latency.repeats=3", "measure_latency.warmup=1"]
    assert (
        measure_latency.main(
            [
                "--data",
                str(prep),
                "--supernet",
                str(net),
                "--out",
                str(lat),
                *[a for s in measure_sets for a in ("--set", s)],
            ]
        )
        == 0
    )
    assert (
        train_predictor.main(["--latency", str(lat), "--out", str(pred), "--set", "train_predictor.fit.epochs=100"])
        == 0
    )
    metrics = json.loads((pred / "metrics.json").read_text())
    assert {"test_rmse_ms", "test_mape_pct", "test_r2", "test_kendall_tau"} <= set(metrics)
    assert (pred / "predicted_vs_measured.png").is_file()
    search_sets = [
        "search.population=6",
        "search.parents=2",
        "search.mutations=2",
        "search.crossovers=2",
        "search.iterations=1",
        "search.valid_sentences=20",
        "search.budget.value=1.5",
    ]
    assert (
        search.main(
            [
                "--data",
                str(prep),
                "--supernet",
                str(net),
                "--predictor",
                str(pred),
                "--out",
                str(out),
                *[a for s in search_sets for a in ("--set", s)],
            ]
        )
        == 0
    ), capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert result["best_cost"] <= result["budget"]
    # the winner was confirmed on measurement with the table's kernel plan, which travelled
    # from measure_latency through the predictor's folder
    assert json.loads((lat / "kernels.json").read_text())["small_rows"]
    assert (pred / "kernels.json").read_bytes() == (lat / "kernels.json").read_bytes()
    confirmed = list(csv.DictReader((out / "confirmed.csv").open()))
    assert 1 <= len(confirmed) <= 5 and [r["chosen"] for r in confirmed].count("True") == 1
    chosen = next(r for r in confirmed if r["chosen"] == "True")
    fitting = [r for r in confirmed if r["fits"] == "True"]
    assert chosen is (fitting[0] if fitting else min(confirmed, key=lambda r: float(r["ratio"])))
    assert result["best_fitness"] == pytest.approx(float(chosen["fitness"]), abs=1e-6)
    assert result["best_measured_ratio"] == pytest.approx(float(chosen["ratio"]), rel=1e-5)

    # a predictor made for another search space is refused
    from automoe.latency.predictor import LatencyPredictor

    other = LatencyPredictor.load(pred / "predictor.pt")
    other.space_digest = "0000000000000000"
    other.save(tmp_path / "other.pt")
    capsys.readouterr()
    assert (
        search.main(
            [
                "--data",
                str(prep),
                "--supernet",
                str(net),
                "--predictor",
                str(tmp_path / "other.pt"),
                "--out",
                str(tmp_path / "s2"),
            ]
        )
        == 2
    )
    assert "trained for another search space" in capsys.readouterr().err


def test_search_in_part_of_the_supernet_space(tiny_supernet, tmp_path, capsys):
    """The ablation: homogeneous-expert and dense-only searches inside one supernet, at the
    budget of the whole space's dense baseline; a space outside the supernet's is refused."""
    import yaml

    from automoe.space import ArchConfig, load_space

    prep, net = tiny_supernet
    tiny = yaml.safe_load(open(TINY_SPACE))
    spaces = {
        "homogeneous": dict(tiny, name="tiny-homogeneous", heterogeneous=False),
        "dense": dict(tiny, name="tiny-dense", n_experts=[1], top_k=[1], heterogeneous=False),
        "outside": dict(tiny, name="tiny-wide", ffn_dim=[256, 128]),
    }
    base = [
        "search.population=6",
        "search.parents=2",
        "search.mutations=2",
        "search.crossovers=2",
        "search.iterations=1",
        "search.budget.kind=gflops",
        "search.budget.value=0.7",
        "search.valid_sentences=20",
        "search.random_baseline=false",
    ]
    results = {}
    for name, space in spaces.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(space))
        out = tmp_path / name
        sets = [*base, f"search.space={path}"]
        argv = [
            "--data",
            str(prep),
            "--supernet",
            str(net),
            "--out",
            str(out),
            *[a for s in sets for a in ("--set", s)],
        ]
        results[name] = (search.main(argv), capsys.readouterr().err, out)
    whole = load_space(TINY_SPACE)
    for name in ("homogeneous", "dense"):
        rc, err, out = results[name]
        assert rc == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["dense_cost"] == pytest.approx(count_gflops(whole.largest_dense(), net))
        # the winner, the final population and the Pareto front over every evaluated arch (sampled,
        # mutated, crossed) all stay in the part of the space (validate() refuses heterogeneous
        # experts in the homogeneous space and MoE layers in the dense one)
        part = load_space(tmp_path / f"{name}.yaml")
        ArchConfig.from_yaml(out / "best_arch.yaml").validate(part)
        rows = [r for f in ("population.csv", "pareto.csv") for r in csv.DictReader(open(out / f))]
        assert rows
        for row in rows:
            ArchConfig.from_dict(json.loads(row["arch"])).validate(part)
    rc, err, out = results["outside"]
    assert rc == 2 and "search.space: ffn_dim choices [256] are not in the supernet's space 'tiny'" in err
    assert not (out / "best_arch.yaml").exists()


def count_gflops(arch, supernet_path) -> float:
    from automoe.model.counting import count
    from automoe.model.supernet import SuperTransformer

    net, _ = SuperTransformer.load(supernet_path)
    return count(arch, net.args.vocab_size, net.space.qkv_dim).gflops


def test_the_winner_is_the_fittest_arch_whose_measured_latency_meets_the_budget(tiny_supernet, monkeypatch):
    """The predictor put the fittest arch within the budget, but it measures over it: the
    next fittest that measures within it wins; when none does, the fastest, unless a next wave
    under a predicted limit lowered by the measured bias finds one."""
    from automoe.data.dataset import PreparedData
    from automoe.latency.measure import Latency
    from automoe.model.supernet import SuperTransformer
    from automoe.search.evolution import Candidate
    from automoe.stages.search import Budget, SearchConfig, confirm_on_measurement

    prep, net_path = tiny_supernet
    net, _ = SuperTransformer.load(net_path)
    data = PreparedData.open(prep)
    rng = np.random.default_rng(5)
    archs = list({a.to_yaml(): a for a in (net.space.sample(rng) for _ in range(12))}.values())[:5]
    dense = net.space.largest_dense()
    # measured: dense 100 ms; archs 0..4 at 0.62, 0.48, 0.45, 0.40, 0.39 of it
    times = (62.0, 48.0, 45.0, 40.0, 39.0)
    measured = {dense.to_yaml(): 100.0} | {a.to_yaml(): f for a, f in zip(archs, times, strict=True)}
    monkeypatch.setattr(
        search.m, "measure_many", lambda models, *a, **k: [Latency(0.0, measured[x.arch.to_yaml()]) for x in models]
    )
    evaluated = [Candidate(a, fitness=1.0 + i, cost=49.0) for i, a in enumerate(archs[:4])]  # all predicted within 50
    evaluated.append(Candidate(archs[0], fitness=0.5, cost=55.0))  # fitter, but predicted over the budget
    cfg = SearchConfig(confirm=3, confirm_rounds=2, budget=Budget(value=0.5))
    best, rows = confirm_on_measurement(cfg, net, data, evaluated, budget=50.0)
    assert best.arch == archs[1] and [r["fits"] for r in rows] == [False, True, True]  # 4th: not among 3
    assert [r["ratio"] for r in rows] == pytest.approx([0.62, 0.48, 0.45]) and rows[1]["chosen"]
    cfg = SearchConfig(confirm=3, confirm_rounds=2, budget=Budget(value=0.4))
    best, rows = confirm_on_measurement(cfg, net, data, evaluated, budget=50.0)
    assert best.arch == archs[2] and not any(r["fits"] for r in rows)  # none fits: the fastest
    # the predictor is biased there (measured / predicted ~1.2): a second wave takes the
    # fittest archs under a limit lowered by that bias, and one of them fits
    evaluated.append(Candidate(archs[4], fitness=4.5, cost=38.0))
    best, rows = confirm_on_measurement(cfg, net, data, evaluated, budget=50.0)
    assert best.arch == archs[4] and [r["wave"] for r in rows] == [1, 1, 1, 2]
    assert rows[3]["limit_ms"] == pytest.approx(50.0 / np.median(np.array([62.0, 48.0, 45.0]) * 1.25 / 49.0))
    assert [r["chosen"] for r in rows] == [False, False, False, True]
    cfg = SearchConfig(confirm=3, confirm_rounds=2, confirm_waves=1, budget=Budget(value=0.4))
    best, rows = confirm_on_measurement(cfg, net, data, evaluated, budget=50.0)
    assert best.arch == archs[2] and len(rows) == 3  # one wave only
    # the second wave is biased as well: the third goes under the budget over that wave's
    # bias (50 / (45 x 1.25 / 40)), not under the second's limit over it (C would be left out)
    a, b, c = archs[1], archs[2], archs[4]
    cands = [
        Candidate(a, fitness=1.0, cost=49.0),
        Candidate(b, fitness=2.0, cost=40.0),
        Candidate(c, fitness=3.0, cost=33.0),
    ]
    cfg = SearchConfig(confirm=1, confirm_rounds=2, budget=Budget(value=0.4))
    best, rows = confirm_on_measurement(cfg, net, data, cands, budget=50.0)
    assert best.arch == c and [r["wave"] for r in rows] == [1, 2, 3] and rows[2]["fits"]
    assert rows[2]["limit_ms"] == pytest.approx(50.0 / (45.0 * 1.25 / 40.0))


def test_relative_budget_uses_the_measured_dense_latency():
    """A budget that is a fraction of the dense baseline is a fraction of the baseline's
    measured latency when the table has it (a prediction off by 30% for the baseline moved
    the whole budget: the gate then rejected the searched model)."""
    from automoe.latency.table import arch_key
    from automoe.stages.search import Budget, SearchConfig, absolute_budget

    space = load_space(TINY_SPACE)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(40)]
    x = np.stack([arch_features(a) for a in archs])
    y = np.array([synthetic_latency(a) for a in archs])
    predictor = fit(x, y, x[:5], y[:5], FitConfig(layers=0), space.digest(), {})
    dense = space.largest_dense()
    predicted = float(predictor.predict([dense])[0])
    predictor.measured = {arch_key(dense): predicted * 0.7}
    assert predictor.reference_ms(dense) == pytest.approx(predicted * 0.7)
    assert predictor.reference_ms(archs[0]) == pytest.approx(float(predictor.predict([archs[0]])[0]))

    def cost(a):
        return float(predictor.predict([a])[0])

    cfg = SearchConfig(budget=Budget(kind="latency_ms", value=2.0, relative_to_dense=True))
    budget, dense_cost, _ = absolute_budget(cfg, cost, space, space, predictor.reference_ms)
    assert dense_cost == pytest.approx(predicted * 0.7) and budget == pytest.approx(2.0 * predicted * 0.7)
