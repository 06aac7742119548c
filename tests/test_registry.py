"""evaluate, register, the promotion gate and serving, against a real MLflow server on 127.0.0.1."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SPACE, TINY_TRAIN, as_overrides, subprocess_env
from servers import free_port, invocations, mlflow_server, stop, wait_http

from automoe import registry, tracking
from automoe.registry import Gate, Version, decide
from automoe.serving import DecodeConfig, Translator
from automoe.stages import evaluate, prepare_data, register, retrain
from automoe.stages.evaluate import score

NAME = "automoe-test"


# -- the gate as a pure function ------------------------------------------------------------


def v(number, bleu, cost=10.0, budget=20.0, **kw):
    return Version(number, bleu, cost, budget, **kw)


def test_gate_promotes_better_and_keeps_champion_against_worse():
    gate = Gate(bleu_tolerance=0.5, cost_tolerance=0.1)
    champ = v(1, 30.0)
    best, verdicts = decide(champ, [champ, v(2, 29.0)], gate)
    assert best == champ and verdicts[2].startswith("rejected: BLEU 29.00 < champion v1")
    best, verdicts = decide(champ, [champ, v(2, 29.6)], gate)  # within tolerance
    assert best.number == 2 and verdicts == {2: "promoted"}
    best, verdicts = decide(champ, [champ, v(2, 35.0, cost=23.0)], gate)  # over budget (20 * 1.1)
    assert best == champ and "over the budget" in verdicts[2]
    best, verdicts = decide(None, [v(1, 10.0), v(2, 12.0), v(3, 5.0)], gate)
    assert best.number == 2 and verdicts == {
        1: "superseded",
        2: "promoted",
        3: "rejected: BLEU 5.00 < champion v2 12.00 - 0.5",
    }
    best, _ = decide(champ, [champ, v(2, 40.0, revoked=True), v(3, 31.0, decided=True)], gate)
    assert best == champ  # rolled-back and already-decided versions never come back by themselves


def test_gate_floor_refuses_a_model_that_does_not_translate():
    """Below min_bleu or min_chrf nothing becomes champion: not the first registration, not
    a version that beats a weak champion, not a version without scores."""
    gate = Gate(bleu_tolerance=0.5, cost_tolerance=0.1, min_bleu=10.0, min_chrf=35.0)
    best, verdicts = decide(None, [v(1, 0.86, chrf=13.8)], gate)
    assert best is None and verdicts == {1: "rejected: BLEU 0.86 below the floor 10"}
    weak = v(1, 5.0, chrf=20.0)  # a champion promoted before the floor existed
    best, verdicts = decide(weak, [weak, v(2, 9.0, chrf=40.0)], gate)
    assert best == weak and "below the floor 10" in verdicts[2]
    best, verdicts = decide(weak, [weak, v(2, 12.0, chrf=30.0)], gate)
    assert best == weak and verdicts[2] == "rejected: chrF 30.00 below the floor 35"
    best, verdicts = decide(None, [v(1, float("nan"), chrf=50.0)], gate)
    assert best is None and "below the floor" in verdicts[1]
    best, verdicts = decide(weak, [weak, v(2, 25.0, chrf=55.0)], gate)
    assert best.number == 2 and verdicts == {2: "promoted"}


def test_a_relative_budget_is_checked_on_the_measured_ratio_to_dense():
    from automoe.stages.register import gate_cost

    ev = {"searched_latency_ms": 60.0, "dense_latency_ms": 120.0, "searched_gflops": 0.2}
    relative = {"kind": "latency_ms", "value": 50.0, "fraction_of_dense": 0.5}  # predicted dense: 100 ms
    assert gate_cost(ev, relative) == pytest.approx(50.0)  # half the dense latency: on the budget
    assert gate_cost(ev | {"dense_latency_ms": 80.0}, relative) == pytest.approx(75.0)  # 0.75 of dense: over it
    assert gate_cost(ev, {"kind": "latency_ms", "value": 50.0}) == 60.0  # an absolute budget: as measured
    assert gate_cost(ev, {"kind": "gflops", "value": 0.3, "fraction_of_dense": 0.5}) == 0.2


def test_the_gate_decides_on_the_measured_ratio_within_its_noise():
    """Budget 0.5x dense (50 ms of 100), 5% tolerance: limit 52.5 ms = 0.525x. A model whose
    rounds reach the limit passes; one over it even at the low end of its rounds is refused,
    with the figures in ms and ratios and the limit applied."""
    from automoe.registry import describe_cost

    gate = Gate(cost_tolerance=0.05)
    within = v(1, 30.0, cost=54.0, budget=50.0, cost_low=52.0, cost_high=56.0, reference=100.0, unit="ms")
    best, verdicts = decide(None, [within], gate)
    assert best.number == 1 and verdicts == {1: "promoted"}
    over = v(1, 30.0, cost=57.8, budget=50.0, cost_low=56.1, cost_high=59.0, reference=100.0, unit="ms")
    best, verdicts = decide(None, [over], gate)
    assert best is None
    assert verdicts[1] == (
        "rejected: over the budget: cost 57.8 ms = 0.578x dense (rounds 0.561-0.590x), "
        "limit 52.5 ms = 0.525x dense (budget 50 ms = 0.500x dense + 5%)"
    )
    assert describe_cost(v(1, 30.0, cost=0.2, budget=0.3, unit="GFLOPs"), gate) == (
        "cost 0.2 GFLOPs, limit 0.315 GFLOPs (budget 0.3 GFLOPs + 5%)"
    )


def test_gate_costs_carry_the_rounds_range_in_the_budgets_unit():
    from automoe.stages.register import gate_costs

    ev = {
        "searched_latency_ms": 60.0,
        "dense_latency_ms": 120.0,
        "searched_latency_ratio": 0.55,
        "searched_latency_ratio_low": 0.52,
        "searched_latency_ratio_high": 0.6,
        "searched_gflops": 0.2,
        "dense_gflops": 0.5,
    }
    costs = gate_costs(ev, {"kind": "latency_ms", "value": 50.0, "fraction_of_dense": 0.5})
    assert costs.pop("unit") == "ms"
    assert costs == pytest.approx({"cost": 55.0, "low": 52.0, "high": 60.0, "reference": 100.0})
    assert gate_costs(ev, {"kind": "gflops", "value": 0.3})["reference"] == 0.5


# -- evaluate -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(multi30k, tmp_path_factory):
    """Prepared data and two tiny retrained models (different seeds)."""
    root = tmp_path_factory.mktemp("models")
    prep = root / "prepared"
    sets = as_overrides({"prepare_data": {"max_train_pairs": 500, "vocab_size": 300, "mirror": str(multi30k)}})
    assert prepare_data.main(["--out", str(prep), *[a for s in sets for a in ("--set", s)]]) == 0
    models = {}
    for name, seed in (("a", 1), ("b", 2)):
        train = dict(TINY_TRAIN, seed=seed, max_updates=40, valid_interval=20, lr=0.005)
        sets = as_overrides({"retrain": {"space": TINY_SPACE, "train": train, "init_from_supernet": False}})
        out = root / name
        assert (
            retrain.main(
                ["--data", str(prep), "--arch", "smallest", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
            )
            == 0
        )
        models[name] = out
    return prep, models


@pytest.fixture(scope="module")
def evaluation(trained, tmp_path_factory):
    prep, models = trained
    out = tmp_path_factory.mktemp("eval") / "evaluate"
    sets = as_overrides(
        {"evaluate": {"max_sentences": 40, "latency_repeats": 2, "latency_warmup": 1, "flops_sentences": 3}}
    )
    assert (
        evaluate.main(
            [
                "--data",
                str(prep),
                "--model",
                str(models["a"]),
                "--baseline",
                str(models["b"]),
                "--out",
                str(out),
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        == 0
    )
    return out


def test_evaluate_reports_both_models(evaluation):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    for side in ("searched", "dense"):
        for k in (
            "bleu",
            "chrf",
            "latency_ms",
            "encoder_ms",
            "decoder_ms",
            "gflops",
            "params_total",
            "params_active",
            "params_active_no_embed",
            "gflops_routed",
            "params_active_routed",
        ):
            assert f"{side}_{k}" in metrics
        assert len((evaluation / f"hyp.{side}.txt").read_text().splitlines()) == 40
        # dense models: nothing routes, so the measured routing changes nothing
        assert metrics[f"{side}_expert_loads"] == {} and metrics[f"{side}_gflops_routed"] == metrics[f"{side}_gflops"]
    # the ratio is taken within each alternating round (test below); its median and range over the rounds
    assert metrics["searched_latency_ratio_low"] <= metrics["searched_latency_ratio"]
    assert metrics["searched_latency_ratio"] <= metrics["searched_latency_ratio_high"]
    assert metrics["searched_latency_rounds"] == metrics["dense_latency_rounds"] == 5
    assert json.loads((evaluation / "kernels.json").read_text())["machine"]["cpu_model"]
    assert metrics["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    report = (evaluation / "report.md").read_text()
    assert "| BLEU |" in report and "Speedup vs dense" in report
    assert (evaluation / "flops_per_token.png").stat().st_size > 1000


def test_the_latency_ratio_is_the_median_of_the_ratios_within_rounds(monkeypatch):
    """Three rounds whose machine speed differs: the ratio of each round's own two figures,
    not the ratio of the models' medians (25 / 40 = 0.625 here), is what is reported."""
    from automoe.latency import measure
    from automoe.stages import evaluate

    rounds = iter([(10.0, 20.0), (30.0, 40.0), (25.0, 100.0)])  # (searched, dense) total ms per round

    def measure_many(models, *args, **kwargs):
        searched, dense = next(rounds)
        return [measure.Latency(1.0, searched - 1.0), measure.Latency(1.0, dense - 1.0)]

    monkeypatch.setattr(evaluate.m, "measure_many", measure_many)
    monkeypatch.setattr(evaluate.m, "source_windows", lambda *a: None)

    class Data:
        def split(self, name):
            return None

    cfg = evaluate.EvaluateConfig(latency_rounds=3)
    out = evaluate.latencies({"searched": object(), "dense": object()}, Data(), cfg)
    assert (out["searched"]["latency_ms"], out["dense"]["latency_ms"]) == (25.0, 40.0)
    ratios = {k: out["searched"][k] for k in ("latency_ratio", "latency_ratio_low", "latency_ratio_high")}
    assert ratios == {"latency_ratio": 0.5, "latency_ratio_low": 0.25, "latency_ratio_high": 0.75}


