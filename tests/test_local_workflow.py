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


@pytest.mark.parametrize(
    "command",
    [
        ["rollback", "--name", "m"],
        ["promote", "--name", "m", "--version", "1"],
        ["translate", "--model", "models:/m/1"],
    ],
)
def test_registry_commands_away_from_the_store_make_no_empty_one(command, tmp_path):
    """Run from a folder without mlflow.db (and no MLFLOW_TRACKING_URI), a registry command
    says there is no registry there, instead of creating an empty store and reporting "no
    champion"."""
    env = subprocess_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    proc = run(sys.executable, "-m", "automoe.cli", *command, cwd=tmp_path, env=env)
    one_line_error(proc, "mlflow.db: no such file, so no registry here", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "mlflow.db").exists()


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


def test_a_mistyped_named_arch_names_the_arch_it_meant(tmp_path):
    proc = run(sys.executable, "-m", "automoe.cli", "retrain", "--data", str(tmp_path), "--arch", "largest_dens",
               "--out", str(tmp_path / "out"))  # fmt: skip
    one_line_error(proc, "--arch largest_dens", "did you mean largest_dense?", "largest_dense_span1")
    assert not (tmp_path / "out").exists()


def test_promoting_the_champion_again_changes_nothing_a_rollback_needs(registry, monkeypatch):
    """promote v1, promote v2, promote v2 again, rollback: v1, not v2 (the repeat used to
    record v2 as its own previous champion)."""
    from automoe import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["MLFLOW_TRACKING_URI"])
    assert tracking.promote("m", 1) and tracking.promote("m", 2)
    assert tracking.promote("m", 2) is False
    assert tracking.rollback("m") == 1


def test_make_compare_names_columns_that_exist():
    """`make compare` (dvc exp show with a short column set) names only metrics that
    evaluate writes to reports/evaluate.json and keys that params.yaml has: a renamed metric
    or param would silently vanish from the table."""
    import json
    import re

    import yaml

    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("EXP_COLUMNS :="))
    names = [n.replace("\\.", ".") for n in line.split(":=", 1)[1].strip().strip("^$()").split("|")]
    metrics = json.loads((ROOT / "reports" / "evaluate.json").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def has(tree, dotted):
        for part in dotted.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return True

    for name in names:
        if name in ("Experiment", "Created", "State"):
            continue
        assert name in metrics or has(params, name), f"make compare: no metric or param {name}"
    assert any(n in metrics for n in names) and any("." in n for n in names)
    assert re.fullmatch(line.split(":=", 1)[1].strip().replace("$$", "$"), "searched_bleu")


def readme_commands() -> list[list[str]]:
    """Every `automoe ...` command in the README's shell blocks, continuation lines joined,
    comments and what is piped in dropped (placeholders such as MODEL_FOLDER kept)."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"(?:^|\|\s*)automoe\s+(\S.*)$", line.strip())
            if found:
                words = shlex.split(found.group(1), comments=True)
                commands.append([w for w in words if w != "..."])
    return commands


def test_every_readme_command_parses_with_the_flags_and_keys_it_names(monkeypatch):
    """Each `automoe` command of the README, as written, is accepted by the real CLI: the
    subcommand exists, its flags parse (required ones given), and every `--set` names a
    section and key that params.yaml's dataclasses accept. The commands stop right after
    parsing (their inputs are make run's outputs)."""
    import argparse
    import importlib

    from automoe import cli

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    commands = readme_commands()
    assert len(commands) >= 15 and {c[0] for c in commands} >= {"prepare_data", "search", "translate", "rollback"}
    for words in commands:
        assert words[0] in cli.COMMANDS, f"README: automoe {words[0]}: no such command"
        try:
            cli.main(words)
        except Parsed as parsed:
            overrides = getattr(parsed.args[0], "overrides", None) or []
        except SystemExit as exc:
            pytest.fail(f"README: automoe {' '.join(words)}: the CLI refuses it (exit {exc.code})")
        else:
            pytest.fail(f"README: automoe {' '.join(words)}: did not parse its arguments")
        module = importlib.import_module(cli.COMMANDS[words[0]].partition(":")[0])
        if overrides and hasattr(module, "load_config"):
            module.load_config(ROOT / "params.yaml", overrides)  # raises on an unknown section or key
