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
        "--set",
        "prepare_data.keep_train_text=true",
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


# --- streaming at scale: equal to the in-memory algorithm it replaced; bad large inputs ---


def _in_memory_prepare(train, valid, test, out, vocab, max_len, max_ratio):
    """The algorithm prepare_data ran before it streamed (whole corpus in Python lists,
    exact dedupe, every sentence to SentencePiece in one thread): the oracle."""
    import io
    import unicodedata

    import sentencepiece as spm

    def lines(blob):
        raw = blob.split(b"\n")
        if raw and raw[-1] == b"":
            raw.pop()
        return [unicodedata.normalize("NFC", r.decode("utf-8")).strip() for r in raw]

    src, tgt, seen = [], [], set()
    for s, t in zip(*(lines(b) for b in train), strict=True):
        if s and t and (s, t) not in seen:
            seen.add((s, t))
            src.append(s)
            tgt.append(t)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(src + tgt),
        model_writer=model,
        vocab_size=vocab,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    out.mkdir()
    (out / "spm.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    for split, (s_lines, t_lines) in (("train", (src, tgt)), ("valid", map(lines, valid)), ("test", map(lines, test))):
        s_ids, t_ids = ([x + [3] for x in sp.encode(side)] for side in (s_lines, t_lines))
        keep = range(len(s_ids))
        if split == "train":
            keep = [
                i
                for i, (a, b) in enumerate(zip(s_ids, t_ids, strict=True))
                if len(a) <= max_len and len(b) <= max_len and max(len(a), len(b)) <= max_ratio * min(len(a), len(b))
            ]
        for side, text, ids in (("src", s_lines, s_ids), ("tgt", t_lines, t_ids)):
            (out / f"{split}.{side}.txt").write_text("".join(text[i] + "\n" for i in keep), encoding="utf-8")
            seqs = [ids[i] for i in keep]
            np.save(out / f"{split}.{side}.tokens.npy", np.array([t for q in seqs for t in q], dtype=np.uint16))
            np.save(out / f"{split}.{side}.offsets.npy", np.concatenate([[0], np.cumsum([len(q) for q in seqs])]))


def _wmt_like(multi30k, folder, pairs):
    """Multi30k lines with repeats and empty lines mixed in, the training split in two
    files (one gzip, one plain) as WMT's several corpora are."""
    folder.mkdir()
    src = read_gz_lines(multi30k / "train.en.gz", pairs)
    tgt = read_gz_lines(multi30k / "train.de.gz", pairs)
    rng = np.random.default_rng(0)
    for i in rng.choice(pairs, size=pairs // 10, replace=False):  # repeats of earlier pairs
        src.append(src[i])
        tgt.append(tgt[i])
    src[5], tgt[9] = "", "   "
    half = len(src) // 2
    for lang, side in (("en", src), ("de", tgt)):
        (folder / f"a.{lang}.gz").write_bytes(gzip.compress(("\n".join(side[:half]) + "\n").encode()))
        (folder / f"b.{lang}").write_text("\n".join(side[half:]) + "\n", encoding="utf-8")
        for split, name in (("valid", "val"), ("test", "test_2016_flickr")):
            text = "\n".join(read_gz_lines(multi30k / f"{name}.{lang}.gz", 200)) + "\n"
            (folder / f"{split}.{lang}").write_text(text, encoding="utf-8")
    return {
        "source": "paths",
        "paths": {
            "train": [f"{folder}/a.{{lang}}.gz", f"{folder}/b.{{lang}}"],
            "valid": f"{folder}/valid.{{lang}}",
            "test": f"{folder}/test.{{lang}}",
        },
        "dedupe": True,
        "vocab_size": 600,
        "max_len": 24,
        "max_len_ratio": 2.0,
    }


def test_streaming_output_equals_the_in_memory_algorithm_byte_for_byte(multi30k, tmp_path, monkeypatch):
    """Chunked encoding in 2 worker processes, two training files, dedupe by hash and a
    SentencePiece sample at least the corpus' size give the files the old code wrote."""
    section = _wmt_like(multi30k, tmp_path / "c", 4000)
    monkeypatch.setattr(prepare_data, "CHUNK_PAIRS", 700)  # several chunks in flight
    cfg = prepare_data.load_config(
        {"prepare_data": {**section, "num_workers": 2, "keep_train_text": True, "spm_input_sentence_size": 8800}}
    )
    out = tmp_path / "streamed"
    prepare_data.run(cfg, None, out)
    c = tmp_path / "c"
    train = [(c / f"a.{lang}.gz").read_bytes() for lang in ("en", "de")]
    train = [gzip.decompress(a) + (c / f"b.{lang}").read_bytes() for a, lang in zip(train, ("en", "de"), strict=True)]
    split = [[(c / f"{s}.{lang}").read_bytes() for lang in ("en", "de")] for s in ("valid", "test")]
    oracle = tmp_path / "oracle"
    _in_memory_prepare(train, *split, oracle, vocab=600, max_len=24, max_ratio=2.0)

    m = PreparedData.open(out).manifest
    assert m["drops"]["duplicate"] >= 390 and m["drops"]["empty"] == 2 and m["drops"]["too_long"] > 0
    assert m["counts"]["train"]["raw"] == 4400 and m["encode_workers"] == 2
    cleaned = 4400 - m["drops"]["duplicate"] - m["drops"]["empty"]
    assert m["sentencepiece_sample"]["sentences"] == m["sentencepiece_sample"]["of"] == 2 * cleaned
    assert len(m["files"]) == 8  # every file of every split, hashed
    written = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert written == sorted(p.name for p in oracle.iterdir())
    for name in written:
        assert (out / name).read_bytes() == (oracle / name).read_bytes(), name


def test_sentencepiece_learns_from_a_seeded_sample_and_training_text_is_left_out(multi30k, tmp_path):
    section = _wmt_like(multi30k, tmp_path / "c", 3000)
    params = {"prepare_data": {**section, "num_workers": 1, "spm_input_sentence_size": 1500, "seed": 3}}
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        prepare_data.run(prepare_data.load_config(params), None, out)
    m = PreparedData.open(outs[0]).manifest
    assert m["sentencepiece_sample"] == {
        "sentences": 1500,
        "of": 2 * (3300 - m["drops"]["duplicate"] - m["drops"]["empty"]),
        "seed": 3,
        "num_threads": 1,
        "extremely_large_corpus": False,
    }
    assert (outs[0] / "spm.model").read_bytes() == (outs[1] / "spm.model").read_bytes()  # reproducible
    assert not (outs[0] / "train.src.txt").exists() and m["train_text"] is False
    data = PreparedData.open(outs[0])
    sp, valid = data.sentencepiece(), data.split("valid")
    refs = (outs[0] / "valid.src.txt").read_text(encoding="utf-8").splitlines()
    for i in (0, 99, 199):
        assert valid.src[i].tolist() == sp.encode(refs[i]) + [3]
    with pytest.raises(Exception, match="keep_train_text"):
        data.raw_lines("train", "tgt")


def _template_run(folder, capsys, train_templates, out):
    params = folder / "params.yaml"
    import yaml

    params.write_text(
        yaml.safe_dump(
            {
                "prepare_data": {
                    "source": "paths",
                    "paths": {
                        "train": train_templates,
                        "valid": f"{folder}/v.{{lang}}",
                        "test": f"{folder}/v.{{lang}}",
                    },  # noqa: E501
                    "vocab_size": 60,
                    "num_workers": 1,
                }
            }
        )
    )
    return run_cli(["--out", str(out), "--params", str(params)], capsys)


def _bad_large_corpus(folder, case):
    folder.mkdir()
    lines = [f"sentence number {i} of a large file" for i in range(60_000)]
    for lang in ("en", "de"):
        (folder / f"v.{lang}").write_text("a b\nc d\n")
        (folder / f"ok.{lang}").write_text("\n".join(lines[:500]) + "\n")
        body = ("\n".join(lines) + "\n").encode()
        if case == "utf8" and lang == "de":
            body = body.replace(b"sentence number 45678 ", b"sentence \xc3\x28 number 45678 ")
        if case == "counts" and lang == "de":
            body = body[: body.index(b"sentence number 59990 ")]
        if case == "gzip":
            body = gzip.compress(body)
            body = body[: len(body) // 2] if lang == "en" else body
        (folder / f"big.{lang}").write_bytes(body)


@pytest.mark.parametrize(
    "case, templates, needle",
    [
        ("gzip", ["big.{lang}"], "big.en: corrupt gzip data after line"),
        ("missing", ["ok.{lang}", "nowhere.{lang}"], "nowhere.en: file not found"),
        ("utf8", ["ok.{lang}", "big.{lang}"], "big.de: line 45679: invalid UTF-8 at byte 9"),
        ("counts", ["big.{lang}"], "big.en has 60000 lines but"),
    ],
)
def test_bad_large_inputs_are_one_line_naming_the_file(tmp_path, capsys, case, templates, needle):
    folder = tmp_path / "c"
    _bad_large_corpus(folder, case)
    out = tmp_path / "out"
    rc, err = _template_run(folder, capsys, [f"{folder}/{t}" for t in templates], out)
    assert_clean_failure(rc, err, out, needle)
    if case == "counts":
        assert err.strip().endswith("big.de has 59990: misaligned corpus"), err
