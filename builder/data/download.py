"""Download the challenge's published, pre-tokenized FineWeb shards from the Hugging Face hub.

This is pgbuild's version of the challenge's `data/cached_challenge_fineweb.py`: it is driven by
the manifest that the challenge's export script (`download_hf_docs_and_tokenize.py`) writes next
to the shards, so shard counts and tokenizer files come from the repo, not from a table here.

Manifest schema assumed, at `{remote_root}/manifest.json` in the dataset repo:

    {
      "datasets": [
        {"name": "fineweb10B_sp8192",            # one entry per variant: fineweb10B_<variant>
         "tokenizer_name": "sp_bpe_8192",        # key into "tokenizers"
         "stats": {"files_val": 1,               # shard count, or a list of shard file names
                   "files_train": 128, ...}},
        ...
      ],
      "tokenizers": [
        {"name": "sp_bpe_8192",
         "model_path": "tokenizers/fineweb_8192_bpe.model",   # relative to remote_root;
         "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"},  # "path" for non-SP tokenizers
        ...
      ]
    }

With counts, shards are named `fineweb_{val,train}_{i:06d}.bin` from i = 0 and live under
`{remote_root}/datasets/<dataset name>/`. A CaseOps dataset (its name ends in CASEOPS_SUFFIX) also
has one `fineweb_val_bytes_*.bin` sidecar per validation shard, the original text's bytes of each
token, which scoring in bits per original byte needs; they come with the val shards.
A file at `{remote_root}/X` lands at `{out_dir}/X`, which gives the challenge's local layout
(`out_dir/datasets/fineweb10B_<variant>/`, `out_dir/tokenizers/`, `out_dir/manifest.json`) that
`runtime.data.find_data` understands.
"""

import json
import os
import posixpath
import shutil

from huggingface_hub import hf_hub_download

from runtime.data import CASEOPS_SUFFIX
from runtime.errors import PgError
from runtime.files import atomic_path

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DATASET_PREFIX = "fineweb10B_"
PUBLISHED_IN = {
    "sp8192": "kevclark/parameter-golf",  # the challenge's own repo predates SP8192
    "sp8192" + CASEOPS_SUFFIX: "romeerp/parameter-golf-caseops-v1",  # the 2026-04-27 record's data
}
"""The dataset repo of each variant that is not in DEFAULT_REPO_ID."""


def repo_for(variant):
    """The dataset repo that publishes `variant`, the default of --repo-id."""
    return PUBLISHED_IN.get(variant, DEFAULT_REPO_ID)


def _remote(remote_root, rel):
    return posixpath.join(remote_root, rel) if remote_root else rel


def _fetch(hub, repo_id, remote_path):
    """Return a local path (normally inside the HF cache) holding `remote_path` of the repo."""
    try:
        return hub(repo_id=repo_id, filename=remote_path, repo_type="dataset")
    except Exception as e:  # the hub client raises many unrelated types (HTTP, cache, validation)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PgError(f"cannot download {remote_path} from dataset repo {repo_id} "
                      f"({type(e).__name__}{': ' + detail if detail else ''}); "
                      f"check --repo-id, --remote-root and the network") from None


def _place(source, dest):
    """Hardlink (or copy) a cached file to `dest` under a temporary name, then rename into place.

    The cache entry is usually a symlink into the blob store; linking the resolved blob keeps
    a real file in the output even if the cache is later cleaned, without doubling disk use.
    """
    source = os.path.realpath(source)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with atomic_path(dest, "downloaded file") as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # different filesystem, or links not supported
            shutil.copyfile(source, tmp)


def _safe_rel(path, what):
    """Manifest paths become local paths; refuse any that would escape the output folder."""
    norm = posixpath.normpath(str(path))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise PgError(f"manifest.json: {what} path {path!r} leaves the dataset folder; the manifest is broken")
    return norm


def _shard_names(stats, split, dataset):
    value = stats.get(f"files_{split}")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_safe_rel(v, f"{dataset} shard") for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [f"fineweb_{split}_{i:06d}.bin" for i in range(value)]
    raise PgError(f"manifest.json: dataset {dataset} has no usable stats.files_{split} "
                  f"(a shard count or list of names); the manifest is broken")


def _byte_sidecar(val_shard):
    """fineweb_val_NNNNNN.bin -> fineweb_val_bytes_NNNNNN.bin, in the same folder."""
    folder, name = posixpath.split(val_shard)
    return posixpath.join(folder, name.replace("fineweb_val_", "fineweb_val_bytes_", 1))


