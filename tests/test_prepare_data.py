import gzip
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import paths_overrides, read_gz_lines, subprocess_env

from automoe.data.dataset import PreparedData
from automoe.stages import prepare_data


def run_cli(args, capsys):
    rc = prepare_data.main(args)
    return rc, capsys.readouterr().err


def assert_clean_failure(rc, err, out, needle):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp output left behind"


def test_multi30k_slice(multi30k, tmp_path, capsys):
    out = tmp_path / "prepared"
    rc, err = run_cli(
        [
            "--out",
            str(out),
            "--set",
            "prepare_data.max_train_pairs=2000",
            "--set",
            "prepare_data.vocab_size=2000",
            "--set",
            f"prepare_data.mirror={multi30k}",
        ],
        capsys,
    )
    assert rc == 0, err
    data = PreparedData.open(out)
    m = data.manifest
    assert m["counts"]["train"]["raw"] == 2000
    assert m["counts"]["train"]["kept"] + sum(m["drops"].values()) == 2000
    assert m["counts"]["valid"] == {"raw": 1014, "kept": 1014}
    assert m["counts"]["test"] == {"raw": 1000, "kept": 1000}
    assert m["vocab_size"] == 2000
    assert all(len(v["sha256"]) == 64 for v in m["files"].values()) and len(m["files"]) == 6
    assert set(m["timings_s"]) >= {"read", "sentencepiece", "encode", "total"}

    # token arrays are the SentencePiece encoding of the cleaned text, EOS-terminated
    sp = data.sentencepiece()
    test = data.split("test")
    refs = data.raw_lines("test", "tgt")
    assert refs[:3] == read_gz_lines(multi30k / "test_2016_flickr.de.gz", 3)
    for i in (0, 17, 999):
        ids = test.tgt[i].tolist()
        assert ids[-1] == 3 and 3 not in ids[:-1]
        assert sp.decode(ids[:-1]) == refs[i]  # SentencePiece round trip on real text
    assert len(test) == 1000 and test.src.tokens.dtype == np.uint16


def test_sentencepiece_round_trip_of_unseen_text(small_corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    rc, err = run_cli(["--out", str(out), *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]], capsys)
    assert rc == 0, err
    sp = PreparedData.open(out).sentencepiece()
    text = "A man in a blue shirt is standing on a ladder."
    assert sp.decode(sp.encode(text)) == text
    assert sp.pad_id() == 0 and sp.unk_id() == 1 and sp.bos_id() == 2 and sp.eos_id() == 3


def test_cleaning_counts_drops_per_reason(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    src = ["a cat", "", "a cat", "x " * 200, "short", "the dog runs", "Caf\u0065\u0301 ok  "]
    tgt = [
        "eine Katze",
        "leer",
        "eine Katze",
        "y",
        "ein sehr sehr sehr langer langer Satz hier jetzt",
        "der Hund",
        "ein Kaffee ok",
    ]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.en").write_text("\n".join(src) + "\n")
        (folder / f"{split}.de").write_text("\n".join(tgt) + "\n")
    out = tmp_path / "p"
    args = [
        "--out",
        str(out),
        "--set",
        "prepare_data.dedupe=true",
        "--set",
        "prepare_data.max_len=80",
        "--set",
        "prepare_data.max_len_ratio=2.5",
    ]
    rc, err = run_cli(args + [a for o in paths_overrides(str(folder), vocab=40) for a in ("--set", o)], capsys)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["drops"]["empty"] == 1 and m["drops"]["duplicate"] == 1 and m["drops"]["too_long"] == 1
    assert m["drops"]["length_ratio"] >= 1
    assert m["counts"]["train"]["kept"] == 7 - sum(m["drops"].values())
    assert m["counts"]["valid"]["kept"] == 7  # valid/test are never filtered
    assert "Caf\u00e9 ok" in (out / "train.src.txt").read_text()  # NFC + strip


def _corpus(tmp_path, src_lines, tgt_lines):
    folder = tmp_path / "bad"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.en").write_bytes(src_lines)
        (folder / f"{split}.de").write_bytes(tgt_lines)
    return str(folder)


@pytest.mark.parametrize(
    "src, tgt, needle",
    [
        (b"a\nb\nc\n", b"a\nb\n", "train.en has 3 lines but"),
        (b"ok\nbad \xff byte\n", b"gut\nschlecht\n", "train.en: line 2: invalid UTF-8"),
        (b"", b"", "train.en: empty corpus"),
        (b"\n\n", b"\n\n", "empty corpus (no training pairs left"),
    ],
)
def test_bad_corpus(tmp_path, capsys, src, tgt, needle):
    folder = _corpus(tmp_path, src, tgt)
    out = tmp_path / "out"
    rc, err = run_cli(["--out", str(out), *[a for o in paths_overrides(folder) for a in ("--set", o)]], capsys)
    assert_clean_failure(rc, err, out, needle)


def test_checksum_mismatch(multi30k, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    shutil.copytree(multi30k, mirror)
    lines = gzip.decompress((mirror / "val.de.gz").read_bytes()).replace(b"Hund", b"Katze", 1)
    (mirror / "val.de.gz").write_bytes(gzip.compress(lines))
    out = tmp_path / "out"
    rc, err = run_cli(["--out", str(out), "--set", f"prepare_data.mirror={mirror}"], capsys)
    assert_clean_failure(rc, err, out, "val.de.gz: SHA-256 mismatch")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["prepare_data.source=ftp"], "prepare_data.source: expected one of 'multi30k', 'paths', got 'ftp'"),
        (
            [
                "prepare_data.source=paths",
                "prepare_data.paths.train=ftp://h/x.{lang}",
                "prepare_data.paths.valid=v.{lang}",
                "prepare_data.paths.test=t.{lang}",
            ],
            "unknown source scheme",
        ),
        (["prepare_data.source=paths"], "prepare_data.paths.train: expected a path template"),
        (["prepare_data.mirror=/nonexistent/mirror"], "prepare_data.mirror: /nonexistent/mirror: folder not found"),
        (["prepare_data.src_lang=xx"], "multi30k: no train file for language 'xx'"),
    ],
)
def test_bad_source(tmp_path, capsys, overrides, needle):
    out = tmp_path / "out"
    rc, err = run_cli(["--out", str(out), *[a for o in overrides for a in ("--set", o)]], capsys)
    assert_clean_failure(rc, err, out, needle)


