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
only), and the zip layout is read from the raw bytes with `struct`. Checksums prove integrity, not
origin (a file rewritten whole recomputes them): builder/artifact/canonical.py compares its code with
what this pgbuild writes.
"""

import hashlib
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from math import prod

import numpy as np

from builder.artifact.canonical import code_report, submission_check
from builder.quant.primitives import matrix_group
from runtime.artifact import BOOTSTRAP, BUDGET_BYTES, MANIFEST, Artifact
from runtime.codec import decode_streams, decompress
from runtime.errors import PgError

ROLES = ("container", "code", "manifest", "weights")
GROUPS = ("embeddings", "attention", "mlp", "control")
SPLIT_NOTE = ("proportional: each weight stream's compressed bytes are attributed to its tensors in "
              "proportion to their raw payload bytes in that stream (codes/values and row scales)")
LOCAL_HEADER = b"PK\x03\x04"
END_RECORD = b"PK\x05\x06"
END_RECORD_SIZE = 22
MAX_COMMENT = 0xFFFF
LAYER = re.compile(r"blocks\.(\d+)\.")


# ----------------------------------------------------------------------------- reading the file

def open_verified(path):
    """The artifact's bytes and a checksum-verified `Artifact`, or a one-line `PgError`."""
    if not os.path.exists(path):
        raise PgError(f"{path}: no such file; give the path of an artifact.py written by pgbuild")
    if not os.path.isfile(path):
        raise PgError(f"{path}: not a regular file; give the path of an artifact.py written by pgbuild")
    with open(path, "rb") as f:
        blob = f.read()
    if not blob:
        raise PgError(f"{path}: the file is empty; rebuild or re-download the artifact")
    art = Artifact(path)
    try:
        art.verify()
    except (KeyError, TypeError, AttributeError):
        art.zip.close()
        raise PgError(f"{path}: the manifest is malformed; this is not a pgbuild artifact") from None
    except PgError:
        art.zip.close()
        raise
    return blob, art


def end_record(blob, path):
    """Where the central directory starts, from the zip's end-of-central-directory record.

    The preamble shifts every offset the zip stores, so the directory's true start is the end
    record's position minus the directory size, as zipfile computes it too.
    """
    pos = blob.rfind(END_RECORD, max(0, len(blob) - END_RECORD_SIZE - MAX_COMMENT))
    if pos < 0 or pos + END_RECORD_SIZE > len(blob):
        raise PgError(f"{path}: no zip end record; the artifact is truncated or not a zip")
    cd_size, _cd_offset, comment_len = struct.unpack("<LLH", blob[pos + 12:pos + END_RECORD_SIZE])
    if cd_size == 0xFFFFFFFF:
        raise PgError(f"{path}: zip64 archives are not pgbuild artifacts")
    if pos + END_RECORD_SIZE + comment_len != len(blob):
        raise PgError(f"{path}: bytes after the zip end record; the artifact was modified")
    return pos - cd_size


@dataclass
class Span:
    """A byte range of the file with the section it belongs to."""

    section: str
    role: str
    start: int
    size: int


def member_role(name):
    if name in (BOOTSTRAP, "runtime.xz"):
        return "code"
    if name == MANIFEST:
        return "manifest"
    return "weights" if name.startswith("w/") else "other"


def member_spans(blob, infos, path):
    """Local header and data span of every member, read from the bytes at each header offset."""
    spans = []
    for info in infos:
        start = info.header_offset
        if blob[start:start + 4] != LOCAL_HEADER:
            raise PgError(f"{path}: member {info.filename} has no local header; the artifact is corrupt")
        name_len, extra_len = struct.unpack("<HH", blob[start + 26:start + 30])
        header = 30 + name_len + extra_len
        spans.append(Span("zip local headers", "container", start, header))
        spans.append(Span(info.filename, member_role(info.filename), start + header, info.compress_size))
    return spans


def tile(spans, file_size, path):
    """Spans sorted, with any uncovered range made an explicit container gap, so that the
    sections always sum to the file size; overlapping spans mean a malformed zip."""
    out, cursor = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < cursor:
            raise PgError(f"{path}: zip entries overlap; the artifact is corrupt")
        if span.start > cursor:
            out.append(Span("unaccounted gaps", "container", cursor, span.start - cursor))
        out.append(span)
        cursor = span.start + span.size
    if cursor != file_size:
        raise PgError(f"{path}: zip entries run past the end of the file; the artifact is truncated")
    return out


def layout_spans(blob, art, path):
    """Every byte of the file assigned to a span: preamble, headers, members, directory."""
    infos = sorted(art.zip.infolist(), key=lambda i: i.header_offset)
    cd_start = end_record(blob, path)
    if cd_start != art.zip.start_dir:
        raise PgError(f"{path}: the zip directory is not where the end record says; the artifact is corrupt")
    first = infos[0].header_offset if infos else cd_start
    spans = [Span("preamble", "container", 0, first)] + member_spans(blob, infos, path)
    spans.append(Span("central directory + end record", "container", cd_start, len(blob) - cd_start))
    return tile(spans, len(blob), path)


def sections_from_spans(spans, art):
    """Spans merged by section name (the local headers become one section), in file order."""
    sections = {}
    for span in spans:
        s = sections.setdefault(span.section, {"name": span.section, "role": span.role, "bytes": 0, "spans": 0})
        s["bytes"] += span.size
        s["spans"] += 1
    methods = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
    for info in art.zip.infolist():
        s = sections[info.filename]
        s.update(zip_method=methods.get(info.compress_type, str(info.compress_type)), uncompressed_bytes=info.file_size)
    for s in sections.values():
        if s["name"] == "zip local headers":
            s["members"] = s["spans"]
        del s["spans"]
    return list(sections.values())


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


def weight_breakdowns(manifest, refs, sections):
    """(by_group, by_layer): tensors, parameters, raw payload and attributed compressed bytes."""
    tensors = manifest["tensors"]
    per_tensor = attributed_bytes(manifest, refs, sections)
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


# ----------------------------------------------------------------------------- the report

def code_details(art, sections):
    """The runtime bundle's decompressed size: LZMA-decoded as data, never executed."""
    for s in sections:
        if s["name"] == "runtime.xz":
            s["raw_bytes"] = len(decompress("lzma", art.read("runtime.xz")))


def audit_report(path, budget_bytes=BUDGET_BYTES, submission_path=None):
    """The full audit of one artifact as a JSON-ready dict (see the `audit` command's help)."""
    blob, art = open_verified(path)
    try:
        sections = sections_from_spans(layout_spans(blob, art, path), art)
        manifest = art.manifest
        refs = stream_sections(manifest, art, sections)
        by_group, by_layer = weight_breakdowns(manifest, refs, sections)
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