def _find_entries(manifest, variant, repo_id):
    """The dataset and tokenizer entries for `variant`, or an error listing what the repo has."""
    datasets = [d for d in manifest.get("datasets", []) if isinstance(d, dict)]
    name = DATASET_PREFIX + variant
    dataset = next((d for d in datasets if d.get("name") == name), None)
    if dataset is None:
        have = sorted(str(d.get("name", ""))[len(DATASET_PREFIX):] for d in datasets
                      if str(d.get("name", "")).startswith(DATASET_PREFIX))
        home = PUBLISHED_IN.get(variant)
        hint = f" ({variant} is published in {home}: pass --repo-id {home})" if home not in (None, repo_id) else ""
        raise PgError(f"unknown variant {variant!r} in {repo_id}; available: "
                      f"{', '.join(have) or 'none'}{hint}")
    tok_name = dataset.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", [])
                      if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tokenizer is None:
        raise PgError(f"manifest.json: dataset {name} names tokenizer {tok_name!r}, which is not "
                      f"listed; the manifest is broken")
    return dataset, tokenizer


def _plan(dataset, tokenizer, train_shards, variant):
    """The repo-relative files to fetch, by kind: "val" shards (all), "val_bytes" (a CaseOps
    dataset's byte sidecar of each val shard, else none), "train" (the first N) and "tokenizer"."""
    name = dataset["name"]
    stats = dataset.get("stats") or {}
    val = _shard_names(stats, "val", name)
    train = _shard_names(stats, "train", name)
    if train_shards > len(train):
        raise PgError(f"{variant} has only {len(train)} train shards; "
                      f"lower --train-shards (asked for {train_shards})")
    sidecars = [_byte_sidecar(v) for v in val] if name.endswith(CASEOPS_SUFFIX) else []
    tok_files = [_safe_rel(tokenizer[k], "tokenizer") for k in ("model_path", "vocab_path", "path")
                 if tokenizer.get(k)]
    if not tok_files:
        raise PgError(f"manifest.json: tokenizer {tokenizer.get('name')!r} lists no files; "
                      f"the manifest is broken")
    files = {"val": val, "val_bytes": sidecars, "train": train[:train_shards]}
    return {**{kind: [posixpath.join("datasets", name, n) for n in names] for kind, names in files.items()},
            "tokenizer": tok_files}


def _load_manifest(hub, repo_id, remote_root):
    """Fetch the manifest afresh every time; return it and its cached path.

    Never trusting a local copy avoids the challenge's pitfall of a stale manifest from another
    repo silently lacking the asked-for variant.
    """
    remote = _remote(remote_root, "manifest.json")
    cached = _fetch(hub, repo_id, remote)
    try:
        with open(cached, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise PgError(f"{repo_id}/{remote}: unreadable manifest ({e}); check --repo-id and --remote-root") from None
    if not isinstance(manifest, dict):
        raise PgError(f"{repo_id}/{remote}: manifest is not a JSON object; check --remote-root")
    return manifest, cached


def download(variant="sp8192", train_shards=80, out_dir="data", repo_id=None,
             remote_root=DEFAULT_REMOTE_ROOT, hub=None, progress=None):
    """Download one variant's val shards (with their byte sidecars for CaseOps), first
    `train_shards` train shards and tokenizer, from `repo_id` (default: `repo_for(variant)`).

    `hub` fetches one file and returns its local path, with hf_hub_download's keyword arguments
    (repo_id, filename, repo_type); it defaults to hf_hub_download itself. Files already in
    `out_dir` are skipped. `progress(stage, done, total)` gets stage "download" per file.
    Returns a summary dict.
    """
    hub = hub or hf_hub_download
    repo_id = repo_id or repo_for(variant)
    out_dir = os.fspath(out_dir)
    if train_shards < 0:
        raise PgError(f"--train-shards must be 0 or more (got {train_shards})")
    manifest, cached = _load_manifest(hub, repo_id, remote_root)
    dataset, tokenizer = _find_entries(manifest, variant, repo_id)
    plan = _plan(dataset, tokenizer, train_shards, variant)
    files = [rel for kind in ("val", "val_bytes", "train", "tokenizer") for rel in plan[kind]]

    # Only now touch out_dir, so a wrong variant or repo leaves nothing behind.
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PgError(f"{out_dir}: cannot create output directory ({e.strerror or e})") from None
    manifest_path = os.path.join(out_dir, "manifest.json")
    _place(cached, manifest_path)  # kept next to the data, as the challenge's layout has it

    fetched = skipped = 0
    report = progress or (lambda stage, done, total: None)
    report("download", 0, len(files))
    for i, rel in enumerate(files, 1):
        dest = os.path.join(out_dir, *rel.split("/"))
        if os.path.isfile(dest):
            skipped += 1
        else:
            _place(_fetch(hub, repo_id, _remote(remote_root, rel)), dest)
            fetched += 1
        report("download", i, len(files))

    return {
        "variant": variant,
        "repo_id": repo_id,
        "out_dir": out_dir,
        "dataset_dir": os.path.join(out_dir, "datasets", dataset["name"]),
        "tokenizer": os.path.join(out_dir, *plan["tokenizer"][0].split("/")),
        "manifest": manifest_path,
        "files_val": len(plan["val"]),
        "files_val_bytes": len(plan["val_bytes"]),
        "files_train": train_shards,
        "downloaded": fetched,
        "skipped": skipped,
    }
