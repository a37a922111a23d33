"""`pgbuild data download` against a fake hub: a real huggingface_hub cache folder, read offline.

The fake hub is the on-disk cache layout huggingface_hub itself writes (blobs, snapshots linking to
them, refs/main), so the real `hf_hub_download(..., cache_dir=..., local_files_only=True)` serves
the files. The published files are a real dataset built by `build_dataset` from the fixture corpus.
"""

import functools
import hashlib
import json
import os

import pytest
import sentencepiece as spm
from click.testing import CliRunner
from huggingface_hub import hf_hub_download

from builder.commands.data import data
from builder.data import download as download_mod
from builder.data.build import build_dataset
from builder.data.download import download
from runtime.data import CASEOPS_SUFFIX, find_data, load_tokens
from runtime.errors import PgError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "demo_corpus.jsonl.xz")
REPO = "someone/parameter-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 512
N_TRAIN = 3


def publish(cache_dir, repo_id, files):
    """Lay `files` ({repo path: bytes}) out as huggingface_hub's cache of a dataset repo."""
    repo = os.path.join(cache_dir, "datasets--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for rel, content in files.items():
        blob = os.path.join(repo, "blobs", hashlib.sha256(content).hexdigest())
        with open(blob, "wb") as f:
            f.write(content)
        link = os.path.join(repo, "snapshots", COMMIT, *rel.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)


def manifest(train_files=N_TRAIN):
    """Shaped like the manifest the challenge's export script writes (extra keys included)."""
    return {
        "version": "10B",
        "datasets": [
            {"name": f"fineweb10B_sp{VOCAB}", "tokenizer_name": f"sp_bpe_{VOCAB}", "vocab_size": VOCAB,
             "path": f"datasets/fineweb10B_sp{VOCAB}",
             "stats": {"files_val": 1, "files_train": train_files, "docs_val": 20}},
            {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260",
             "stats": {"files_val": 1, "files_train": 1}},
        ],
        "tokenizers": [
            {"name": f"sp_bpe_{VOCAB}", "kind": "sentencepiece_bpe",
             "model_path": f"tokenizers/fineweb_{VOCAB}_bpe.model",
             "vocab_path": f"tokenizers/fineweb_{VOCAB}_bpe.vocab"},
            {"name": "pure_byte_260", "path": "tokenizers/fineweb_pure_byte_260.json"},
        ],
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A fake hub holding a real sp512 dataset; returns (fetch function, published files)."""
    built = build_dataset(FIXTURE, VOCAB, tmp_path_factory.mktemp("src"), val_docs=20, shard_tokens=200_000)
    assert len(built["shards_train"]) == N_TRAIN
    prefix = f"datasets/datasets/fineweb10B_sp{VOCAB}"
    files = {f"{prefix}/{os.path.basename(p)}": open(p, "rb").read()
             for p in built["shards_val"] + built["shards_train"]}
    files[f"datasets/tokenizers/fineweb_{VOCAB}_bpe.model"] = open(built["tokenizer"], "rb").read()
    files[f"datasets/tokenizers/fineweb_{VOCAB}_bpe.vocab"] = b"<pad>\t0\n"
    files["datasets/manifest.json"] = json.dumps(manifest()).encode()
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    publish(cache, REPO, files)
    return functools.partial(hf_hub_download, cache_dir=cache, local_files_only=True), files


def get(hub_fn, out, **kw):
    return download(variant=f"sp{VOCAB}", out_dir=str(out), repo_id=REPO, hub=hub_fn, **kw)


def local_files(out):
    return sorted(os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/")
                  for d, _, fs in os.walk(out) for f in fs)


def test_challenge_layout_and_shard_count(hub, tmp_path):
    fetch, files = hub
    summary = get(fetch, tmp_path, train_shards=2)
    ds = f"datasets/fineweb10B_sp{VOCAB}"
    assert local_files(tmp_path) == sorted([
        "manifest.json", f"{ds}/fineweb_val_000000.bin",
        f"{ds}/fineweb_train_000000.bin", f"{ds}/fineweb_train_000001.bin",
        f"tokenizers/fineweb_{VOCAB}_bpe.model", f"tokenizers/fineweb_{VOCAB}_bpe.vocab"])
    for rel in local_files(tmp_path):
        assert open(tmp_path / rel, "rb").read() == files["datasets/" + rel]
        assert not os.path.islink(tmp_path / rel)  # real files, not links into the cache
    assert (summary["files_val"], summary["files_train"]) == (1, 2)
    assert (summary["downloaded"], summary["skipped"]) == (5, 0)
    assert summary["tokenizer"] == os.path.join(str(tmp_path), "tokenizers", f"fineweb_{VOCAB}_bpe.model")


def test_runtime_finds_downloaded_layout(hub, tmp_path):
    fetch, _ = hub
    get(fetch, tmp_path, train_shards=N_TRAIN)
    layout = find_data(str(tmp_path), vocab_size=VOCAB)
    assert layout.shard_dir == os.path.join(str(tmp_path), "datasets", f"fineweb10B_sp{VOCAB}")
    assert len(layout.shards("train")) == N_TRAIN
    val = load_tokens(layout, "val")
    sp = spm.SentencePieceProcessor(model_file=layout.tokenizer)
    assert val[0] == sp.bos_id() and int(val.max()) < sp.vocab_size()
    assert sp.decode(val[1:40].tolist()).startswith("Haven’t you made")  # the fixture's first doc
    # Pointing --data at the dataset folder itself also works.
    direct = find_data(layout.shard_dir, vocab_size=VOCAB)
    assert direct.tokenizer == layout.tokenizer


def test_existing_files_are_skipped(hub, tmp_path):
    fetch, _ = hub
    get(fetch, tmp_path, train_shards=1)
    kept = tmp_path / "tokenizers" / f"fineweb_{VOCAB}_bpe.vocab"
    kept.write_bytes(b"local edit")  # a file already present is never fetched again
    summary = get(fetch, tmp_path, train_shards=N_TRAIN)
    assert (summary["downloaded"], summary["skipped"]) == (N_TRAIN - 1, 4)
    assert kept.read_bytes() == b"local edit"
    assert len(find_data(str(tmp_path), vocab_size=VOCAB).shards("train")) == N_TRAIN


def test_unknown_variant_lists_available(hub, tmp_path):
    fetch, _ = hub
    with pytest.raises(PgError, match=r"unknown variant 'sp8192'.*available: byte260, sp512.*--repo-id kevclark"):
        download(variant="sp8192", out_dir=str(tmp_path / "out"), repo_id=REPO, hub=fetch)
    assert not (tmp_path / "out").exists()


def test_too_many_train_shards(hub, tmp_path):
    fetch, _ = hub
    with pytest.raises(PgError, match=f"only {N_TRAIN} train shards"):
        get(fetch, tmp_path, train_shards=N_TRAIN + 1)


def test_missing_file_on_hub_leaves_nothing_partial(tmp_path):
    cache = str(tmp_path / "cache")
    publish(cache, REPO, {"datasets/manifest.json": json.dumps(manifest(train_files=2)).encode(),
                          f"datasets/datasets/fineweb10B_sp{VOCAB}/fineweb_val_000000.bin": b"v",
                          f"datasets/datasets/fineweb10B_sp{VOCAB}/fineweb_train_000000.bin": b"t"})
    fetch = functools.partial(hf_hub_download, cache_dir=cache, local_files_only=True)
    out = tmp_path / "out"
    with pytest.raises(PgError, match="cannot download datasets/datasets/fineweb10B_sp512/fineweb_train_000001.bin"):
        get(fetch, out, train_shards=2)
    ds = f"datasets/fineweb10B_sp{VOCAB}"
    assert local_files(out) == sorted(["manifest.json", f"{ds}/fineweb_train_000000.bin",
                                       f"{ds}/fineweb_val_000000.bin"])


def test_cli_download(hub, tmp_path, monkeypatch):
    fetch, _ = hub
    # The CLI has no hub option: route its default client to the fake hub.
    monkeypatch.setattr(download_mod, "hf_hub_download", fetch)
    base = ["download", "--variant", f"sp{VOCAB}", "--repo-id", REPO, "--out", str(tmp_path)]
    result = CliRunner().invoke(data, base + ["--train-shards", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["downloaded"] == 4

    result = CliRunner().invoke(data, base + ["--train-shards", "2"])
    assert result.exit_code == 0, result.output
    assert "1 downloaded, 4 already present" in result.stdout

    result = CliRunner().invoke(data, ["download", "--variant", "sp999", "--repo-id", REPO, "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: unknown variant 'sp999' in {REPO}; available: byte260, sp{VOCAB}"]


CASEOPS = f"sp{VOCAB}{CASEOPS_SUFFIX}"


@pytest.fixture(scope="module")
def caseops_hub(tmp_path_factory):
    """A fake hub laid out as the 2026-04-27 record's CaseOps repo: a real CaseOps build of the
    fixture under the published names, byte sidecars next to the val shards."""
    built = build_dataset(FIXTURE, VOCAB, tmp_path_factory.mktemp("caseops_src"), val_docs=20,
                          shard_tokens=200_000, case_ops=True)
    prefix = f"datasets/datasets/fineweb10B_{CASEOPS}"
    shard_dir = os.path.dirname(built["shards_val"][0])
    files = {f"{prefix}/{name}": open(os.path.join(shard_dir, name), "rb").read()
             for name in os.listdir(shard_dir) if name.startswith("fineweb_")}
    assert f"{prefix}/fineweb_val_bytes_000000.bin" in files
    tok = f"tokenizers/fineweb_{VOCAB}_bpe{CASEOPS_SUFFIX}.model"
    files["datasets/" + tok] = open(built["tokenizer"], "rb").read()
    files["datasets/manifest.json"] = json.dumps({
        "datasets": [{"name": f"fineweb10B_{CASEOPS}", "tokenizer_name": "caseops",
                      "stats": {"files_val": len(built["shards_val"]), "files_train": len(built["shards_train"])}}],
        "tokenizers": [{"name": "caseops", "model_path": tok, "text_transform": "lossless_caps_caseops_v1"}],
    }).encode()
    cache = str(tmp_path_factory.mktemp("caseops_cache"))
    publish(cache, download_mod.PUBLISHED_IN["sp8192" + CASEOPS_SUFFIX], files)
    return functools.partial(hf_hub_download, cache_dir=cache, local_files_only=True), files


def test_caseops_download_brings_the_byte_sidecars(caseops_hub, tmp_path, monkeypatch):
    fetch, files = caseops_hub
    monkeypatch.setattr(download_mod, "hf_hub_download", fetch)
    # sp512's CaseOps export is published nowhere; the record's repo is named explicitly.
    repo = download_mod.PUBLISHED_IN["sp8192" + CASEOPS_SUFFIX]
    result = CliRunner().invoke(data, ["download", "--variant", f"sp{VOCAB}", "--caseops", "--repo-id", repo,
                                       "--train-shards", "1", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["variant"], summary["files_val"], summary["files_val_bytes"]) == (CASEOPS, 1, 1)
    for rel in local_files(tmp_path):
        assert open(tmp_path / rel, "rb").read() == files["datasets/" + rel]
    layout = find_data(str(tmp_path), vocab_size=VOCAB)
    assert layout.shard_dir.endswith(f"fineweb10B_{CASEOPS}") and layout.has_byte_sidecar()
    assert layout.tokenizer.endswith(f"fineweb_{VOCAB}_bpe{CASEOPS_SUFFIX}.model")
    val, sidecar = load_tokens(layout, "val"), load_tokens(layout, "val_bytes")
    assert val.shape == sidecar.shape and int(sidecar[val == 1].max()) == 0  # a BOS has no bytes


def test_default_repo_is_where_the_variant_is_published():
    assert download_mod.repo_for("sp8192") == "kevclark/parameter-golf"
    assert download_mod.repo_for("sp8192" + CASEOPS_SUFFIX) == "romeerp/parameter-golf-caseops-v1"
    assert download_mod.repo_for("sp1024") == download_mod.DEFAULT_REPO_ID


def test_caseops_sidecar_missing_on_the_hub(caseops_hub, tmp_path):
    _, files = caseops_hub
    files = {k: v for k, v in files.items() if "val_bytes" not in k}
    cache = str(tmp_path / "cache")
    publish(cache, REPO, files)
    fetch = functools.partial(hf_hub_download, cache_dir=cache, local_files_only=True)
    with pytest.raises(PgError, match=f"cannot download datasets/datasets/fineweb10B_{CASEOPS}/fineweb_val_bytes_0"):
        download(variant=CASEOPS, out_dir=str(tmp_path / "out"), repo_id=REPO, hub=fetch, train_shards=0)
