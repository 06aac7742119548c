"""Serving: batching across requests, request limits, and `automoe serve` over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import read_gz_lines, subprocess_env
from servers import free_port, stop, wait_http
from test_inference import make_model_folder

from automoe.serving import BatchConfig, Batcher, DecodeConfig, Limits, RequestError, Translator

LONG = "A dog runs through the snow and a man in a red hat watches it. " * 30  # > 256 tokens, < 2,000 characters


@pytest.fixture(scope="module")
def folder(multi30k, tmp_path_factory):
    """A retrain-style folder (a dense model over a real vocabulary), and 40 Multi30k test sentences."""
    return make_model_folder(multi30k, tmp_path_factory.mktemp("serve")), read_gz_lines(
        multi30k / "test_2016_flickr.en.gz", 40
    )


@pytest.fixture(scope="module")
def translator(folder):
    return Translator.from_folder(folder[0])


def requests_of(lines: list[str], sizes=(1, 3, 2, 4, 1, 2, 3, 1, 4, 2, 1, 3)) -> list[list[str]]:
    out, start = [], 0
    for n in sizes:
        out.append(lines[start : start + n])
        start += n
    return out


# -- batching -----------------------------------------------------------------------------------


def test_requests_queued_together_are_decoded_in_one_batch(translator, folder):
    """While the first request decodes, eleven more queue; they go into the next batch
    together, and each caller gets the translations of its own lines, in order."""
    requests = requests_of(folder[1])
    started, release = threading.Event(), threading.Event()
    calls = []

    def decode(sources):
        calls.append(len(sources))
        if len(calls) == 1:
            started.set()
            assert release.wait(60)
        return translator.translate_ids(sources)

    batcher = Batcher(decode, BatchConfig(max_wait_ms=0, max_lines=128, workers=1))
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            first = pool.submit(translator.translate_reporting, requests[0], batcher.translate_ids)
            assert started.wait(60)
            rest = [pool.submit(translator.translate_reporting, r, batcher.translate_ids) for r in requests[1:]]
            while batcher._queue.qsize() < len(rest):  # all eleven queued
                time.sleep(0.01)
            release.set()
            got = [first.result(60)[0]] + [f.result(60)[0] for f in rest]
    finally:
        batcher.close()
    assert calls == [len(requests[0]), sum(map(len, requests[1:]))]
    assert (batcher.batches, batcher.requests) == (2, len(requests))
    # the second batch is one decode of all its lines: each caller got its own share of it
    together = translator.translate([line for r in requests[1:] for line in r])
    expected = [translator.translate(requests[0])]
    start = 0
    for r in requests[1:]:
        expected.append(together[start : start + len(r)])
        start += len(r)
    assert got == expected


def test_workers_decode_batches_at_once_and_leave_a_share_to_each_other(translator, folder):
    """Two workers: with requests queued, each takes a share and both decode at the same time."""
    both = threading.Barrier(2, timeout=60)
    seen = []

    def decode(sources):
        seen.append(len(sources))
        both.wait()  # returns only when the other worker decodes too
        return translator.translate_ids(sources)

    batcher = Batcher(decode, BatchConfig(max_wait_ms=0, workers=2))
    assert (batcher.workers, batcher.threads) == (2, max(1, __import__("torch").get_num_threads() // 2))
    lines = folder[1][:2]
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(batcher.translate_ids, translator.encode([line])) for line in lines]
            got = [f.result(60) for f in futures]
    finally:
        batcher.close()
    assert sorted(seen) == [1, 1] and all(len(g) == 1 and g[0] for g in got)


def test_a_lone_request_does_not_wait_for_company(translator):
    batcher = Batcher(translator.translate_ids, BatchConfig(max_wait_ms=600_000, workers=1))
    try:
        t0 = time.monotonic()
        for _ in range(3):
            batcher.translate_ids(translator.encode(["A dog runs."]))
        assert time.monotonic() - t0 < 300  # far below the 600 s the batch could have waited
    finally:
        batcher.close()


def test_a_failing_batch_fails_each_of_its_callers_and_serving_goes_on(translator):
    fail = threading.Event()
    fail.set()

    def decode(sources):
        if fail.is_set():
            raise RuntimeError("decoder broke")
        return translator.translate_ids(sources)

    batcher = Batcher(decode, BatchConfig(workers=1))
    try:
        with pytest.raises(RuntimeError, match="decoder broke"):
            batcher.translate_ids(translator.encode(["A dog runs."]))
        fail.clear()
        assert batcher.translate_ids(translator.encode(["A dog runs."]))[0]
    finally:
        batcher.close()


def test_closing_finishes_what_is_queued(translator):
    batcher = Batcher(translator.translate_ids, BatchConfig(workers=2))
    futures = [batcher.submit(translator.encode(["A dog runs.", "Two men."])) for _ in range(6)]
    batcher.close()
    assert all(len(f.result(0)) == 2 for f in futures)
    assert not any(t.is_alive() for t in batcher._threads)


# -- limits, blank lines, truncation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "status", "message"),
    [
        ("A dog.", 400, "expected a list of strings, got str"),
        ({"text": "A dog."}, 400, "expected a list of strings, got dict"),
        ([], 400, "an empty list"),
        (["A dog."] * 5, 413, "5 lines, over the limit of 4 per request"),
        (["A dog.", 3], 400, "inputs[1]: expected a string, got int 3"),
        ([None], 400, "inputs[0]: expected a string, got NoneType"),
        (["A dog.", "x" * 101], 413, "inputs[1]: 101 characters, over the limit of 100"),
    ],
)
def test_limits_refuse_bad_requests_naming_the_input_and_the_limit(lines, status, message):
    with pytest.raises(RequestError) as info:
        Limits(max_lines=4, max_chars=100).check(lines)
    assert info.value.status == status and message in str(info.value)
    assert Limits(max_lines=4, max_chars=100).check(["A dog.", "x" * 100]) == ["A dog.", "x" * 100]


def test_blank_lines_translate_to_blank_lines_and_cut_lines_are_reported(folder):
    translator = Translator.from_folder(folder[0], DecodeConfig(max_source_len=8))
    lines = ["A dog runs.", "", "   ", LONG]
    out, cut = translator.translate_reporting(lines)
    assert out[1:3] == ["", ""] and out[0] and out[3] and cut == [3]
    assert translator.translate(lines) == out


@pytest.mark.parametrize("name", ["AUTOMOE_SERVE_MAX_LINES", "AUTOMOE_SERVE_BATCH_WAIT_MS"])
def test_serving_settings_from_the_environment_are_checked(monkeypatch, name):
    from automoe.errors import AutomoeError

    monkeypatch.setenv(name, "many")
    with pytest.raises(AutomoeError, match=name):
        Limits.from_env() if "LINES" in name else BatchConfig.from_env()
    monkeypatch.setenv(name, "7")
    assert (Limits.from_env().max_lines if "LINES" in name else BatchConfig.from_env().max_wait_ms) == 7


def test_the_server_refuses_a_long_line_when_truncation_is_off(folder):
    from automoe.server import TranslationServer

    limits = Limits(max_lines=4, max_chars=2000, truncate=False)
    server = TranslationServer(str(folder[0]), limits, BatchConfig(workers=1), DecodeConfig(), follow_s=0)
    try:
        with pytest.raises(RequestError, match=r"inputs\[1\]: longer than the model's 256 source tokens") as info:
            asyncio.run(server.translate(["A dog.", LONG]))
        assert info.value.status == 413
        assert asyncio.run(server.translate(["A dog."]))["truncated"] == []
    finally:
        server.stop()


# -- automoe serve over HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(folder, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [sys.executable, "-m", "automoe.cli", "serve", "--model", str(folder[0]), "--port", str(port)]
    cmd += ["--max-lines", "4", "--max-chars", "2000"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
    assert "serve: " in log.read_text() and " on http://127.0.0.1:" in log.read_text()


def call(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 - loopback only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_translates_as_the_translator_does(served, translator, folder):
    lines = folder[1][:3]
    expected = translator.translate(lines)
    status, body = call(f"{served}/invocations", json.dumps({"inputs": lines}).encode())
    assert status == 200 and body["predictions"] == expected and body["truncated"] == []
    assert body["model"] == str(folder[0])
    split = {"dataframe_split": {"columns": ["id", "text"], "data": [[i, s] for i, s in enumerate(lines)]}}
    assert call(f"{served}/invocations", json.dumps(split).encode())[1]["predictions"] == expected
    records = {"dataframe_records": [{"text": s} for s in lines]}
    assert call(f"{served}/invocations", json.dumps(records).encode())[1]["predictions"] == expected
    status, body = call(f"{served}/invocations", json.dumps({"instances": ["", LONG]}).encode())
    assert status == 200 and body["predictions"][0] == "" and body["predictions"][1] and body["truncated"] == [1]
    status, ready = call(f"{served}/ready")
    assert status == 200 and ready["translation"] == translator.translate(["A man is riding a bike."])[0]
    assert call(f"{served}/version")[1] == {"model": str(folder[0]), "version": None, "uri": str(folder[0])}


def test_the_server_answers_concurrent_requests(served, folder):
    requests = requests_of(folder[1]) * 3
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: call(f"{served}/invocations", json.dumps({"inputs": r}).encode()), requests))
    assert [status for status, _ in answers] == [200] * len(requests)
    assert [len(body["predictions"]) for _, body in answers] == [len(r) for r in requests]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b'{"inputs": ["A dog."', "application/json", 400, "body: not valid JSON"),
        (b'{"inputs": ["\xff"]}', "application/json", 400, "body: not valid UTF-8"),
        (b'{"inputs": ["A dog."]}', "text/plain", 415, "Content-Type 'text/plain': send application/json"),
        (b'{"text": ["A dog."]}', "application/json", 400, "expected exactly one of inputs, instances"),
        (b'["A dog."]', "application/json", 400, "expected a JSON object"),
        (b'{"inputs": []}', "application/json", 400, "an empty list"),
        (b'{"inputs": [3]}', "application/json", 400, "inputs[0]: expected a string, got int 3"),
        (b'{"inputs": "A dog."}', "application/json", 400, "expected a list of strings, got str"),
        (b'{"inputs": ["a", "b", "c", "d", "e"]}', "application/json", 413, "over the limit of 4 per request"),
        (json.dumps({"inputs": ["x" * 2001]}).encode(), "application/json", 413, "2001 characters, over the limit"),
        (json.dumps({"inputs": ["x" * 200_000]}).encode(), "application/json", 413, "bytes, over the limit"),
        (b'{"dataframe_split": {"columns": ["t"], "data": [["a"]]}}', "application/json", 400, "dataframe_split"),
        (b'{"dataframe_records": [{"t": "a"}]}', "application/json", 400, "a 'text' key"),
    ],
)
def test_the_server_answers_bad_requests_with_a_4xx_that_says_why(served, body, content_type, status, message):
    got, answer = call(f"{served}/invocations", body, content_type)
    assert got == status and message in answer["message"], answer


def test_serve_refuses_a_model_that_is_not_there(tmp_path):
    cmd = [sys.executable, "-m", "automoe.cli", "serve", "--model", str(tmp_path / "nowhere")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "nowhere: neither models:/NAME@ALIAS nor a model folder" in proc.stderr


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_two_workers_decode_what_one_thread_decodes(folder, path):
    """Two batches decoding at once on one model (each worker on its own thread, the
    compiled engine or the Python path) give the tokens each gives alone."""
    translator = Translator.from_folder(folder[0])
    if path == "python":
        translator.model.compiled = None
    batches = [translator.encode(r) for r in requests_of(folder[1])[:6]]
    alone = [translator.translate_ids(b) for b in batches]
    batcher = Batcher(translator.translate_ids, BatchConfig(max_wait_ms=0, workers=2))
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(3):
                assert list(pool.map(batcher.translate_ids, batches)) == alone
    finally:
        batcher.close()


def test_a_request_goes_to_the_version_that_serves_when_the_old_one_closes(folder):
    """The alias moved while a request was between choosing a version and queueing on it:
    the old version's batcher refuses it and the new version answers; a stopped server
    answers 503 instead of waiting forever."""
    from automoe.server import TranslationServer
    from automoe.serving import BatcherClosed

    server = TranslationServer(str(folder[0]), Limits(), BatchConfig(workers=1), DecodeConfig(), follow_s=0)
    old = server.served
    new = server._load(None)

    class Switching:  # what the request reads first, then the version that took over
        reads = 0

    original = type(server)

    class Racing(original):
        @property
        def served(self):
            Switching.reads += 1
            return old if Switching.reads == 1 else new

        @served.setter
        def served(self, value):
            pass

    server.__class__ = Racing
    old.batcher.close()
    with pytest.raises(BatcherClosed):
        old.batcher.submit(old.translator.encode(["A dog."]))
    result = asyncio.run(server.translate(["A dog runs."]))
    assert result["predictions"] == old.translator.translate(["A dog runs."])
    assert Switching.reads == 3  # the old version, the check that another took over, the new one
    server.__class__ = original
    server.served = new
    server.stop()
    with pytest.raises(RequestError, match="shutting down") as info:
        asyncio.run(server.translate(["A dog runs."]))
    assert info.value.status == 503