def test_missing_local_file(small_corpus, tmp_path, capsys):
    (tmp_path / "corpus" / "test.de").unlink()
    out = tmp_path / "out"
    rc, err = run_cli(["--out", str(out), *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]], capsys)
    assert_clean_failure(rc, err, out, "test.de: file not found")


def test_unwritable_output(small_corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "prepared"
    rc, err = run_cli(["--out", str(out), *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]], capsys)
    assert rc == 2 and err.strip().startswith(f"error: {out}: cannot write output folder"), err
    assert blocker.read_text() == "not a folder"


def test_failure_keeps_previous_output(small_corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    overrides = [a for o in paths_overrides(small_corpus) for a in ("--set", o)]
    assert run_cli(["--out", str(out), *overrides], capsys)[0] == 0
    before = (out / "manifest.json").read_text()
    (tmp_path / "corpus" / "valid.de").write_text("only one line\n")
    rc, err = run_cli(["--out", str(out), *overrides], capsys)
    assert rc == 2 and "misaligned" in err
    assert (out / "manifest.json").read_text() == before


def test_cli_exit_status_and_one_line_error(small_corpus, tmp_path):
    (tmp_path / "corpus" / "train.de").write_text("x\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "automoe.cli", "prepare_data", "--out", str(out)]
    cmd += [a for o in paths_overrides(small_corpus) for a in ("--set", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "misaligned corpus" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_http_source_from_a_local_server(small_corpus, tmp_path, capsys):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=small_corpus)
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        sets = [f"prepare_data.paths.{s}={base}/{s}.{{lang}}" for s in ("train", "valid", "test")]
        args = ["--out", str(tmp_path / "web"), *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]]
        args += [a for o in sets for a in ("--set", o)]
        rc, err = run_cli(args, capsys)
        assert rc == 0, err
        local = tmp_path / "local"
        assert (
            run_cli(["--out", str(local), *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]], capsys)[0]
            == 0
        )
        web = PreparedData.open(tmp_path / "web").manifest
        assert web["data_sha256"] == PreparedData.open(local).manifest["data_sha256"]
        missing = [f"prepare_data.paths.test={base}/nope.{{lang}}"]
        rc, err = run_cli(args + [a for o in missing for a in ("--set", o)], capsys)
        assert rc == 2 and "nope.en: HTTP 404" in err
    finally:
        server.shutdown()


def test_credentials_in_url_inputs_are_used_but_never_recorded(small_corpus, tmp_path, capsys, monkeypatch):
    """A corpus behind HTTP basic auth (`user:token@host`) with a signed query string: it is
    downloaded with the credential, and neither the token nor the signature reaches MLflow's
    params and run names, the manifest, or the error line of a failed download."""
    import base64
    import functools
    import http.server
    import threading

    token, signature = "s3cret-T0KEN", "SIG-abc123"
    expected = "Basic " + base64.b64encode(f"reader:{token}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return
            super().do_GET()

        def log_message(self, *args, **kwargs):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=small_corpus))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("AUTOMOE_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        port = server.server_address[1]
        signed = f"?X-Amz-Credential=AKIA1&X-Amz-Signature={signature}"
        sets = [f"prepare_data.paths.{s}=http://reader:{token}@127.0.0.1:{port}/{s}.{{lang}}{signed}" for s in
                ("train", "valid", "test")]  # fmt: skip
        args = ["--out", str(tmp_path / "web"), *[a for o in paths_overrides(small_corpus) for a in ("--set", o)]]
        args += [a for o in sets for a in ("--set", o)]
        rc, err = run_cli(args, capsys)
        assert rc == 0, err
        wrong = [f"prepare_data.paths.test=http://reader:wrong-{token}@127.0.0.1:{port}/test.{{lang}}{signed}"]
        rc, failed = run_cli(args[:1] + [str(tmp_path / "denied")] + args[2:] + ["--set", wrong[0]], capsys)
        assert rc == 2 and "HTTP 401" in failed and f"http://***@127.0.0.1:{port}/test.en?" in failed, failed
    finally:
        server.shutdown()
    manifest = (tmp_path / "web" / "manifest.json").read_text()
    assert f"http://***@127.0.0.1:{port}/train.en?X-Amz-Credential=***&X-Amz-Signature=***" in manifest
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("automoe").experiment_id])
    recorded = [json.dumps(r.data.params) + json.dumps(r.data.tags) for r in runs]
    assert sum(f"http://***@127.0.0.1:{port}/train.{{lang}}?X-Amz" in text for text in recorded) == 2  # both runs
    for text in [manifest, err, failed, *recorded]:
        assert token not in text and signature not in text and "AKIA1" not in text
