"""`automoe <command>`: one subcommand per pipeline stage (same names as dvc.yaml and KFP)."""

from __future__ import annotations

import importlib
import sys

# command -> module with a `main(argv) -> int` (or module:function)
COMMANDS = {
    "prepare_data": "automoe.stages.prepare_data",
    "train_supernet": "automoe.stages.train_supernet",
    "measure_latency": "automoe.stages.measure_latency",
    "train_predictor": "automoe.stages.train_predictor",
    "search": "automoe.stages.search",
    "retrain": "automoe.stages.retrain",
    "evaluate": "automoe.stages.evaluate",
    "register": "automoe.stages.register",
    "merge_latency": "automoe.stages.measure_latency:merge_cli",
    "export_ct2": "automoe.ct2:main",
    "translate": "automoe.ops:translate",
    "serve": "automoe.server:main",
    "promote": "automoe.ops:promote",
    "rollback": "automoe.ops:rollback",
    "outcome": "automoe.ops:outcome",
    "sync": "automoe.ops:sync",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: automoe <command> [options]\n\ncommands:")
        for name, target in COMMANDS.items():
            module, _, function = target.partition(":")
            loaded = importlib.import_module(module)
            doc = ((getattr(loaded, function) if function else loaded).__doc__ or "").strip().splitlines()[0]
            print(f"  {name:<16} {doc.split(': ', 1)[-1]}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return _entry(command)(rest)


def _entry(command: str):
    module, _, function = COMMANDS[command].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, function) if function else loaded.main


if __name__ == "__main__":
    sys.exit(main())
