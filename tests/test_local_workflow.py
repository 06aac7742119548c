"""The local workflow as a newcomer lives it: every mistake is one line `error: ...` naming
the input (exit 2), and the registry keeps its story straight."""

import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env


def run(*args: str, cwd=ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args),
        cwd=cwd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    "item, needle",
    [
        ("evalute.max_sentences=50", "unknown section 'evalute' (did you mean evaluate?)"),
        ("nonsense.key=1", "unknown section 'nonsense'"),
        ("evaluate.max_sentence=50", "max_sentence"),
    ],
)
def test_a_stage_refuses_a_mistyped_section_or_key_before_it_starts(item, needle, tmp_path):
    proc = run(
        sys.executable, "-m", "automoe.cli", "evaluate", "--data", str(tmp_path / "none"), "--model",
        str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--set", item,
    )  # fmt: skip
    one_line_error(proc, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "item, needle",
    [
        ("serch.iterations=2", "unknown section 'serch' (did you mean search?)"),
        ("search.iteration=2", "search.iteration"),
    ],
)
def test_pipeline_compile_refuses_a_mistyped_section_or_key(item, needle, tmp_path):
    out = tmp_path / "pipeline.yaml"
    proc = run(sys.executable, "pipeline.py", "compile", "--output", str(out), "--set", item)
    one_line_error(proc, needle)
    assert not out.exists()


def test_translate_refuses_a_beam_of_zero(tmp_path):
    proc = run(sys.executable, "-m", "automoe.cli", "translate", "--model", str(tmp_path), "--beam", "0")
    one_line_error(proc, "translate --beam: must be at least 1, got 0")


@pytest.fixture
def registry(tmp_path):
    """A sqlite registry with model `m`: versions 1 and 2 (no files behind them), alias candidate -> 2."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(tmp_path / "nothing"))
    client.set_registered_model_alias("m", "candidate", "2")
    return subprocess_env(MLFLOW_TRACKING_URI=uri, AUTOMOE_TRACKING="1")


@pytest.mark.parametrize(
    "uri, needles",
    [
        (
            "models:/m@champion",
            ["models:/m@champion: m has no alias @champion (@candidate -> v2; versions 1, 2)", "models:/m/2"],
        ),
        ("models:/m/7", ["models:/m/7: m has no version 7 (versions 1, 2; @candidate -> v2)"]),
        ("models:/mm@champion", ["models:/mm@champion: no registered model 'mm' (registered: m)"]),
    ],
)
def test_a_registry_uri_that_names_nothing_says_what_exists(registry, uri, needles):
    proc = run(sys.executable, "-m", "automoe.cli", "translate", "--model", uri, env=registry)
    one_line_error(proc, *needles)


def test_promoting_a_version_that_does_not_exist_is_one_line(registry):
    proc = run(sys.executable, "-m", "automoe.cli", "promote", "--name", "m", "--version", "9", env=registry)
    one_line_error(proc, "models:/m/9: m has no version 9")


def test_rollback_restores_the_previous_champion_as_it_was(registry, monkeypatch):
    """promote v1, promote v2, rollback: v1 is champion again and no longer marked revoked."""
    from automoe import registry as r
    from automoe import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["MLFLOW_TRACKING_URI"])
    tracking.promote("m", 1)
    tracking.promote("m", 2)
    client = tracking.registry_client()
    assert client.get_model_version("m", "1").tags[r.REVOKED] == "true"
    assert tracking.rollback("m") == 1
    assert tracking.champion_version(client, "m") == 1
    assert r.REVOKED not in client.get_model_version("m", "1").tags
    assert client.get_model_version("m", "2").tags[r.REVOKED] == "true"