def test_scores_equal_the_sacrebleu_cli(trained, evaluation, tmp_path):
    prep, _ = trained
    refs = (prep / "test.tgt.txt").read_text().splitlines()[:40]
    ref_file = tmp_path / "ref.txt"
    ref_file.write_text("\n".join(refs) + "\n")
    hyp_file = evaluation / "hyp.searched.txt"
    cli = Path(sys.executable).parent / "sacrebleu"
    out = subprocess.run(
        [str(cli), str(ref_file), "-i", str(hyp_file), "-m", "bleu", "chrf", "-b", "-w", "4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = json.loads(out)  # [BLEU, chrF]
    ours = score(hyp_file.read_text().splitlines(), refs)
    assert ours["bleu"] == pytest.approx(float(out[0]), abs=1e-4)
    assert ours["chrf"] > 0 and ours["chrf"] == pytest.approx(float(out[1]), abs=1e-4)
    assert json.loads((evaluation / "metrics.json").read_text())["searched_bleu"] == pytest.approx(ours["bleu"])


# -- register, aliases, gate, serving: a real MLflow server ---------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def tracked(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    monkeypatch.chdir(tmp_path)
    return server


def fake_results(tmp_path: Path, bleu: float, latency: float, budget: float = 1000.0) -> tuple[Path, Path]:
    """evaluate / search outputs with chosen numbers, to drive the gate."""
    ev, se = tmp_path / f"eval-{bleu}", tmp_path / f"search-{bleu}"
    ev.mkdir()
    se.mkdir()
    (ev / "metrics.json").write_text(
        json.dumps(
            {
                "searched_bleu": bleu,
                "searched_chrf": 40.0,
                "searched_latency_ms": latency,
                "searched_gflops": 0.1,
                "searched_sentences": 50.0,
                "searched_split": "test",
                "searched_split_sentences": 1000.0,
                "bleu_signature": "sig",
            }
        )
    )
    (se / "budget.json").write_text(json.dumps({"kind": "latency_ms", "value": budget, "source": "predicted"}))
    return ev, se


def do_register(prep, model, ev, se, out, name: str = NAME) -> int:
    return register.main(
        [
            "--data",
            str(prep),
            "--model",
            str(model),
            "--evaluation",
            str(ev),
            "--search",
            str(se),
            "--out",
            str(out),
            "--set",
            f"register.model_name={name}",
        ]
    )


def champion() -> int | None:
    return tracking.champion_version(tracking.registry_client(), NAME)


def test_register_gate_rollback_and_serving(trained, tracked, tmp_path, capsys, monkeypatch):
    prep, models = trained
    ev, se = fake_results(tmp_path, bleu=20.0, latency=50.0)
    assert do_register(prep, models["a"], ev, se, tmp_path / "r1") == 0, capsys.readouterr().err
    assert champion() == 1
    client = tracking.registry_client()
    mv = client.get_model_version(NAME, "1")
    assert mv.tags[registry.BLEU] == "20.0000" and mv.tags["automoe.data_sha256"]
    assert mv.tags["automoe.git_commit"] and "automoe.pipeline_run_id" in mv.tags  # "": registered by hand
    assert mv.tags["automoe.init"] == "scratch"  # how the model was initialised travels with it
    # what its scores came from: 50 of the test split's 1,000 sentences, in fp32
    assert (mv.tags["automoe.eval_split"], mv.tags["automoe.eval_sentences"]) == ("test", "50")
    assert (mv.tags["automoe.eval_split_sentences"], mv.tags["automoe.precision"]) == ("1000", "fp32")

    # pyfunc round trip: load by alias, translate -> the compact model's own translations
    lines = ["A man is riding a bike.", "Two children play in the park.", ""]
    pyfunc = tracking.load_translator(f"models:/{NAME}@champion")
    import pandas as pd

    direct = Translator.from_folder(models["a"]).translate(lines)
    assert list(pyfunc.predict(lines)) == direct
    assert list(pyfunc.predict(pd.DataFrame({"text": lines}))) == direct
    # models-from-code: the folder holds the model's code as text, no pickled class to run on load
    import mlflow.artifacts

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "logged")))
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor, flavor
    assert (folder / "pyfunc_model.py").is_file() and not [p.name for p in folder.rglob("*.pkl")]

    worse_ev, worse_se = fake_results(tmp_path, bleu=18.0, latency=40.0)
    assert do_register(prep, models["b"], worse_ev, worse_se, tmp_path / "r2") == 0
    assert champion() == 1
    assert client.get_model_version_by_alias(NAME, "candidate").version == "2"
    assert client.get_model_version(NAME, "2").tags[registry.GATE].startswith("rejected: BLEU 18.00")

    slow_ev, slow_se = fake_results(tmp_path, bleu=25.0, latency=80.0, budget=50.0)
    assert do_register(prep, models["b"], slow_ev, slow_se, tmp_path / "r3") == 0
    assert champion() == 1 and "over the budget" in client.get_model_version(NAME, "3").tags[registry.GATE]

    better_ev, better_se = fake_results(tmp_path, bleu=22.0, latency=45.0)
    assert do_register(prep, models["b"], better_ev, better_se, tmp_path / "r4") == 0
    assert champion() == 4 and client.get_model_version(NAME, "4").tags[registry.PREVIOUS] == "1"
    registration = json.loads((tmp_path / "r4" / "registration.json").read_text())
    assert registration["promoted"] and registration["uri"] == f"models:/{NAME}@champion"

    # translate CLI through the registry
    env_cli = [sys.executable, "-m", "automoe.cli", "translate", "--model", f"models:/{NAME}@champion"]
    proc = subprocess.run(env_cli, input="A man is riding a bike.\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == Translator.from_folder(models["b"]).translate(["A man is riding a bike."])

    # mlflow models serve answers /invocations
    port = free_port()
    serve = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=subprocess_env(),  # the venv's bin (uvicorn) on PATH
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=serve)
        answer, _ = invocations(f"http://127.0.0.1:{port}", ["A man is riding a bike."])
        assert answer["predictions"] == Translator.from_folder(models["b"]).translate(["A man is riding a bike."])
        # the registered model checks requests' sizes too: a 4xx with a message, not a translation
        # (numbers it cannot refuse: MLflow's schema enforcement makes them strings before it sees them)
        for body, message in (
            ({"inputs": ["A dog."] * 65}, "65 lines, over the limit of 64 per request"),
            ({"inputs": ["x" * 1001]}, "1001 characters, over the limit of 1000"),
        ):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)  # noqa: S310 - loopback only
            assert refused.value.code == 400 and message in json.loads(refused.value.read())["message"]
    finally:
        stop(serve)

    # a `dvc exp run` registers apart: the shared model's candidate and champion stay where they are
    monkeypatch.setenv("DVC_EXP_NAME", "try-budget")
    exp_ev, exp_se = fake_results(tmp_path, bleu=30.0, latency=40.0)
    assert do_register(prep, models["b"], exp_ev, exp_se, tmp_path / "r5") == 0
    registration = json.loads((tmp_path / "r5" / "registration.json").read_text())
    assert registration["model_name"] == f"{NAME}-experiments" and registration["version"] == 1
    assert champion() == 4 and client.get_model_version_by_alias(NAME, "candidate").version == "4"
    assert len(client.search_model_versions(f"name='{NAME}'")) == 4
    experiment = client.get_model_version(f"{NAME}-experiments", "1")
    assert experiment.tags["automoe.dvc_experiment"] == "try-budget"
    skip_ev, skip_se = fake_results(tmp_path, bleu=31.0, latency=40.0)
    out = tmp_path / "r6"
    assert register.main(["--data", str(prep), "--model", str(models["b"]), "--evaluation", str(skip_ev),
                          "--search", str(skip_se), "--out", str(out), "--set", f"register.model_name={NAME}",
                          "--set", "register.experiments=skip"]) == 0  # fmt: skip
    assert json.loads((out / "registration.json").read_text())["registered"] is False
    assert len(client.search_model_versions(f"name='{NAME}'")) == 4

    # a person rolls back: v4 is revoked, v1 is champion again; a new registration does not revive v4
    from automoe import ops

    assert ops.rollback(["--name", NAME]) == 0 and champion() == 1
    assert client.get_model_version(NAME, "4").tags[registry.REVOKED] == "true"
    assert ops.promote(["--name", NAME, "--version", "2"]) == 0 and champion() == 2
    assert client.get_model_version(NAME, "2").tags[registry.PREVIOUS] == "1"


