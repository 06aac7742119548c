"""The fair reproduction experiment (configs/experiments/multi30k_fair): its report's logic,
and the whole run.sh at toy size, killed in the middle and resumed."""

from __future__ import annotations

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


def _start(out, params, log):
    env = subprocess_env(EXPERIMENT_PARAMS=str(params), MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}")
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

    # 5 dense models, 7 searched; everything in the report, the figures and MLflow
    summary = json.loads((out / "report.json").read_text())
    assert summary["models"] == 12
    report = (out / "report.md").read_text()
    assert "## Goals" in report and "dense_d256_l3x3_f1024" in report and "± " in report
    assert report.count("| supernet, 4, ") == 12  # every model inherited and fine-tuned alike:
    evaluations = [json.loads(p.read_text()) for p in (out / "evaluate").glob("*/metrics.json")]
    routed = [e for e in evaluations if e["searched_expert_loads"]]  # every MoE model: its routing, measured
    section = report.split("## Routing (test2016)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(routed) and ("No model routes" in section) == (not routed)
    trained = [(e[f"{side}_init"], e[f"{side}_train_updates"], e[f"{side}_train_target_tokens"])
               for e in evaluations for side in ("searched", "dense")]  # fmt: skip
    assert len(evaluations) == 11 and {t[:2] for t in trained} == {("supernet", 4.0)}  # the updates run
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
        env=subprocess_env(EXPERIMENT_PARAMS=str(params)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0 and ": automoe " not in third.stdout  # a finished run redoes nothing
