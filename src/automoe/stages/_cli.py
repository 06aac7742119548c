"""What every stage CLI shares: `--params`, `--set`, output folder, tracking, errors.

A stage CLI only parses arguments and calls the stage's pure `run`; this module wraps
that call in the stage's MLflow child run and turns user errors into one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from automoe import tracking
from automoe.config import to_dict
from automoe.errors import AutomoeError
from automoe.io import atomic_write_json
from automoe.redact import redact


def stage_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"automoe {name}", description=description)
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="params file (default: ./params.yaml when present, else the built-in defaults)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable), e.g. --set prepare_data.vocab_size=4000",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--metrics", type=Path, help="also write the stage metrics to this JSON file")
    parser.add_argument("--parent-run-id", help="MLflow parent run (default: the workspace's)")
    return parser


def params_source(path: Path | None) -> Path | None:
    """An explicit --params must exist; the implicit ./params.yaml is optional."""
    if path is not None:
        return path
    default = Path("params.yaml")
    return default if default.is_file() else None


def execute(
    stage: str,
    cfg: Any,
    body: Callable[[tracking.StageRun], Mapping[str, float]],
    artifacts: Callable[[], list[Path]] = list,
    parent_run_id: str | None = None,
    metrics_file: Path | None = None,
    run_name: str = "",
) -> dict[str, float]:
    """Run `body(run)` inside the stage's tracking run (the body may log curves to it);
    then log params, final metrics and artifacts. Only the main worker tracks and writes."""
    with tracking.stage_run(stage, parent_run_id, run_name) as run:
        run.log_params(to_dict(cfg))
        metrics = dict(body(run))
        run.log_metrics(metrics)
        for path in artifacts():
            run.log_artifact(path)
    if not tracking.is_main_process():
        return metrics
    if metrics_file is not None:
        atomic_write_json(metrics_file, metrics)
    summary = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
    print(f"{stage}: done ({summary})", file=sys.stderr)
    return metrics


def cli_run(
    name: str,
    load_config: Callable,
    args: argparse.Namespace,
    body: Callable[[Any, tracking.StageRun], Mapping[str, float]],
    artifacts: list[str],
    run_name: str = "",
) -> None:
    """What every stage's `main` does after parsing: config, tracked run, metrics file."""
    cfg = load_config(params_source(args.params), args.overrides)
    execute(
        name,
        cfg,
        lambda tracker: body(cfg, tracker),
        artifacts=lambda: [args.out / a for a in artifacts],
        parent_run_id=args.parent_run_id,
        metrics_file=args.metrics,
        run_name=run_name,
    )


def component_run(
    name: str,
    load_config: Callable,
    params: str,
    overrides: list,
    out_path: str,
    body: Callable[[Any, tracking.StageRun], Mapping[str, float]],
    artifacts: list[str],
    metrics: Any,
    run_name: str = "",
) -> dict[str, float]:
    """What every KFP component body does: the same tracked run under the pipeline's parent
    run (which tracking finds from the task's environment, never from a task input: inputs
    are the cache key), its metrics copied to the component's Metrics output."""
    from automoe.config import parse_yaml

    cfg = load_config(parse_yaml(params, "params"), list(overrides))
    out = Path(out_path)
    result = execute(
        name,
        cfg,
        lambda tracker: body(cfg, tracker),
        artifacts=lambda: [out / a for a in artifacts],
        run_name=run_name,
    )
    write_kfp_metrics(metrics, result)
    return result


def guarded(fn: Callable[[list[str] | None], Any]) -> Callable[[list[str] | None], int]:
    """Wrap a stage main: user errors -> `error: ...` on one line, exit status 2."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            fn(argv)
        except AutomoeError as exc:
            print(f"error: {redact(str(exc))}", file=sys.stderr)  # no credentials from URLs in logs
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        return 0

    wrapper.__doc__ = fn.__doc__
    return wrapper


def write_kfp_metrics(metrics_artifact: Any, metrics: Mapping[str, float]) -> None:
    """Copy stage metrics onto a KFP `Output[Metrics]` so they show in the UI, and into its
    file: an artifact without a file is never a cache hit for kfp.local (nor downloadable)."""
    for key, value in metrics.items():
        metrics_artifact.log_metric(key, float(value))
    path = getattr(metrics_artifact, "path", None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(path), {k: float(v) for k, v in metrics.items()})


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def html_images(title: str, pngs: list[Path]) -> str:
    """A self-contained HTML page of PNG plots: a KFP HTML artifact shows it in the UI."""
    import base64

    imgs = "".join(f"<img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'/>" for p in pngs)
    return f"<html><body><h3>{title}</h3>{imgs}</body></html>"


def artifact_file(path: Path | str, name: str) -> Path:
    """A stage output file, given the file itself or the stage's output folder (as KFP passes it)."""
    path = Path(path)
    return path / name if path.is_dir() else path


def run_distributed(stage: str, nproc: int, params: str, overrides: list, stage_args: list[str]) -> dict[str, float]:
    """The same stage CLI under torchrun with `nproc` workers (one per GPU); its metrics."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        params_file, metrics_file = Path(tmp) / "params.json", Path(tmp) / "metrics.json"
        params_file.write_text(params)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "automoe.cli",
            stage,
            "--params",
            str(params_file),
            "--metrics",
            str(metrics_file),
            *stage_args,
        ]
        cmd += [a for o in overrides for a in ("--set", str(o))]
        if subprocess.run(cmd).returncode != 0:
            raise AutomoeError(f"{stage}: torchrun with {nproc} workers failed (see the log above)")
        return json.loads(metrics_file.read_text())
