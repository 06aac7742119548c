"""Commands for people: translate with a model, promote or roll back a registered model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from automoe import ct2
from automoe.stages._cli import guarded


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
    args = parser.parse_args(argv)
    if "://" in args.model or args.model.startswith("models:/"):
        from automoe import tracking

        model = tracking.load_translator(args.model)

        def run(lines: list[str]) -> list[str]:
            return list(model.predict(list(lines)))
    elif ct2.is_ct2_folder(args.model):  # a CTranslate2 export (automoe export_ct2)
        run = ct2.Ct2Translator(args.model, ct2.Ct2Decode(beam=args.beam)).translate
    else:
        from automoe.serving import DecodeConfig, Translator

        run = Translator.from_folder(Path(args.model), DecodeConfig(beam=args.beam)).translate
    batch: list[str] = []
    for line in sys.stdin:
        batch.append(line.rstrip("\n"))
        if len(batch) >= args.batch_lines:
            _emit(run(batch))
            batch = []
    if batch:
        _emit(run(batch))


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

    tracking.promote(args.name, args.version)
    print(f"{args.name}: champion is now v{args.version}")


@guarded
def rollback(argv: list[str] | None = None) -> None:
    """rollback: the champion before the current one becomes champion again."""
    parser = argparse.ArgumentParser(prog="automoe rollback", description=rollback.__doc__)
    parser.add_argument("--name", required=True, help="registered model name")
    args = parser.parse_args(argv)
    from automoe import tracking

    version = tracking.rollback(args.name)
    print(f"{args.name}: champion is now v{version}")
