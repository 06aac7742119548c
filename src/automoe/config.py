"""params.yaml sections -> frozen dataclasses.

Every stage owns one section of params.yaml, named like the stage. A section is loaded
into the stage's frozen dataclass: unknown keys and values of the wrong type are
rejected with a message that names the key (`prepare_data.vocab_size: expected int,
got 'big'`). `--set section.key=value` overrides are applied before validation, so they
are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from automoe.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: Path | str) -> Any:
    """Read a YAML file; a missing file or a syntax error is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text, or JSON text (parsed as JSON: PyYAML reads `1e-05` as a string)."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{where}:{line} invalid YAML ({getattr(exc, 'problem', exc)})") from None


# the stages, in pipeline order; params.yaml's sections: theirs and how the pipeline is compiled
STAGES = (
    "prepare_data",
    "train_supernet",
    "measure_latency",
    "train_predictor",
    "search",
    "retrain",
    "evaluate",
    "register",
)
SECTIONS = (*STAGES, "pipeline")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["section.key=value", ...]` -> nested dict; values are parsed as YAML scalars. A
    section that params.yaml does not have is refused, named, with the closest one."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value (a whole section cannot be set)")
        if parts[0] not in SECTIONS:
            close = difflib.get_close_matches(parts[0], SECTIONS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"sections: {', '.join(SECTIONS)}"
            raise ConfigError(f"--set {item!r}: unknown section {parts[0]!r} ({hint})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of `extra` into a copy of `base`."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, validating keys and types recursively."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], data[name], f"{where}.{name}") for name in fields if name in data}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        if origin is tuple and rest and rest != [Ellipsis]:
            raise ConfigError(f"{where}: fixed-length tuples are not supported in config")
        return tuple(_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(key_tp, k, where): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_section(
    cls: type[T],
    section: str,
    params: Path | str | dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> T:
    """Load `section` of a params file (or an already parsed mapping) into `cls`.

    Overrides for other sections are ignored, so one `--set` list can serve a whole
    pipeline run.
    """
    where = "params"
    if params is None:
        data: Any = {}
    elif isinstance(params, dict):
        data = params
    else:
        where = str(params)
        data = read_yaml(params) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections")
    section_data = data.get(section) or {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if section in extra:
        section_data = merge(section_data or {}, extra[section])
    return from_dict(cls, section_data, section)


@dataclasses.dataclass(frozen=True)
class Toleration:
    """A Kubernetes toleration (a tainted GPU pool, spot nodes)."""

    key: str = ""
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""


@dataclasses.dataclass(frozen=True)
class Resources:
    """A stage's pod: resources and where it may run."""

    cpu: str = "2"
    memory: str = "8G"
    gpu: int = 0  # > 0: an accelerator request; training then runs one torchrun worker per GPU
    nodes: int = 1  # train_supernet > 1: a Kubeflow Trainer TrainJob of this many nodes (automoe/trainjob.py)
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    shm: str = ""  # a memory-backed /dev/shm of this size, e.g. 2Gi (NCCL, worker processes); "" = the 64 MB default

    def __post_init__(self) -> None:
        if self.gpu < 0 or self.nodes < 1:
            raise ValueError(f"gpu must be >= 0 and nodes >= 1, got gpu={self.gpu}, nodes={self.nodes}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The `pipeline` section: how the Kubeflow pipeline is compiled (read at compile time)."""

    name: str = "automoe"
    image: str = "ghcr.io/automoe/automoe"  # the project image, without tag
    image_tag: str = "0.1.0"  # a release or git-commit tag, so KFP caching follows code changes
    image_digest: str = ""  # sha256:<64 hex> of the pushed CPU image: tasks then run exactly it
    image_digest_cuda: str = ""  # the same for the `<tag>-cuda` image
    gpu_accelerator: str = "nvidia.com/gpu"  # accelerator type for stages with resources.gpu > 0
    retries: int = 2  # retries of a failed task (transient node or network failures)
    mlflow_tracking_uri: str = ""  # given to every task as MLFLOW_TRACKING_URI ("" = the image default)
    s3_secret: str = ""  # Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, mounted as env
    mlflow_secret: str = ""  # Kubernetes Secret with MLFLOW_TRACKING_USERNAME / _PASSWORD (MLflow auth), as env
    s3_endpoint: str = ""  # AWS_ENDPOINT_URL for tasks (MinIO); "" = AWS S3
    pipeline_root: str = ""  # where KFP keeps artifacts on the cluster, e.g. s3://automoe/kfp ("" = KFP default)
    # checkpoints of the training stages, durable across task retries and shared by nodes
    # (train/store.py): "" = <pipeline_root>/runs when that is on S3, "none" = in the pod only
    run_store: str = ""
    trainer_runtime: str = "torch-distributed"  # the Kubeflow Trainer ClusterTrainingRuntime of multi-node training
    resources: dict[str, Resources] = dataclasses.field(default_factory=dict)  # per stage
    image_pull_secrets: tuple[str, ...] = ()  # Secrets to pull the project image from a private registry

    def __post_init__(self) -> None:
        for name, digest in (("image_digest", self.image_digest), ("image_digest_cuda", self.image_digest_cuda)):
            if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ValueError(f"{name}: expected sha256:<64 hex digits> or empty, got {digest!r}")
        if self.run_store not in ("", "none") and not self.run_store.startswith("s3://"):
            raise ValueError(f"run_store: expected s3://bucket/prefix, none or empty, got {self.run_store!r}")

    def checkpoint_store(self) -> str:
        """The run store's S3 prefix ("" where there is none)."""
        if self.run_store == "none":
            return ""
        if self.run_store:
            return self.run_store
        return f"{self.pipeline_root.rstrip('/')}/runs" if self.pipeline_root.startswith("s3://") else ""

    def resources_of(self, stage: str) -> Resources:
        return self.resources.get(stage, Resources())

    def image_for(self, stage: str, cuda: bool | None = None) -> str:
        """The CUDA image for a stage given GPUs (or `cuda`), else the CPU image; pinned by
        digest where one is set (`name:tag@sha256:...`: the tag for people, the digest for pulls)."""
        cuda = self.resources_of(stage).gpu > 0 if cuda is None else cuda
        ref = f"{self.image}:{self.image_tag}-cuda" if cuda else f"{self.image}:{self.image_tag}"
        digest = self.image_digest_cuda if cuda else self.image_digest
        return f"{ref}@{digest}" if digest else ref
