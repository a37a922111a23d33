"""Where an artifact's bytes go, to the byte: the analysis behind `pgbuild audit`, as plain dicts
(tables in audit_render.py, the picture in audit_plot.py, the command in builder/commands/audit.py).

The challenge counts `os.path.getsize(artifact.py)` against a 16,000,000-byte budget, so the report
splits the file into sections that tile it exactly: the text preamble, the zip's local headers,
each member's stored bytes, and the central directory + end record. Weight members get more detail
(parameters, nominal bits, decompressed size, the order-0 entropy of their symbols) so a user can
see how far each codec is from its limit and which part of the model is worth squeezing.

The artifact is read as data only. It is a runnable program whose `__main__.py` would execute
bundled code, and a file handed to an auditor must not be trusted: nothing here imports, execs or
zipimports it. Checksums are verified through `runtime.artifact.Artifact` (which uses `zipfile`
only), and audit_layout.py reads the zip layout from the raw bytes. Checksums prove integrity, not
origin (a file rewritten whole recomputes them): builder/artifact/canonical.py compares its code with
what this pgbuild writes.
"""

import hashlib
import os
import re
from dataclasses import dataclass
from math import prod

import numpy as np

from builder.artifact.audit_layout import layout_spans, open_verified, sections_from_spans
from builder.artifact.canonical import code_report, submission_check
from builder.quant.primitives import matrix_group
from runtime.artifact import BUDGET_BYTES, RUNTIME, TRAINING
from runtime.codec import decode_streams, decompress
from runtime.errors import PgError

ROLES = ("container", "code", "manifest", "weights")
GROUPS = ("embeddings", "attention", "mlp", "control")
SPLIT_NOTE = ("proportional: each weight stream's compressed bytes are attributed to its tensors in "
              "proportion to their raw payload bytes in that stream (codes/values and row scales)")
LAYER = re.compile(r"blocks\.(\d+)\.")


# ----------------------------------------------------------------------------- weight streams

def tensor_group(name):
    """Which budget group a tensor counts under: the quantized matrices by the packer's own
    name patterns; embedding-like extras by name; every gain, scale and mix is `control`."""
    group = matrix_group(name)
    if group in ("tok_emb", "lm_head") or "emb" in name:  # also bigram_emb.* and value_emb.*
        return "embeddings"
    if group and group.startswith("attn"):
        return "attention"
    if group and group.startswith("mlp"):
        return "mlp"
    return "control"


def tensor_layer(name):
    match = LAYER.match(name)
    return match.group(1) if match else "global"


def nominal_bits(enc):
    """Bits per stored symbol: 'int6' -> 6, 'int8t' (int8 with one per-tensor scale) -> 8, fp16 -> 16."""
    digits = re.match(r"int(\d+)", enc)
    return int(digits.group(1)) if digits else 16


SIDE_PAYLOADS = {"scale": (2, 16), "col_scale": (2, 16), "lqer_a": (1, 2), "lqer_b": (1, 4), "lqer_b_scale": (2, 16),
                 "row_order": (2, 16)}
"""(symbol width in bytes, nominal bits) of the arrays a tensor entry may store beside its codes."""


@dataclass
class Ref:
    """One slice of a stream: a tensor's codes/values or its row scales."""

    tensor: int
    stream: int
    offset: int
    nbytes: int
    width: int  # bytes per symbol: 1 for int codes, 2 for fp16
    bits: int  # nominal bits per symbol as encoded

    @property
    def params(self):
        return self.nbytes // self.width


def tensor_refs(tensors):
    """Every slice the manifest points at, with its symbol width and nominal bits."""
    refs = []
    for i, t in enumerate(tensors):
        stream, offset, nbytes = t["data"]
        bits = nominal_bits(t["enc"])
        refs.append(Ref(i, stream, offset, nbytes, 1 if t["enc"].startswith("int") else 2, bits))
        for key, (width, nominal) in SIDE_PAYLOADS.items():
            if key in t:
                stream, offset, nbytes = t[key]
                refs.append(Ref(i, stream, offset, nbytes, width, nominal))
    return refs


