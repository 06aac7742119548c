import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

import pytest
from conftest import ROOT

from automoe.config import from_dict, load_section, parse_overrides, to_dict
from automoe.errors import ConfigError
from automoe.stages.prepare_data import load_config


@dataclass(frozen=True)
class Inner:
    kind: Literal["a", "b"] = "a"
    value: float = 1.0


@dataclass(frozen=True)
class Outer:
    n: int = 3
    name: str = "x"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"n": 5, "inner": {"kind": "b", "value": 2}, "sizes": [4, 5]}, "outer")
    assert cfg == Outer(n=5, sizes=(4, 5), inner=Inner(kind="b", value=2.0))
    assert isinstance(cfg.inner.value, float)
    assert from_dict(Outer, to_dict(cfg), "outer") == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"m": 1}, "outer.m: unknown key"),
        ({"inner": {"kynd": "a"}}, "outer.inner.kynd: unknown key"),
        ({"n": "big"}, "outer.n: expected an integer, got 'big'"),
        ({"n": 1.5}, "outer.n: expected an integer"),
        ({"n": True}, "outer.n: expected an integer"),
        ({"flag": "yes"}, "outer.flag: expected true or false"),
        ({"inner": {"kind": "c"}}, "outer.inner.kind: expected one of 'a', 'b', got 'c'"),
        ({"sizes": [1, "x"]}, "outer.sizes[1]: expected an integer"),
        ({"inner": 3}, "outer.inner: expected a mapping"),
    ],
)
def test_rejects_with_the_key_named(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data, "outer")


def test_overrides_parse_yaml_scalars_and_nest():
    got = parse_overrides(["prepare_data.vocab_size=4000", "prepare_data.dedupe=true", "search.b.c=x y"])
    assert got == {"prepare_data": {"vocab_size": 4000, "dedupe": True}, "search": {"b": {"c": "x y"}}}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["vocab_size"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["search=3"])


@pytest.mark.parametrize(
    "item, message",
    [
        ("evalute.max_sentences=50", "unknown section 'evalute' (did you mean evaluate?)"),
        ("serch.iterations=2", "unknown section 'serch' (did you mean search?)"),
        ("nonsense.key=1", "unknown section 'nonsense' (sections: prepare_data, train_supernet"),
    ],
)
def test_an_unknown_section_is_refused_by_name(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_overrides([item])


def test_overrides_are_validated_like_the_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare_data:\n  vocab_size: 1000\n")
    assert load_config(params, ["prepare_data.vocab_size=2000"]).vocab_size == 2000
    assert load_config(params, ["search.iterations=1"]).vocab_size == 1000  # another stage's: ignored here
    with pytest.raises(ConfigError, match="unknown section 'other_stage'"):  # no stage's: refused everywhere
        load_config(params, ["other_stage.x=1"])
    with pytest.raises(ConfigError, match="prepare_data.vocab_sise: unknown key"):
        load_config(params, ["prepare_data.vocab_sise=10"])
    with pytest.raises(ConfigError, match="prepare_data: vocab_size must be at least 8"):
        load_config(params, ["prepare_data.vocab_size=2"])


def test_bad_params_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare_data: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(bad)


def test_repository_params_load_for_every_section():
    import importlib

    from automoe.cli import COMMANDS
    from automoe.config import PipelineConfig, read_yaml

    data = read_yaml(ROOT / "params.yaml")
    assert load_section(PipelineConfig, "pipeline", data).image
    stage_sections = {name for name in data if name != "pipeline"}
    assert stage_sections == set(COMMANDS) & stage_sections  # every section is a stage
    for name in stage_sections:  # and loads into its frozen dataclass with no unknown key
        cfg = importlib.import_module(COMMANDS[name]).load_config(data)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.seed = 0


def test_json_params_keep_exponent_floats():
    from automoe.config import parse_yaml

    assert parse_yaml('{"a": {"lr": 1e-05}}', "params") == {"a": {"lr": 1e-05}}
    assert parse_yaml("a:\n  lr: 1.0e-05\n", "params") == {"a": {"lr": 1e-05}}
