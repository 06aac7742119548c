"""The fair reproduction experiment (configs/experiments/multi30k_fair): its report's logic,
and the whole run.sh at toy size, killed in the middle and resumed."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest
import yaml
from conftest import ROOT, subprocess_env

EXPERIMENT = ROOT / "configs" / "experiments" / "multi30k_fair"


def _report_module():
    spec = importlib.util.spec_from_file_location("multi30k_fair_report", EXPERIMENT / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dense_curve_keeps_the_models_a_user_would_pick_and_interpolates_between_them():
    r = _report_module()
    dense = {
        "a": {"group": "dense", "ratio": 1.0, "bleu": 30.0},
        "b": {"group": "dense", "ratio": 0.5, "bleu": 26.0},
        "c": {"group": "dense", "ratio": 0.7, "bleu": 25.0},  # slower and worse than b: dominated
        "s": {"group": "searched", "ratio": 0.6, "bleu": 40.0},
    }
    curve = r.dense_curve(dense)
    assert curve == [(0.5, 26.0), (1.0, 30.0)]
    assert r.curve_bleu(curve, 0.75) == pytest.approx(28.0)
    assert r.curve_bleu(curve, 2.0) == 30.0  # flat after the slowest
    assert r.curve_bleu(curve, 0.4) is None  # faster than every dense model
    assert r.above_curve(curve, {"ratio": 0.75, "bleu": 27.5}) == (pytest.approx(-0.5), False)
    assert r.above_curve(curve, {"ratio": 0.75, "bleu": 28.0})[1]
    # faster than the whole family: above the curve only if it beats the fastest dense model
    assert r.above_curve(curve, {"ratio": 0.3, "bleu": 26.5}) == (pytest.approx(0.5), True)
    assert not r.above_curve(curve, {"ratio": 0.3, "bleu": 25.0})[1]


def test_dense_points_at_one_ratio_keep_the_best_and_divide_by_nothing():
    r = _report_module()
    dense = {
        "a": {"group": "dense", "ratio": 0.5, "bleu": 26.0},
        "b": {"group": "dense", "ratio": 0.5, "bleu": 27.0},  # as fast as a, and better
        "c": {"group": "dense", "ratio": 1.0, "bleu": 30.0},
    }
    curve = r.dense_curve(dense)
    assert curve == [(0.5, 27.0), (1.0, 30.0)]
    assert r.curve_bleu(curve, 0.5) == 27.0 and r.curve_bleu(curve, 0.75) == pytest.approx(28.5)


def _goal_models(r, second_seed_bleu: float | None) -> dict[str, dict]:
    ref = {"group": "dense", "search": "", "seed": 1, "ratio": 1.0, "bleu": 36.0}
    models = {
        r.REF: ref,
        "dense_small": {"group": "dense", "search": "", "seed": 1, "ratio": 0.3, "bleu": 33.0},
        # two searched models at <= 1/3: the better test BLEU belongs to the worse validation loss
        "het_b50_s1": {"group": "searched", "search": "het_b50", "seed": 1, "ratio": 0.32, "bleu": 35.9,
                       "valid_loss": 2.40},
        "hom_b50_s1": {"group": "searched", "search": "hom_b50", "seed": 1, "ratio": 0.33, "bleu": 34.0,
                       "valid_loss": 2.30},
        # just below the dense curve (33.5 at 0.4): a difference no single run can show
        "het_b75_s1": {"group": "searched", "search": "het_b75", "seed": 1, "ratio": 0.4, "bleu": 33.499,
                       "valid_loss": 2.5},
    }  # fmt: skip
    if second_seed_bleu is not None:
        models["het_b50_s2"] = dict(models["het_b50_s1"], seed=2, bleu=second_seed_bleu, valid_loss=2.45)
    return models


def test_goals_choose_on_validation_and_judge_the_dense_curve_within_the_seed_noise():
    r = _report_module()
    models = _goal_models(r, second_seed_bleu=35.3)  # seed sd 0.42: a noise margin of 1.18 BLEU
    curve = r.dense_curve(models)
    assert r.seed_sd(models) == pytest.approx(0.4243, abs=1e-4)
    text = r.goals(models, curve)
    # the searched model chosen without the test set (lowest validation loss): 34.0, 2.0 below the reference
    assert "within 0.5 BLEU of it: **missed** (of 3 such models, the one with the lowest validation loss: 34.00" in text
    assert r.versus_curve(curve, models["het_b75_s1"], r.seed_sd(models)) == "within noise"
    assert "No searched point below the dense curve beyond the noise: **met**" in text
    models["het_b75_s1"]["bleu"] = 31.0  # 2.5 below: beyond the noise
    assert "No searched point below the dense curve beyond the noise: **missed**" in r.goals(models, curve)
    # a single seed per search: the noise is unknown and the curve claim is not decided
    single = _goal_models(r, second_seed_bleu=None)
    assert r.seed_sd(single) is None
    assert "on or above the dense curve: **not decided**" in r.goals(single, r.dense_curve(single))
    # the 1/3 goal is met by the chosen model alone
    single["hom_b50_s1"]["bleu"] = 35.6
    assert "within 0.5 BLEU of it: **met**" in r.goals(single, r.dense_curve(single))


def test_the_report_refuses_evaluations_that_disagree_on_the_reference(tmp_path):
    r = _report_module()

    def evaluation(name: str, ref_bleu: float) -> None:
        sides = {"searched": 30.0, "dense": ref_bleu}
        m = {f"{side}_{k}": v for side, bleu in sides.items() for k, v in
             {"bleu": bleu, "chrf": 60.0, "latency_ms": 10.0, "encoder_ms": 1.0, "decoder_ms": 9.0,
              "translate_sentences_per_s": 5.0}.items()}  # fmt: skip
        folder = tmp_path / "evaluate" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(m | {"bleu_signature": "s", "chrf_signature": "c"}))

    evaluation("het_b50_s1", 36.0)
    evaluation("het_b50_s2", 36.0)
    assert r.load(tmp_path)[r.REF]["bleu"] == 36.0
    evaluation("hom_b50_s1", 35.0)  # the same reference scored otherwise: not the same model or data
    with pytest.raises(ValueError, match="the reference's bleu differs between evaluations"):
        r.load(tmp_path)


def _arm_models(r, runs: dict[str, list[float]]) -> dict[str, dict]:
    return {
        f"{search}_s{seed}": {"group": "searched", "search": search, "seed": seed, "ratio": 0.5, "bleu": bleu,
                              "chrf": 60.0}
        for search, bleus in runs.items()
        for seed, bleu in enumerate(bleus, 1)
    }  # fmt: skip


def test_the_ablation_reports_each_arm_with_its_interval_and_each_difference_with_welchs():
    r = _report_module()
    models = _arm_models(r, {"het_b50": [36.0, 36.2, 36.4], "hom_b50": [35.0, 35.1, 35.2],
                             "dense_b50": [35.3, 35.0, 35.1]})  # fmt: skip
    mean, low, high = r.interval([36.0, 36.2, 36.4])  # t(0.975, 2) = 4.303, sd 0.2, n 3
    assert (mean, low, high) == pytest.approx((36.2, 36.2 - 0.4969, 36.2 + 0.4969), abs=1e-4)
    d, dlow, dhigh = r.difference([36.0, 36.2, 36.4], [35.0, 35.1, 35.2])
    se = (0.04 / 3 + 0.01 / 3) ** 0.5  # Welch: dof 2.94, rounded down to 2 (wider)
    assert (d, dlow, dhigh) == pytest.approx((1.1, 1.1 - 4.303 * se, 1.1 + 4.303 * se), abs=1e-4)
    table = r.ablation(models)
    assert "| heterogeneous | 3 | 36.20 [35.70, 36.70] | 0.20 | 36.00, 36.20, 36.40 |" in table
    # dense-only's mean (35.13) is above homogeneous's (35.10), by less than their spread: not separated
    assert "Ordering by mean BLEU: heterogeneous > dense-only (HAT) > homogeneous." in table
    assert "- heterogeneous vs dense-only (HAT): difference +1.07 BLEU" in table
    assert "dense-only (HAT) vs homogeneous: difference +0.03 BLEU" in table and "not separated (includes 0)" in table
    models[r.REF] = {"group": "dense", "search": "", "seed": 1, "ratio": 1.0, "bleu": 37.0}
    text = r.goals(models, r.dense_curve(models))
    assert "(the paper's ordering): by the means **not as the paper** (heterogeneous > dense-only (HAT) > " in text
    assert "1 of 2 adjacent differences separated by their 95% intervals (runs per arm: 3, 3, 3)" in text
    for m in models.values():
        if m["search"] == "dense_b50":
            m["bleu"] -= 1.0
    assert "by the means **as the paper**" in r.goals(models, r.dense_curve(models))
    single = _arm_models(r, {"het_b50": [36.0], "hom_b50": [35.0]})
    assert "not decided (an arm has a single run)" in r.ablation(single)


def test_a_refused_one_third_search_names_the_floor_in_the_goals(tmp_path):
    r = _report_module()
    models = _arm_models(r, {"het_b50": [36.0, 36.1]})
    models[r.REF] = {"group": "dense", "search": "", "seed": 1, "ratio": 1.0, "bleu": 37.0}
    assert "refused" not in r.goals(models, r.dense_curve(models), tmp_path)
    (tmp_path / "search_het_b33_s1.refused").write_text("search.budget: 8.1 ms is below the space's floor\n")
    text = r.goals(models, r.dense_curve(models), tmp_path)
    assert "**missed** (no searched model measured at or under 1/3: 0.500x, 0.500x; the 1/3 search was refused: " \
           "search.budget: 8.1 ms is below the space's floor)" in text  # fmt: skip


def test_each_family_fine_tunes_at_the_lr_its_sweep_chose_on_validation(tmp_path):
    spec = importlib.util.spec_from_file_location("choose_lr", EXPERIMENT / "choose_lr.py")
    choose_lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choose_lr)
    r = _report_module()
    for family, losses in {"dense": {"0.0015": 1.9, "0.003": 1.7, "0.006": 1.8},
                           "het_b50": {"0.0015": 2.0, "0.003": 2.1, "0.006": 2.0}}.items():  # fmt: skip
        for lr, loss in losses.items():
            (tmp_path / "sweep" / family / f"lr{lr}").mkdir(parents=True)
            (tmp_path / "sweep" / family / f"lr{lr}" / "metrics.json").write_text(json.dumps({"best_valid_loss": loss}))
        (tmp_path / f"lr_{family}.json").write_text(json.dumps(choose_lr.choose(tmp_path / "sweep" / family)))
    assert choose_lr.choose(tmp_path / "sweep" / "dense")["lr"] == 0.003
    assert choose_lr.choose(tmp_path / "sweep" / "het_b50")["lr"] == 0.0015  # a tie goes to the smaller LR
    with pytest.raises(ValueError, match="no finished sweep run"):
        choose_lr.choose(tmp_path / "sweep" / "hom_b50")
    assert r.family_lr(tmp_path, {"search": ""}) == 0.003  # every dense model: the reference's choice
    assert r.family_lr(tmp_path, {"search": "het_b50"}) == 0.0015 and r.family_lr(tmp_path, {"search": "x"}) is None
    table = r.learning_rates(tmp_path)
    assert "| dense family (the reference) | 0.0015: 1.900, 0.003: 1.700, 0.006: 1.800 | 0.003 |" in table


def _toy_params(path, multi30k) -> None:
    p = yaml.safe_load((EXPERIMENT / "params.yaml").read_text())
    p["prepare_data"].update(max_train_pairs=300, vocab_size=300, mirror=str(multi30k))
    for stage in ("train_supernet", "retrain"):
        p[stage]["train"].update(max_updates=4, valid_interval=2, valid_max_sentences=20, max_tokens=512)
        p[stage]["train"].update(warmup_updates=1, log_interval=2)
    p["measure_latency"].update(n_archs=10, repeats=1, warmup=1, sources=2)  # the real 30+30 protocol
    p["search"].update(population=6, parents=2, mutations=2, crossovers=2, iterations=1, valid_sentences=20)
    p["evaluate"].update(max_sentences=20, latency_repeats=1, latency_warmup=1, latency_rounds=2, flops_sentences=3)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


TOY_DESIGN = {"SEEDS": "1 2", "LR_GRID": "0.003 0.006", "SWEEP_UPDATES": "2"}


def _start(out, params, log):
    env = subprocess_env(
        EXPERIMENT_PARAMS=str(params), MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}", **TOY_DESIGN
    )
    return subprocess.Popen(
        ["bash", str(EXPERIMENT / "run.sh"), str(out)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: the kill takes the stages with it
    )


def test_the_experiment_runs_killed_and_resumed_without_redoing_finished_steps(tmp_path, multi30k):
    params, out = tmp_path / "params.yaml", tmp_path / "out"
    _toy_params(params, multi30k)
    first = _start(out, params, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while len(list(out.glob("retrain_*.json"))) < 2:  # kill it inside the retraining pool
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the toy experiment did not reach retraining in 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = sorted(p.stem for p in out.glob("*.json"))
    assert "report" not in finished and "train_supernet" in finished

    second = _start(out, params, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    for step in finished:  # nothing finished before the kill ran again (retrains log to their own file)
        own = out / f"{step}.log"
        assert f"== {step}: done" in log + (own.read_text() if own.is_file() else "")
    steps = [line.split("\t")[0] for line in (out / "times.tsv").read_text().splitlines()]
    assert len(steps) == len(set(steps)), "a step ran twice"

    # 3 dense models; 2 runs of each ablation arm (search seed = fine-tuning seed), and the
    # 1/3 search's model where the toy space's floor allowed it
    b33 = (out / "search_het_b33_s1.json").is_file()
    assert b33 != (out / "search_het_b33_s1.refused").is_file() and (b33 or "the 1/3 search was refused" in log)
    n_models = 3 + 6 + b33
    summary = json.loads((out / "report.json").read_text())
    assert summary["models"] == n_models
    report = (out / "report.md").read_text()
    assert "## Goals" in report and "dense_d256_l3x3_f1024" in report and "runs per arm: 2, 2, 2" in report
    assert report.count("| supernet, 4, ") == n_models  # every model inherited and fine-tuned alike:
    families = ["dense", "het_b50", "hom_b50", "dense_b50"] + ["het_b33"] * b33
    for family in families:  # each family's LR: the toy grid's lowest validation loss, used by all its models
        chosen = json.loads((out / f"lr_{family}.json").read_text())
        assert set(chosen["valid_loss"]) == {"0.003", "0.006"} and chosen["lr"] in (0.003, 0.006)
        r = _report_module()  # a model's family: the report's own reading of its folder name
        members = [f for f in (out / "retrain").iterdir() if (r.kind(f.name)[1] or "dense") == family]
        assert members
        for folder in members:  # the schedule's peak, as trained (the grid's LRs are a factor 2 apart)
            with open(folder / "curves.csv") as fh:
                peak = max(float(row["lr"]) for row in csv.DictReader(fh))
            assert chosen["lr"] / 2 < peak <= chosen["lr"] * (1 + 1e-6), (folder.name, peak, chosen)
    evaluations = [json.loads(p.read_text()) for p in (out / "evaluate").glob("*/metrics.json")]
    routed = [e for e in evaluations if e["searched_expert_loads"]]  # every MoE model: its routing, measured
    section = report.split("## Routing (test2016)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(routed) and ("No model routes" in section) == (not routed)
    trained = [(e[f"{side}_init"], e[f"{side}_train_updates"], e[f"{side}_train_target_tokens"])
               for e in evaluations for side in ("searched", "dense")]  # fmt: skip
    assert len(evaluations) == n_models - 1 and {t[:2] for t in trained} == {("supernet", 4.0)}  # the updates run
    tokens = [t[2] for t in trained]  # batches of a token budget: seeds reorder the data, not its amount
    assert max(tokens) <= 1.1 * min(tokens), tokens
    for name in ("bleu_vs_latency", "pareto", "valid_curves"):
        assert (out / "figures" / f"multi30k_fair_{name}.png").stat().st_size > 1000
    with sqlite3.connect(out / "mlflow.db") as db:
        names = {row[0] for row in db.execute("select name from runs")}
        artifacts = db.execute("select count(*) from runs where name = 'report'").fetchone()[0]
    assert {"multi30k_fair", "report", "dense_d256_l3x3_f1024", "het_b50_s2"} <= names and artifacts == 1
    assert len(list((out / "mlartifacts").rglob("multi30k_fair_pareto.png"))) == 1

    third = subprocess.run(
        ["bash", str(EXPERIMENT / "run.sh"), str(out)],
        env=subprocess_env(EXPERIMENT_PARAMS=str(params), **TOY_DESIGN),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0 and ": automoe " not in third.stdout  # a finished run redoes nothing
