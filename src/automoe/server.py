"""`automoe serve`: an HTTP translation server that batches across requests, enforces
limits, and follows a registry alias.

    automoe serve --model models:/automoe-en-de@champion --port 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": ["A dog runs."]}'

The request and response bodies are MLflow's scoring protocol (`inputs`/`instances`, or a
`dataframe_split`/`dataframe_records` with a `text` column; `predictions` back), so a client
of `mlflow models serve` works unchanged. The response adds `truncated` (indices of lines cut
to the model's source length) and `model` (`name/version` served).

Why a server of our own and not `mlflow models serve`: MLflow's server runs each request in
asyncio's default thread pool (min(32, cores + 4) threads: 6 on 2 cores), so at most 6
requests can wait to be batched together; it has no hook to report truncation per line; and
it loads one version at start. Here a request costs no thread while it waits: the handler
encodes its lines, queues them on the `Batcher` and awaits the result.

Following the alias (`--follow SECONDS`, on for a `models:/NAME@ALIAS` URI): a thread asks
the registry where the alias points; when it moves (`automoe promote`, `automoe rollback`,
the gate), the new version is loaded beside the old one, must translate the readiness
sentence, and then takes the traffic; the old one finishes what it has queued. A version
that fails to load is logged and the old one keeps serving. Until the alias exists (a
fresh install has no champion yet) the server listens, `/ready` answers 503, and the first
version is loaded when it appears. `GET /ready` is a real translation through the batcher
(the Kubernetes readiness probe); `GET /version` says what is served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from automoe.errors import AutomoeError
from automoe.redact import redact
from automoe.serving import BatchConfig, Batcher, BatcherClosed, DecodeConfig, Limits, RequestError, Translator
from automoe.stages._cli import guarded

READY_SENTENCE = "A man is riding a bike."  # translated by every readiness check and before a new version serves
INPUT_KEYS = ("inputs", "instances", "dataframe_split", "dataframe_records")


def log(message: str) -> None:
    print(f"serve: {redact(message)}", flush=True)  # a registry error may quote a URL with a credential


@dataclass(frozen=True)
class Served:
    """One loaded model: what it is, its translator and its batcher."""

    label: str  # name/version, or the folder
    version: int | None
    translator: Translator
    batcher: Batcher

    def translate(self, lines: list[str]) -> list[str]:
        return self.translator.translate_reporting(lines, self.batcher.translate_ids)[0]


def request_lines(body: bytes, content_type: str) -> list:
    """The lines of an MLflow scoring request, or RequestError saying what is wrong with it."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"Content-Type {content_type or '(none)'!r}: send application/json", 415)
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("body: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"body: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(payload, dict):
        raise RequestError(f"body: expected a JSON object with one of {', '.join(INPUT_KEYS)}")
    keys = [k for k in payload if k != "params"]
    if len(keys) != 1 or keys[0] not in INPUT_KEYS:
        raise RequestError(f"body: expected exactly one of {', '.join(INPUT_KEYS)}, got {', '.join(keys) or 'none'}")
    key, value = keys[0], payload[keys[0]]
    if key == "dataframe_split":
        columns = value.get("columns") if isinstance(value, dict) else None
        if not isinstance(columns, list) or "text" not in columns or not isinstance(value.get("data"), list):
            raise RequestError("dataframe_split: expected {'columns': [..., 'text', ...], 'data': [[...], ...]}")
        at = columns.index("text")
        if not all(isinstance(row, list) and len(row) == len(columns) for row in value["data"]):
            raise RequestError(f"dataframe_split.data: every row needs {len(columns)} values")
        return [row[at] for row in value["data"]]
    if key == "dataframe_records":
        if not isinstance(value, list) or not all(isinstance(r, dict) and "text" in r for r in value):
            raise RequestError("dataframe_records: expected a list of objects with a 'text' key")
        return [r["text"] for r in value]
    return value


class TranslationServer:
    """The served model and what decides which one that is."""

    def __init__(self, model: str, limits: Limits, batching: BatchConfig, decode: DecodeConfig, follow_s: float):
        self.model, self.limits, self.batching, self.decode = model, limits, batching, decode
        self.registered = model.startswith("models:/")
        self.alias = model.split("@", 1)[1] if self.registered and "@" in model else None
        self.follow_s = follow_s if self.alias else 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self.served: Served | None = None  # None until the alias exists (a fresh install has no champion yet)
        try:
            self.served = self._load(self._resolve())
        except Exception as e:
            if self.follow_s <= 0:
                raise
            log(f"{e}; waiting for {model} (asking every {self.follow_s:g} s; /ready answers 503 meanwhile)")

    # -- which version, loaded how --
    def _resolve(self) -> int | None:
        if not self.registered:
            return None
        from automoe import tracking

        return tracking.resolve_version(self.model)

    def _load(self, version: int | None) -> Served:
        t0 = time.monotonic()
        if self.registered:
            from automoe import tracking

            name = self.model[len("models:/") :].split("@")[0].split("/")[0]
            translator = tracking.load_registered_translator(f"models:/{name}/{version}")
            label = f"{name}/{version}"
        else:
            if not Path(self.model).is_dir():
                raise AutomoeError(f"--model {self.model}: neither models:/NAME@ALIAS nor a model folder")
            translator, label = Translator.from_folder(self.model, self.decode), self.model
        served = Served(
            label, version, translator, Batcher(translator.translate_ids, self.batching, translator.decode.device)
        )
        try:  # it must translate before it serves (what it translates to is the gate's business)
            probe = served.translate([READY_SENTENCE])[0]
        except Exception:
            served.batcher.close()
            raise
        log(f"{label} loaded in {time.monotonic() - t0:.1f} s; ready ({READY_SENTENCE!r} -> {probe!r})")
        return served

    def follow_once(self) -> bool:
        """Serve the version the alias points at now; True when it changed."""
        version = self._resolve()
        old = self.served
        if old is not None and version == old.version:
            return False
        try:
            new = self._load(version)
        except Exception as e:  # noqa: BLE001 - keep serving what works, say why
            still = old.label if old else "nothing"
            log(f"{self.model} points to v{version}, which did not load ({e}); still serving {still}")
            return False
        with self._lock:
            self.served = new
        if old is None:
            log(f"{self.model} exists now; serving {new.label}")
            return True
        old.batcher.close()  # after what it has queued
        log(f"{self.model} moved: {old.label} -> {new.label}; now serving {new.label}")
        return True

    def start_following(self) -> None:
        if self.follow_s <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(self.follow_s):
                try:
                    self.follow_once()
                except Exception as e:  # noqa: BLE001 - a registry outage must not stop serving
                    log(f"could not ask the registry where {self.model} points ({e}); still serving")

        self._follower = threading.Thread(target=loop, name="automoe-follow", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        self._stop.set()
        if self.served is not None:
            self.served.batcher.close()

    # -- a request --
    async def translate(self, lines: list) -> dict:
        lines = self.limits.check(lines)
        while True:  # one version answers the whole request
            served = self.served
            if served is None:
                raise RequestError(f"no model yet: waiting for {self.model} to exist in the registry", 503)
            prepared = served.translator.prepare(lines)
            if prepared.cut and not self.limits.truncate:
                raise RequestError(
                    f"inputs[{prepared.cut[0]}]: longer than the model's {served.translator.decode.max_source_len} "
                    "source tokens (truncation is off)",
                    413,
                )
            try:
                pending = served.batcher.submit(prepared.sources) if prepared.sources else None
            except BatcherClosed:
                if self.served is served:  # stopping
                    raise RequestError("the server is shutting down", 503) from None
                continue  # the alias moved between reading and queueing: its successor answers
            break
        hyps = await asyncio.wrap_future(pending) if pending is not None else []
        return {
            "predictions": served.translator.finish(prepared, hyps),
            "truncated": prepared.cut,
            "model": served.label,
        }


def app(server: TranslationServer):
    api = FastAPI(title="automoe translation server")
    max_body = server.limits.max_lines * (server.limits.max_chars * 6 + 16) + 4096  # 6: a JSON-escaped character

    def error(status: int, message: str) -> JSONResponse:
        code = "INVALID_PARAMETER_VALUE" if status < 500 else "INTERNAL_ERROR"
        return JSONResponse({"error_code": code, "message": message}, status_code=status)

    @api.post("/invocations")
    async def invocations(request: Request):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return error(413, f"body: {int(length)} bytes, over the limit of {max_body} (max_lines x max_chars)")
        body = await request.body()
        if len(body) > max_body:
            return error(413, f"body: {len(body)} bytes, over the limit of {max_body} (max_lines x max_chars)")
        try:
            result = await server.translate(request_lines(body, request.headers.get("content-type", "")))
        except RequestError as e:
            return error(e.status, str(e))
        return JSONResponse(result, headers={"X-Automoe-Model": result["model"]})

    @api.get("/ping")
    @api.get("/health")
    async def ping():
        return JSONResponse({"status": "ok", "model": server.served.label if server.served else None})

    @api.get("/ready")
    async def ready():
        try:
            result = await server.translate([READY_SENTENCE])
        except Exception as e:  # noqa: BLE001 - not ready, and why
            return error(503, f"not ready: {e}")
        return JSONResponse({"status": "ready", "model": result["model"], "translation": result["predictions"][0]})

    @api.get("/version")
    async def version():
        served = server.served
        label, version = (served.label, served.version) if served else (None, None)
        return JSONResponse({"model": label, "version": version, "uri": server.model})

    return api


@guarded
def main(argv: list[str] | None = None) -> None:
    """serve: an HTTP translation server (batching across requests, limits, follows a registry alias)."""
    parser = argparse.ArgumentParser(prog="automoe serve", description=main.__doc__)
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS (followed), models:/NAME/VERSION or a model folder"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=5001)
    limits, batching = Limits.from_env(), BatchConfig.from_env()  # the defaults: environment, else built in
    parser.add_argument("--max-lines", type=int, default=limits.max_lines, help="lines per request")
    parser.add_argument("--max-chars", type=int, default=limits.max_chars, help="characters per line")
    parser.add_argument(
        "--no-truncate",
        action="store_true",
        default=not limits.truncate,
        help="refuse lines longer than the model's source length instead of cutting them (cut lines are reported)",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=batching.max_wait_ms, help="a lone request's wait")
    parser.add_argument("--batch-lines", type=int, default=batching.max_lines, help="lines decoded together at most")
    parser.add_argument(
        "--workers", type=int, default=batching.workers, help="batches decoded at once (0: one per core on the CPU)"
    )
    parser.add_argument(
        "--follow", type=float, default=30.0, metavar="SECONDS",
        help="how often to ask the registry where the alias points (0: never; only for models:/NAME@ALIAS)",
    )  # fmt: skip
    parser.add_argument("--precision", choices=("fp32", "int8", "fp16", "bf16"), default="fp32", help="folders only")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="folders only")
    args = parser.parse_args(argv)
    try:
        limits = Limits(args.max_lines, args.max_chars, truncate=not args.no_truncate)
        batching = BatchConfig(args.batch_wait_ms, args.batch_lines, args.workers)
        decode = DecodeConfig(precision=args.precision, device=args.device)
    except ValueError as e:
        raise AutomoeError(f"serve: {e}") from None
    if not 0 < args.port < 65536:
        raise AutomoeError(f"serve --port: {args.port} is not a port")
    server = TranslationServer(args.model, limits, batching, decode, args.follow)
    server.start_following()
    import uvicorn

    what = server.served.label if server.served else f"(waiting for {args.model})"
    log(f"{what} on http://{args.host}:{args.port} (limits {limits}; batching {batching})")
    try:
        uvicorn.run(app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.stop()
