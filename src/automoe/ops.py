"""Commands for people: translate with a model, promote or roll back a registered model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from automoe import ct2
from automoe.errors import AutomoeError
from automoe.stages._cli import guarded
from automoe.textio import as_text


@guarded
def translate(argv: list[str] | None = None) -> None:
    """translate: lines on stdin -> translations on stdout."""
    parser = argparse.ArgumentParser(prog="automoe translate", description=translate.__doc__)
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS (MLflow registry), a retrain output folder or a CTranslate2 export",
    )
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-lines", type=int, default=256, help="lines translated together")
    parser.add_argument(
        "--precision",
        choices=("fp32", "int8", "fp16", "bf16"),
        default=None,
        help="serving layout of a retrain output folder or a CTranslate2 export (default fp32; fp16 and bf16 "
        "on a GPU); a registered model keeps the one it was registered with",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where a retrain folder decodes")
    args = parser.parse_args(argv)
    for flag, value in (("--beam", args.beam), ("--batch-lines", args.batch_lines)):
        if value < 1:
            raise AutomoeError(f"translate {flag}: must be at least 1, got {value}")
    registered = "://" in args.model or args.model.startswith("models:/")
    if args.precision and registered:
        parser.error(
            "--precision: a registered model is served in the precision it was registered with (register.precision)"
        )
    if registered:
        from automoe import tracking

        # the registered model's translator as its pyfunc loads it (precision, device, kernel
        # plan), without the serving limits: this is a batch tool
        run = tracking.load_registered_translator(args.model).translate
    elif ct2.is_ct2_folder(args.model):  # a CTranslate2 export (automoe export_ct2)
        compute = {"int8": "int8"}.get(args.precision or "fp32", "default")  # CTranslate2 quantizes when loading
        run = ct2.Ct2Translator(args.model, ct2.Ct2Decode(beam=args.beam, compute_type=compute)).translate
    else:
        from automoe.serving import DecodeConfig, Translator

        try:
            decode = DecodeConfig(beam=args.beam, precision=args.precision or "fp32", device=args.device)
        except ValueError as e:
            parser.error(f"--precision/--device: {e}")
        run = Translator.from_folder(Path(args.model), decode).translate
    # bytes in, whatever the locale: invalid UTF-8 becomes U+FFFD, every line is translated
    # (one output line per input line) and the repaired line numbers go to stderr
    batch: list[str] = []
    repaired: list[int] = []
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        text, bad = as_text(raw.rstrip(b"\n").removesuffix(b"\r"))
        if bad:
            repaired.append(number)
        batch.append(text)
        if len(batch) >= args.batch_lines:
            _emit(run(batch))
            batch = []
    if batch:
        _emit(run(batch))
    if repaired:
        shown = ", ".join(map(str, repaired[:10])) + (f" and {len(repaired) - 10} more" if len(repaired) > 10 else "")
        print(f"translate: invalid UTF-8 replaced with U+FFFD on line {shown}", file=sys.stderr)


def _emit(lines) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


@guarded
def promote(argv: list[str] | None = None) -> None:
    """promote: make a registered version the champion (bypasses the gate)."""
    parser = argparse.ArgumentParser(prog="automoe promote", description=promote.__doc__)
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--version", required=True, type=int)
    args = parser.parse_args(argv)
    from automoe import tracking

    if tracking.promote(args.name, args.version):
        print(f"{args.name}: champion is now v{args.version}")
    else:
        print(f"{args.name}: v{args.version} is the champion already; nothing changed")


@guarded
def rollback(argv: list[str] | None = None) -> None:
    """rollback: the champion before the current one becomes champion again."""
    parser = argparse.ArgumentParser(prog="automoe rollback", description=rollback.__doc__)
    parser.add_argument("--name", required=True, help="registered model name")
    args = parser.parse_args(argv)
    from automoe import tracking

    version = tracking.rollback(args.name)
    print(f"{args.name}: champion is now v{version}")


@guarded
def outcome(argv: list[str] | None = None) -> None:
    """outcome: what a pipeline run registered, and the model to translate with."""
    import json

    parser = argparse.ArgumentParser(prog="automoe outcome", description=outcome.__doc__)
    parser.add_argument("--registration", default="results/register/registration.json", type=Path)
    args = parser.parse_args(argv)
    try:
        r = json.loads(args.registration.read_text())
    except (OSError, ValueError) as exc:
        raise AutomoeError(f"{args.registration}: no registration to report ({exc.__class__.__name__})") from None
    if not r.get("registered", True):
        print(f"registered model: none ({r.get('why', 'not registered')})")
        return
    name, version, champion = r["model_name"], r["version"], r.get("champion")
    print(f"registered model: {name} v{version}: {r['verdict']}")
    if r.get("gate"):
        print(f"promotion gate:   {r['gate']}")
    if r.get("promoted") or champion is not None:
        which = "this run's model" if r.get("promoted") else f"v{champion}, an earlier run's model"
        uri = f"models:/{name}@champion"
        print(f"champion:         {uri} ({which})")
    else:
        uri = f"models:/{name}/{version}"
        print(f"champion:         none: the gate refused v{version}; it is still registered as {uri}")
    print(f"translate:        echo 'A dog runs.' | .venv/bin/automoe translate --model {uri}")
    if not r.get("promoted"):
        print(f"this run's model: echo 'A dog runs.' | .venv/bin/automoe translate --model models:/{name}/{version}")


@guarded
def sync(argv: list[str] | None = None) -> None:
    """sync: copy a folder to an S3 prefix, or an S3 prefix to a folder (AWS_* from the environment)."""
    from automoe.train.store import sync as copy

    parser = argparse.ArgumentParser(prog="automoe sync", description=sync.__doc__)
    parser.add_argument("source", help="a folder or s3://bucket/prefix")
    parser.add_argument("target", help="s3://bucket/prefix or a folder")
    args = parser.parse_args(argv)
    print(f"sync: {copy(args.source, args.target)} file(s) from {args.source} to {args.target}", file=sys.stderr)