def test_the_server_follows_the_champion_alias(trained, tracked, tmp_path):
    """`automoe serve --model models:/NAME@champion`, started before the model exists, waits
    (not ready) until it does; then answers with the champion's translations; promote v2
    and it answers with v2's; roll back and with v1's again."""
    prep, models = trained
    name = f"{NAME}-serve"
    lines = ["A man is riding a bike.", "Two children play in the park.", "A dog runs through the snow."]
    translations = {v: Translator.from_folder(models[m]).translate(lines) for v, m in ((1, "a"), (2, "b"))}
    assert translations[1] != translations[2]
    port = free_port()
    cmd = [sys.executable, "-m", "automoe.cli", "serve", "--model", f"models:/{name}@champion", "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        cmd += ["--follow", "0.5"]
        serve = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"

    def answer() -> tuple[int, list[str]]:
        body, headers = invocations(base, lines)
        return int(headers["X-Automoe-Model"].rsplit("/", 1)[1]), body["predictions"]

    def serving(version: int) -> None:
        deadline = time.monotonic() + 120
        while json.loads(urllib.request.urlopen(f"{base}/version", timeout=10).read())["version"] != version:  # noqa: S310
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)

    from automoe import ops

    try:
        # started before the model exists (a fresh install): it listens, not ready, and waits
        wait_http(f"{base}/ping", timeout=180, proc=serve)
        for path in ("/ready", "/invocations"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(  # noqa: S310 - loopback only
                    urllib.request.Request(f"{base}{path}", data=b'{"inputs": ["A dog."]}' if "inv" in path else None,
                                           headers={"Content-Type": "application/json"}), timeout=60)  # fmt: skip
            assert refused.value.code == 503 and "waiting for" in json.loads(refused.value.read())["message"]
        assert (
            do_register(prep, models["a"], *fake_results(tmp_path, bleu=20.0, latency=50.0), tmp_path / "r1", name) == 0
        )
        assert (
            do_register(prep, models["b"], *fake_results(tmp_path, bleu=18.0, latency=50.0), tmp_path / "r2", name) == 0
        )
        assert tracking.champion_version(tracking.registry_client(), name) == 1
        serving(1)
        assert answer() == (1, translations[1])
        assert ops.promote(["--name", name, "--version", "2"]) == 0
        serving(2)
        assert answer() == (2, translations[2])
        assert ops.rollback(["--name", name]) == 0
        serving(1)
        assert answer() == (1, translations[1])
    finally:
        stop(serve)
    text = log.read_text()
    assert f"waiting for models:/{name}@champion" in text and f"models:/{name}@champion exists now" in text
    assert f"models:/{name}@champion moved: {name}/1 -> {name}/2" in text
    assert f"models:/{name}@champion moved: {name}/2 -> {name}/1" in text


def test_champion_survives_a_failure_between_steps(trained, tracked, tmp_path, monkeypatch):
    prep, models = trained
    name = f"{NAME}-failure"
    assert do_register(prep, models["a"], *fake_results(tmp_path, bleu=20.0, latency=50.0), tmp_path / "r1", name) == 0
    from mlflow.tracking import MlflowClient

    original = MlflowClient.set_registered_model_alias

    def crash_on_champion(self, model, alias, version):
        if alias == "champion":
            raise ConnectionError("tracking server went away")
        return original(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash_on_champion)
    with pytest.raises(ConnectionError):  # dies after registering v2, while moving the alias
        do_register(prep, models["b"], *fake_results(tmp_path, bleu=30.0, latency=40.0), tmp_path / "r2", name)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", original)
    client = tracking.registry_client()
    assert tracking.champion_version(client, name) == 1  # the old champion is still there
    assert not (tmp_path / "r2").exists()
    # the next registration settles the registry; the chain of previous champions stays intact
    assert do_register(prep, models["b"], *fake_results(tmp_path, bleu=31.0, latency=40.0), tmp_path / "r3", name) == 0
    assert tracking.champion_version(client, name) == 3
    assert client.get_model_version(name, "3").tags[registry.PREVIOUS] == "1"


def test_a_retried_register_task_registers_no_duplicate(trained, tracked, tmp_path, monkeypatch):
    """Within one pipeline run the same model is registered once: a retried task (its first
    try registered, then failed) finds that version; another model is a new version."""
    prep, models = trained
    name = f"{NAME}-retry"
    monkeypatch.setenv("AUTOMOE_PARENT_RUN_ID", tracking.start_parent())  # as a pipeline run's tasks get it
    results = fake_results(tmp_path, bleu=20.0, latency=50.0)
    assert do_register(prep, models["a"], *results, tmp_path / "r1", name) == 0
    assert do_register(prep, models["a"], *results, tmp_path / "r2", name) == 0  # the retry
    client = tracking.registry_client()
    assert [mv.version for mv in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert json.loads((tmp_path / "r2" / "registration.json").read_text())["version"] == 1
    assert do_register(prep, models["b"], *results, tmp_path / "r3", name) == 0
    assert sorted(int(mv.version) for mv in client.search_model_versions(f"name='{name}'")) == [1, 2]


def test_racing_registrations_do_not_lose_a_champion(trained, tracked, tmp_path):
    prep, models = trained
    logged = f"{NAME}-race-source"  # one logged model whose artifacts the racing versions share
    assert do_register(prep, models["a"], *fake_results(tmp_path, bleu=1.0, latency=1.0), tmp_path / "r", logged) == 0
    client = tracking.registry_client()
    name = f"{NAME}-race"
    client.create_registered_model(name)
    template = client.get_model_version(logged, "1")

    def new_version(bleu: float) -> int:
        tags = {registry.BLEU: str(bleu), registry.COST: "1", registry.BUDGET: "10"}
        mv = client.create_model_version(
            name, template.source, run_id=template.run_id, tags=tags, model_id=template.source.rsplit("/", 1)[-1]
        )
        return int(mv.version)

    first = new_version(20.0)
    tracking.settle_champion(client, name, Gate())
    assert tracking.champion_version(client, name) == first
    racers = [new_version(b) for b in (25.0, 22.0, 30.0, 10.0)]
    errors: list[BaseException] = []

    def settle():
        try:
            tracking.settle_champion(tracking.registry_client(), name, Gate())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=settle) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # the same champion as one sequential decision: 20 -> 25 -> (22 rejected) -> 30 -> (10 rejected)
    assert tracking.champion_version(client, name) == racers[2]
    assert client.get_model_version(name, str(racers[2])).tags[registry.PREVIOUS] in {str(first), str(racers[0])}
    verdicts = {n: client.get_model_version(name, str(n)).tags[registry.GATE] for n in racers}
    assert verdicts[racers[1]].startswith("rejected") and verdicts[racers[3]].startswith("rejected")


def test_an_int8_registration_serves_int8_and_a_precision_mismatch_registers_nothing(
    trained, tracked, tmp_path, capsys
):
    prep, models = trained
    name = f"{NAME}-int8"
    ev, se = fake_results(tmp_path, bleu=20.0, latency=50.0)
    argv = [
        "--data",
        str(prep),
        "--model",
        str(models["a"]),
        "--search",
        str(se),
        "--set",
        f"register.model_name={name}",
    ]
    # evaluate ran in fp32: registering it as int8 would publish a latency nobody measured
    assert (
        register.main(
            [*argv, "--evaluation", str(ev), "--out", str(tmp_path / "r0"), "--set", "register.precision=int8"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "register.precision: int8" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "r0").exists() and not tracking.registry_client().search_model_versions(f"name='{name}'")

    metrics = json.loads((ev / "metrics.json").read_text()) | {"searched_precision": "int8"}
    (ev / "metrics.json").write_text(json.dumps(metrics))
    assert (
        register.main(
            [*argv, "--evaluation", str(ev), "--out", str(tmp_path / "r1"), "--set", "register.precision=int8"]
        )
        == 0
    )
    mv = tracking.registry_client().get_model_version(name, "1")
    assert mv.tags["automoe.precision"] == "int8"
    lines = ["A man is riding a bike.", "Two children play in the park."]
    int8 = Translator.from_folder(models["a"], DecodeConfig(precision="int8"))
    assert list(tracking.load_translator(f"models:/{name}@champion").predict(lines)) == int8.translate(lines)


def test_register_without_tracking_is_refused(trained, tmp_path, capsys):
    prep, models = trained
    ev, se = fake_results(tmp_path, bleu=20.0, latency=50.0)
    assert do_register(prep, models["a"], ev, se, tmp_path / "r") == 2
    assert "needs MLflow tracking" in capsys.readouterr().err


def test_logged_model_requirements_are_installable_from_public_indexes(monkeypatch):
    """The pyfunc model's pins carry no local version label (torch 2.13.0+cpu exists on no
    public index, so `mlflow models serve` could not build its environment)."""
    import importlib.metadata

    from automoe import tracking

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "2.13.0+cpu" if p == "torch" else real(p))
    pins = tracking._requirements()
    assert "torch==2.13.0" in pins and not any("+" in p for p in pins)
