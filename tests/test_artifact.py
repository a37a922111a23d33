"""The packed artifact, run as a user runs it: a subprocess in an empty directory, pgbuild not
importable, scoring real validation shards."""

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import run_artifact

from runtime.data import find_data, load_tokens
from runtime.evaluate import byte_tables, target_bytes, trim_stream


@pytest.fixture
def workdir(tmp_path, artifact):
    """An empty directory holding only a copy of the artifact."""
    shutil.copy(artifact, tmp_path / "artifact.py")
    return tmp_path


def eval_json(workdir, clean_env, data, *extra):
    proc = run_artifact(workdir / "artifact.py", "eval", "--data", data, "--json", *extra, env=clean_env, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pgbuild_is_not_importable_in_the_clean_environment(clean_env, tmp_path):
    for name in ("builder", "runtime"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], env=clean_env, cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode != 0


def test_eval_runs_self_contained_and_reports_bpb(workdir, clean_env, demo_data):
    result = eval_json(workdir, clean_env, demo_data, "--mode", "sliding", "--max-val-tokens", 4000)
    assert result["mode"] == "sliding"
    assert set(result) >= {"val_loss", "val_bpb", "tokens", "bytes", "seconds", "mode"}
    assert result["tokens"] > 3000 and result["bytes"] > result["tokens"]
    assert math.isclose(result["val_bpb"], result["val_loss"] * result["tokens"] / math.log(2) / result["bytes"],
                        rel_tol=1e-9)


@pytest.mark.parametrize("mode, tokens", [("standard", 20000), ("sliding", 6000), ("ttt", 12500), ("lora", 2000)])
def test_eval_estimates_its_time_from_the_first_batch(workdir, clean_env, demo_data, mode, tokens):
    """Before scoring in earnest, one stderr line: the whole evaluation's time, from a timed first
    batch and the steady rate after it; stdout stays the JSON result alone."""
    proc = run_artifact(workdir / "artifact.py", "eval", "--data", demo_data, "--json", "--mode", mode,
                        "--max-val-tokens", tokens, env=clean_env, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    estimate = re.fullmatch(rf"{mode}: about ([\d,]+) s for {result['tokens']:,} tokens \(first batch ([\d.]+) s\)\n",
                            proc.stderr)
    assert estimate, proc.stderr
    assert 0 < float(estimate.group(2)) < result["seconds"]


def test_lora_order_is_the_builds_unless_asked(workdir, clean_env, demo_data):
    """`--lora-order record` reaches the schedule and the result says which ran. On the demo's
    first 2,000 tokens both orders score the same: no phase trains (the record's global SGD skips
    its last ttt_chunk_tokens chunk, here its only one), and the batch order decides no score."""
    runs = {order: eval_json(workdir, clean_env, demo_data, "--mode", "lora", "--max-val-tokens", 2000,
                             *(["--lora-order", order] if order else [])) for order in ("", "record")}
    assert runs[""]["lora_order"] == "stream" and runs["record"]["lora_order"] == "record"
    assert runs[""]["val_bpb"] == runs["record"]["val_bpb"]


def unigram_bpb(layout, sp_vocab, val_tokens, tables):
    """bpb of an add-one unigram model fitted on the training shards: the bar to clear."""
    train = load_tokens(layout, "train")
    counts = np.bincount(train, minlength=sp_vocab).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    nll = -logp[val_tokens[1:].astype(np.int64)]
    return nll.sum() / math.log(2) / target_bytes(val_tokens, tables).sum()


def test_artifact_clearly_beats_a_unigram_model(workdir, clean_env, demo_data):
    import sentencepiece as spm

    layout = find_data(str(demo_data), 1024)
    tables = byte_tables(spm.SentencePieceProcessor(model_file=layout.tokenizer), 1024)
    tokens = trim_stream(load_tokens(layout, "val", 8192), 128)
    baseline = unigram_bpb(layout, 1024, tokens, tables)
    model = eval_json(workdir, clean_env, demo_data, "--mode", "standard", "--max-val-tokens", 8192)
    assert model["val_bpb"] < baseline - 0.8, (model["val_bpb"], baseline)


def test_dump_nll_matches_reported_loss(workdir, clean_env, demo_data):
    dump = workdir / "nll.npy"
    result = eval_json(workdir, clean_env, demo_data, "--mode", "standard", "--max-val-tokens", 3000,
                       "--dump-nll", dump)
    nll = np.load(dump)
    assert nll.shape == (result["tokens"],)
    assert math.isclose(float(nll.astype(np.float64).mean()), result["val_loss"], rel_tol=1e-6)


def test_info_prints_manifest_without_torch(workdir, clean_env):
    proc = run_artifact(workdir / "artifact.py", "info", env=clean_env, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["model"]["vocab_size"] == 1024 and "metrics" in info and "provenance" in info
    assert len(info["tokenizer_sha256"]) == 64


def test_refuses_a_different_tokenizer_unless_forced(workdir, clean_env, demo_data, tmp_path):
    from conftest import FIXTURE

    from builder.data.build import build_dataset

    build_dataset(FIXTURE, 1024, tmp_path / "other", val_docs=40)  # same vocab size, other training docs
    other = tmp_path / "other" / "tokenizer.model"
    assert other.read_bytes() != (demo_data / "tokenizer.model").read_bytes()
    args = ("eval", "--data", demo_data, "--tokenizer", other, "--mode", "standard", "--max-val-tokens", 600)
    refused = run_artifact(workdir / "artifact.py", *args, env=clean_env, cwd=workdir)
    assert refused.returncode != 0 and "SHA-256" in refused.stderr and "Traceback" not in refused.stderr
    forced = run_artifact(workdir / "artifact.py", *args, "--force-tokenizer", env=clean_env, cwd=workdir)
    assert forced.returncode == 0, forced.stderr


def test_unreadable_tokenizer_is_one_line(workdir, clean_env, demo_data, tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    proc = run_artifact(workdir / "artifact.py", "eval", "--data", demo_data, "--tokenizer", bad, "--force-tokenizer",
                        env=clean_env, cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_refuses_a_tokenizer_with_another_vocab(workdir, clean_env, tmp_path):
    from conftest import FIXTURE

    from builder.data.build import build_dataset

    other = tmp_path / "other"
    build_dataset(FIXTURE, 512, other, val_docs=5)
    proc = run_artifact(workdir / "artifact.py", "eval", "--data", other, "--force-tokenizer",
                        env=clean_env, cwd=workdir)
    assert proc.returncode != 0 and "512" in proc.stderr and "Traceback" not in proc.stderr


def _rezip(raw, edit):
    """The same artifact with `edit(name, data) -> data` applied to each member."""
    preamble = raw[:raw.index(b"PK\x03\x04")]
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    out.write(preamble)
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, edit(info.filename, src.read(info.filename)))
    return out.getvalue()


def _damaged_copies(artifact):
    raw = artifact.read_bytes()
    return {
        "truncated": raw[: len(raw) // 2],
        "emptied-zip": raw[: raw.index(b"PK\x03\x04")],
        "empty-file": b"",
        "tampered-weights": _rezip(raw, lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n.startswith("w/tok_emb") else d),
        "tampered-manifest": _rezip(raw, lambda n, d: d.replace(b'"seed":1337', b'"seed":1338')
                                    if n == "manifest.json" else d),
    }


@pytest.mark.parametrize("damage", ["truncated", "emptied-zip", "tampered-weights", "tampered-manifest"])
def test_damaged_artifacts_fail_clearly(artifact, tmp_path, clean_env, demo_data, damage):
    path = tmp_path / "artifact.py"
    path.write_bytes(_damaged_copies(artifact)[damage])
    proc = run_artifact(path, "eval", "--data", demo_data, env=clean_env, cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert "damaged" in proc.stderr or "checksum" in proc.stderr, proc.stderr
    if damage != "truncated":  # a truncated zip is compiled as source: Python quotes the preamble's warning line
        assert_refused(proc)
    else:
        assert proc.returncode != 0


def test_checksums_are_verified_before_anything_runs(artifact, tmp_path, clean_env, demo_data):
    from runtime.artifact import Artifact
    from runtime.errors import PgError

    for damage, raw in _damaged_copies(artifact).items():
        path = tmp_path / f"{damage}.py"
        path.write_bytes(raw)
        with pytest.raises(PgError):
            Artifact(str(path)).verify()


def test_manifest_records_what_the_design_requires(artifact):
    from runtime.artifact import Artifact

    manifest = Artifact(str(artifact)).verify().manifest
    assert manifest["format"] == 1
    assert {"model", "eval", "recipe", "streams", "tensors", "tokenizer_sha256", "provenance",
            "metrics"} <= set(manifest)
    assert {"seed", "steps", "train_seconds", "train_shards"} <= set(manifest["provenance"])
    assert all(s.startswith("fineweb_train_") for s in manifest["provenance"]["train_shards"])
    assert {"prequant_bpb", "standard_bpb", "sliding_bpb", "ttt_bpb"} <= set(manifest["metrics"])
    for stream in manifest["streams"]:
        assert stream["codec"] in ("brotli", "lzma", "rans")


def test_artifact_runs_under_torchrun_like_one_process(workdir, clean_env, demo_data):
    single = eval_json(workdir, clean_env, demo_data, "--mode", "sliding", "--max-val-tokens", 2000)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(workdir / "artifact.py"), "eval", "--data", str(demo_data), "--mode", "sliding",
                           "--max-val-tokens", "2000", "--json"],
                          cwd=workdir, env={**clean_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    double = json.loads(proc.stdout.strip().splitlines()[-1])
    assert double["tokens"] == single["tokens"] and double["bytes"] == single["bytes"]
    assert math.isclose(double["val_bpb"], single["val_bpb"], rel_tol=1e-6)


def test_summary_reports_the_files_real_size(packed):
    # (That the file is within the budget is the pipeline's own refusal: test_budget.py fits
    # tight budgets and checks the refusal when none fits.)
    path, summary = packed
    size = os.path.getsize(path)
    assert summary["bytes"] == size and summary["headroom"] == summary["budget_bytes"] - size


# ----------------------------------------------------------------------------- hostile files and arguments

def _add_members(raw, extra):
    """The artifact with `extra` {name: bytes} appended as further zip members."""
    out = io.BytesIO(raw)
    with zipfile.ZipFile(out, "a") as zf:
        for name, data in extra.items():
            zf.writestr(name, data)
    return out.getvalue()


def _marker_code(marker):
    return f"open({str(marker)!r}, 'w').write('ran')\n".encode()


def assert_refused(proc, *left_behind_dirs):
    """The refusal contract: one `error:` line, exit status 2, no traceback, no temporary file."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for folder in left_behind_dirs:
        assert not [f for f in os.listdir(folder) if ".tmp" in f], os.listdir(folder)


def test_planted_stdlib_modules_never_run(artifact, tmp_path, clean_env):
    """The archive is on sys.path[0] when CPython starts it; members named like the modules the
    bootstrap imports must not be what it imports."""
    marker = tmp_path / "planted-code-ran"
    shadows = ("hashlib.py", "json/__init__.py", "lzma.py", "zipfile.py", "zlib.py", "struct.py", "shutil.py")
    path = tmp_path / "artifact.py"
    path.write_bytes(_add_members(artifact.read_bytes(), {name: _marker_code(marker) for name in shadows}))
    proc = run_artifact(path, "info", env=clean_env, cwd=tmp_path)
    assert not marker.exists()
    assert_refused(proc)
    assert "unexpected members" in proc.stderr


def _flip(raw, member, needle):
    """`raw` with one bit flipped in the stored bytes of `member`, inside the first `needle`."""
    info = zipfile.ZipFile(io.BytesIO(raw)).getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    pos = raw.index(needle, start) if needle else start + info.compress_size // 2
    return raw[:pos] + bytes([raw[pos] ^ 1]) + raw[pos + 1:]


@pytest.mark.parametrize("member,needle", [
    ("__main__.py", b"unexpected members"),  # in a string: still compiles, caught by its CRC-32
    ("__main__.py", b"members.items()"),     # in a name: the exception is recognised as damage
    ("manifest.json", None),                 # deflated: a damaged stream is zlib's error, not a traceback
])
def test_a_flipped_byte_is_one_error_line(artifact, tmp_path, clean_env, member, needle):
    from builder.artifact.audit import audit_report
    from runtime.errors import PgError

    path = tmp_path / "artifact.py"
    path.write_bytes(_flip(artifact.read_bytes(), member, needle))
    assert_refused(run_artifact(path, "info", env=clean_env, cwd=tmp_path))
    with pytest.raises(PgError, match=member.replace(".", r"\.") + "|corrupt"):
        audit_report(str(path))


def test_the_bootstrap_is_stored_so_cpython_never_inflates_it(artifact):
    assert zipfile.ZipFile(artifact).getinfo("__main__.py").compress_type == zipfile.ZIP_STORED


def _dataset_with_val(tmp_path, demo_data, shard):
    data = tmp_path / "hostile-data"
    data.mkdir()
    shutil.copy(demo_data / "tokenizer.model", data / "tokenizer.model")
    (data / "fineweb_val_000000.bin").write_bytes(shard)
    return data


def _read_only_dir(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere; sysfs refuses new files even to root
        return "/sys"
    return folder


REFUSALS = {
    "max-val-tokens 0": lambda tmp, data: ["--max-val-tokens", "0"],
    "max-val-tokens negative": lambda tmp, data: ["--max-val-tokens", "-5"],
    "stride 0": lambda tmp, data: ["--mode", "sliding", "--stride", "0"],
    "lora-order bogus": lambda tmp, data: ["--mode", "lora", "--lora-order", "longest"],
    "device bogus": lambda tmp, data: ["--device", "bogus"],
    "dump-nll into a missing dir": lambda tmp, data: ["--dump-nll", tmp / "missing" / "nll.npy"],
    "dump-nll into a directory": lambda tmp, data: ["--dump-nll", tmp],
    "dump-nll into a read-only dir": lambda tmp, data: ["--dump-nll", os.path.join(_read_only_dir(tmp), "nll.npy")],
}


@pytest.mark.parametrize("case", list(REFUSALS) + ["device cuda without a GPU", "shard claims 10^12 tokens",
                                                   "token ids beyond the vocab"])
def test_every_refusal_is_one_error_line_and_exit_2(workdir, clean_env, demo_data, tmp_path, case):
    import struct

    import torch
    from test_data import shard_bytes

    data, extra = demo_data, []
    if case == "device cuda without a GPU":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra = ["--device", "cuda"]
    elif case == "shard claims 10^12 tokens":
        shard = bytearray(shard_bytes(np.arange(2000) % 1000))
        shard[8:16] = struct.pack("<q", 10**12)
        data = _dataset_with_val(tmp_path, demo_data, bytes(shard))
    elif case == "token ids beyond the vocab":
        data = _dataset_with_val(tmp_path, demo_data, shard_bytes(np.arange(2000) % 1000 + 1000))
    else:
        extra = REFUSALS[case](tmp_path, demo_data)
    before = sorted(os.listdir(workdir))
    proc = run_artifact(workdir / "artifact.py", "eval", "--data", data, "--mode", "standard", "--max-val-tokens",
                        1000, *extra, env=clean_env, cwd=workdir)
    assert_refused(proc, workdir)
    assert sorted(os.listdir(workdir)) == before  # workdir is tmp_path: nothing written, nothing left


def test_info_into_a_closed_pipe_is_one_error_line(workdir, clean_env):
    proc = subprocess.Popen([sys.executable, str(workdir / "artifact.py"), "info"], cwd=workdir, env=clean_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the artifact has started, so its first write meets a closed pipe
    stderr = proc.stderr.read()
    assert (proc.wait(timeout=120) == 2 and stderr.startswith("error: ")
            and len(stderr.strip().splitlines()) == 1), stderr


def test_a_missing_archive_is_refused_by_the_preamble(artifact, tmp_path, clean_env):
    path = tmp_path / "artifact.py"
    raw = artifact.read_bytes()
    path.write_bytes(raw[:raw.index(b"PK\x03\x04")])
    assert_refused(run_artifact(path, "info", env=clean_env, cwd=tmp_path))
