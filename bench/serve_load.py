"""Serving under load: requests/s, sentences/s and latency percentiles at concurrency 1, 4, 16
and 64, against the same model's offline batched throughput on the same sentences, in one run.

    python bench/serve_load.py [--model models/retrain/searched] [--data data/prepared] [--json out.json]

Each request carries 1-4 test sentences (seeded). Servers, one at a time, on 127.0.0.1:
  unbatched   `automoe serve --batch-lines 1 --batch-wait-ms 0 --workers 1`: each request
              decoded alone on all cores (what `mlflow models serve` of the registered model
              did before batching)
  batched     `automoe serve` with its defaults (batching across requests, 5 ms wait)
  mlflow      `mlflow models serve` of the same model saved as the registered pyfunc (which
              batches too), to choose between the two servers by measurement
The offline figure is `Translator.translate` over every sentence the concurrency-16 level
sends, in this process before any server starts. The load generator shares the 2 cores with
the server, as a client on the same host would.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {1: 40, 4: 80, 16: 200, 64: 400}  # concurrency -> requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(sentences: list[str], count: int, rng: np.random.Generator) -> list[list[str]]:
    out = []
    for _ in range(count):
        start = int(rng.integers(0, len(sentences) - 4))
        out.append(sentences[start : start + int(rng.integers(1, 5))])
    return out


def post(conn: http.client.HTTPConnection, lines: list[str]) -> tuple[int, list]:
    conn.request("POST", "/invocations", json.dumps({"inputs": lines}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    return resp.status, body.get("predictions", [])


def cpu_seconds(pgid: int) -> float:
    """User + system CPU time so far of a process group (`mlflow models serve` runs uvicorn as a child)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # the process group
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def load(port: int, requests: list[list[str]], concurrency: int, server_pid: int) -> dict[str, float]:
    """`concurrency` clients, each on its own keep-alive connection, send the requests in turn."""
    todo = list(enumerate(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    failed = [0]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                if not todo:
                    break
                _, lines = todo.pop()
            t0 = time.perf_counter()
            try:
                status, predictions = post(conn, lines)
                ok = status == 200 and len(predictions) == len(lines)
            except (OSError, http.client.HTTPException, ValueError):
                ok, conn = False, http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            with lock:
                latencies.append(time.perf_counter() - t0)
                failed[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    cpu0, client0 = cpu_seconds(server_pid), time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - cpu0, time.process_time() - client0
    ms = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {
        "requests": len(requests),
        "failed": failed[0],
        "requests_per_s": len(requests) / wall,
        "sentences_per_s": sum(map(len, requests)) / wall,
        "p50_ms": float(ms[0]),
        "p95_ms": float(ms[1]),
        "p99_ms": float(ms[2]),
        "server_cores": server_cpu / wall,  # CPU time over wall time: how busy the server kept the cores
        "client_cores": client_cpu / wall,
    }


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, AUTOMOE_TRACKING="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{cmd[0]} exited: {log.read_text()[-2000:]}"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            status, predictions = post(conn, ["A dog runs through the snow."])
            if status == 200 and predictions[0]:
                return proc
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{cmd[0]} did not answer within 300 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/retrain/searched", help="a retrain output folder")
    parser.add_argument("--data", default="data/prepared", help="prepare_data output (its test sentences)")
    parser.add_argument("--servers", default="unbatched,batched,mlflow")
    parser.add_argument("--json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import setup

    from automoe.serving import Translator

    threads = setup()
    sentences = [s for s in (Path(args.data) / "test.src.txt").read_text().splitlines() if s.strip()]
    rng = np.random.default_rng(0)
    plan = {c: requests_for(sentences, n, rng) for c, n in LEVELS.items()}

    translator = Translator.from_folder(args.model)
    offline_lines = [s for r in plan[16] for s in r]
    translator.translate(offline_lines[:64])  # warm-up
    t0 = time.perf_counter()
    translator.translate(offline_lines)
    offline = len(offline_lines) / (time.perf_counter() - t0)
    del translator
    print(f"offline batched: {offline:.1f} sentences/s ({len(offline_lines)} sentences, {threads} threads)")

    results: dict = {"offline_sentences_per_s": offline, "threads": threads}
    serve = [sys.executable, "-m", "automoe.cli", "serve", "--model", args.model, "--host", "127.0.0.1"]
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "unbatched": [*serve, "--batch-lines", "1", "--batch-wait-ms", "0", "--workers", "1"],
            "batched": serve,
        }
        if "mlflow" in args.servers:
            from automoe import tracking

            saved = tracking.save_translator(Path(args.model), Path(tmp) / "pyfunc")
            mlflow_bin = str(Path(sys.executable).parent / "mlflow")
            variants["mlflow"] = [mlflow_bin, "models", "serve", "-m", str(saved), "--env-manager", "local"]
            variants["mlflow"] += ["-h", "127.0.0.1", "--workers", "1"]
        for name in args.servers.split(","):
            port = free_port()
            proc = start([*variants[name], "--port" if name != "mlflow" else "-p", str(port)], port, Path(tmp) / name)
            try:
                for c in LEVELS:
                    load(port, plan[c][: max(4, c)], c, proc.pid)  # warm the connections and the batcher
                    r = results[f"{name}_c{c}"] = load(port, plan[c], c, proc.pid)
                    print(
                        f"{name:>9} c={c:<3} {r['requests_per_s']:6.1f} req/s {r['sentences_per_s']:6.1f} sent/s "
                        f"p50 {r['p50_ms']:7.1f} p95 {r['p95_ms']:7.1f} p99 {r['p99_ms']:7.1f} ms failed {r['failed']} "
                        f" cores: server {r['server_cores']:.2f} client {r['client_cores']:.2f}"
                    )
            finally:
                stop(proc)
    if "batched_c16" in results:
        results["served_over_offline_c16"] = results["batched_c16"]["sentences_per_s"] / offline
    if "batched_c1" in results and "unbatched_c1" in results:
        results["p50_c1_batched_over_unbatched"] = results["batched_c1"]["p50_ms"] / results["unbatched_c1"]["p50_ms"]
    if "mlflow_c16" in results:
        results["mlflow_served_over_offline_c16"] = results["mlflow_c16"]["sentences_per_s"] / offline
    results["failed"] = sum(v["failed"] for k, v in results.items() if isinstance(v, dict))
    for key in ("served_over_offline_c16", "p50_c1_batched_over_unbatched", "mlflow_served_over_offline_c16"):
        if key in results:
            print(f"{key}: {results[key]:.3f}")
    print(f"failed requests: {results['failed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