def entropy_bytes(raw, refs):
    """Order-0 entropy, in bytes, of the symbols a stream holds: int8 codes as byte symbols and
    fp16 values as 16-bit symbols, each width measured over its own slices. This is the size an
    ideal memoryless coder would reach; a good codec can beat it by exploiting context."""
    total = 0.0
    for width, dtype in ((1, np.uint8), (2, "<u2")):
        parts = [np.frombuffer(raw, dtype=dtype, count=r.nbytes // width, offset=r.offset) for r in refs
                 if r.width == width]
        if not parts:
            continue
        symbols = np.concatenate(parts)
        counts = np.bincount(symbols, minlength=1 << (8 * width))
        p = counts[counts > 0] / symbols.size
        total += float(-(p * np.log2(p)).sum()) * symbols.size / 8
    return total


def stream_sections(manifest, art, sections):
    """Adds the stream fields to each weight member's section; returns the decoded refs.

    Streams are decompressed (as data) to measure their symbols; a stream whose size differs from
    the manifest's is corrupt even when its checksum matched a tampered manifest."""
    by_member = {s["name"]: s for s in sections}
    refs = tensor_refs(manifest["tensors"])
    try:
        decoded = decode_streams(manifest, art.read)
    except PgError as e:
        raise PgError(f"{art.path}: {e}; the artifact is corrupt") from None
    for index, (stream, raw) in enumerate(zip(manifest["streams"], decoded)):
        section = by_member[stream["member"]]
        if stream.get("shuffle"):
            section["shuffle"] = stream["shuffle"]
        mine = [r for r in refs if r.stream == index]
        if any(r.offset + r.nbytes > len(raw) for r in mine):
            raise PgError(f"{art.path}: a tensor points past the end of stream {stream['name']}; "
                          "the artifact is corrupt")
        params = sum(r.params for r in mine)
        section.update(
            stream=stream["name"], codec=stream["codec"], tensors=len({r.tensor for r in mine}), params=params,
            bits=(sum(r.bits * r.params for r in mine) / params) if params else None,
            raw_bytes=len(raw), entropy_bytes=round(entropy_bytes(raw, mine), 1),
            bits_per_param=(section["bytes"] * 8 / params) if params else None)
        if section["bits"] is not None and section["bits"].is_integer():
            section["bits"] = int(section["bits"])
    return refs


def split_proportionally(total, weights):
    """Integer shares of `total` proportional to `weights` that sum to `total` exactly
    (largest remainder), so per-group totals still add up to the file size to the byte."""
    if not weights:
        return []
    scale = sum(weights)
    if scale == 0:
        weights, scale = [1] * len(weights), len(weights)
    shares = [total * w // scale for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % scale), i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


def attributed_bytes(manifest, refs, sections):
    """Compressed bytes per tensor index (`None` collects streams no tensor points at)."""
    by_member = {s["name"]: s for s in sections}
    per_tensor = {}
    for index, stream in enumerate(manifest["streams"]):
        mine = [r for r in refs if r.stream == index]
        stored = by_member[stream["member"]]["bytes"]
        if not mine:
            per_tensor[None] = per_tensor.get(None, 0) + stored
        for ref, share in zip(mine, split_proportionally(stored, [r.nbytes for r in mine])):
            per_tensor[ref.tensor] = per_tensor.get(ref.tensor, 0) + share
    return per_tensor


def weight_breakdowns(manifest, refs, per_tensor):
    """(by_group, by_layer): tensors, parameters, raw payload and attributed compressed bytes."""
    tensors = manifest["tensors"]
    raw = {}
    for r in refs:
        raw[r.tensor] = raw.get(r.tensor, 0) + r.nbytes
    by_group = {g: _bucket() for g in GROUPS}
    by_layer = {"global": _bucket()}
    for i, t in enumerate(tensors):
        for table, key in ((by_group, tensor_group(t["name"])), (by_layer, tensor_layer(t["name"]))):
            b = table.setdefault(key, _bucket())
            b["tensors"] += 1
            b["params"] += prod(t["shape"])
            b["raw_bytes"] += raw.get(i, 0)
            b["bytes"] += per_tensor.get(i, 0)
    if per_tensor.get(None):
        by_group["unattributed"] = dict(_bucket(), bytes=per_tensor[None])
        by_layer["unattributed"] = dict(_bucket(), bytes=per_tensor[None])
    layers = sorted((k for k in by_layer if k.isdigit()), key=int)
    by_layer = {k: by_layer[k] for k in ["global", *layers, "unattributed"] if k in by_layer}
    for table in (by_group, by_layer):
        for b in table.values():
            b["bits_per_param"] = b["bytes"] * 8 / b["params"] if b["params"] else None
    return by_group, by_layer


def _bucket():
    return {"tensors": 0, "params": 0, "raw_bytes": 0, "bytes": 0}


def tensor_table(manifest, per_tensor):
    """One row per tensor: its layer and kind (matrix group, else `control`), encoding, parameters,
    and the compressed bytes attributed to it, codes and scales together, per parameter."""
    rows = []
    for i, t in enumerate(manifest["tensors"]):
        params, stored = prod(t["shape"]), per_tensor.get(i, 0)
        rows.append({"name": t["name"], "layer": tensor_layer(t["name"]), "kind": matrix_group(t["name"]) or "control",
                     "enc": t["enc"], "params": params, "bytes": stored,
                     "bits_per_param": stored * 8 / params if params else None})
    return rows


def bits_grid(tensors):
    """What the allocator chose, as (rows, columns, bits): layers then `global`, by the matrix
    kinds inside layers, `control`, then the kinds outside them (tok_emb, ...); bits per parameter
    of each cell's tensors (None: no tensor)."""
    layers = sorted({t["layer"] for t in tensors if t["layer"] != "global"}, key=int)
    rows = layers + (["global"] if any(t["layer"] == "global" for t in tensors) else [])
    inner = [t["kind"] for t in tensors if t["layer"] != "global" and t["kind"] != "control"]
    columns = list(dict.fromkeys(inner + ["control"] + [t["kind"] for t in tensors]))
    cells = {}
    for t in tensors:
        stored, params = cells.get((t["layer"], t["kind"]), (0, 0))
        cells[t["layer"], t["kind"]] = stored + t["bytes"], params + t["params"]

    def bits(row, column):
        stored, params = cells.get((row, column), (0, 0))
        return stored * 8 / params if params else None

    return rows, columns, [[bits(r, c) for c in columns] for r in rows]


# ----------------------------------------------------------------------------- the report

def code_details(art, sections):
    """The code bundles' decompressed sizes: LZMA-decoded as data, never executed."""
    for s in sections:
        if s["name"] in (RUNTIME, TRAINING):
            s["raw_bytes"] = len(decompress("lzma", art.read(s["name"])))


def audit_report(path, budget_bytes=BUDGET_BYTES, submission_path=None):
    """The full audit of one artifact as a JSON-ready dict (see the `audit` command's help)."""
    blob, art = open_verified(path)
    try:
        sections = sections_from_spans(layout_spans(blob, art, path), art)
        manifest = art.manifest
        refs = stream_sections(manifest, art, sections)
        per_tensor = attributed_bytes(manifest, refs, sections)
        by_group, by_layer = weight_breakdowns(manifest, refs, per_tensor)
        code_details(art, sections)
        code = code_report(art, blob[:min(i.header_offset for i in art.zip.infolist())])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PgError(f"{path}: the manifest is malformed ({type(e).__name__}: {e}); "
                      "this is not a pgbuild artifact") from None
    finally:
        art.zip.close()
    total = os.path.getsize(path)
    if sum(s["bytes"] for s in sections) != total:  # tile() guarantees this; checked, not assumed
        raise PgError(f"{path}: internal error: sections do not add up to the file size")
    by_role = {role: sum(s["bytes"] for s in sections if s["role"] == role) for role in ROLES}
    by_role.update({s["role"]: by_role.get(s["role"], 0) for s in sections if s["role"] not in by_role})
    sha256 = hashlib.sha256(blob).hexdigest()
    return {
        "artifact": str(path), "format": manifest.get("format"), "sha256": sha256,
        "submission": submission_check(path, sha256, submission_path), "code": code,
        "total_bytes": total, "budget_bytes": budget_bytes, "headroom": budget_bytes - total,
        "over_budget": total > budget_bytes, "sections": sections, "by_role": by_role,
        "by_group": by_group, "by_group_split": SPLIT_NOTE, "by_layer": by_layer,
        "tensors": tensor_table(manifest, per_tensor),
        "metrics": manifest.get("metrics", {}), "model": manifest.get("model", {}),
        "recipe": manifest.get("recipe", {}), "provenance": manifest.get("provenance", {}),
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "summary": summary_line(manifest, sum(prod(t["shape"]) for t in manifest["tensors"])),
    }


def summary_line(manifest, params):
    """One human line for the model and recipe, e.g. `11 layers x 512, ... int6/int8, brotli`."""
    m, r = manifest.get("model", {}), manifest.get("recipe", {})
    model = (f"{m.get('num_layers', '?')} layers x {m.get('model_dim', '?')}, {m.get('num_heads', '?')} heads / "
             f"{m.get('num_kv_heads', '?')} KV, vocab {m.get('vocab_size', '?')}, {params:,} parameters")
    recipe = (f"{r.get('method', '?')}, matrices int{r.get('matrix_bits', '?')}, "
              f"embeddings int{r.get('embed_bits', '?')}, codecs {'/'.join(r.get('codecs', [])) or '?'}")
    return f"{model}; {recipe}"


def compare_reports(a, b):
    """Deltas (b - a) of totals, roles, groups and numeric build-time metrics."""
    def diff(x, y):
        return {k: y.get(k, 0) - x.get(k, 0) for k in list(x) + [k for k in y if k not in x]}

    metrics_a = {k: v for k, v in a["metrics"].items() if isinstance(v, (int, float))}
    metrics_b = {k: v for k, v in b["metrics"].items() if isinstance(v, (int, float))}
    return {
        "total_bytes": b["total_bytes"] - a["total_bytes"], "headroom": b["headroom"] - a["headroom"],
        "by_role": diff(a["by_role"], b["by_role"]), "by_group": diff(group_bytes(a), group_bytes(b)),
        "metrics": {k: metrics_b[k] - metrics_a[k] for k in metrics_a if k in metrics_b},
    }


def group_bytes(report):
    return {g: v["bytes"] for g, v in report["by_group"].items()}
