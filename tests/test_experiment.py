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
    assert report.count("| supernet, 4, ") == 12  # every model inherited and fine-tuned alike
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
