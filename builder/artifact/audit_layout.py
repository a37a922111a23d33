"""The zip layout of an artifact read from its raw bytes: spans that tile the file exactly (the
text preamble, each member's local header and stored bytes, the central directory and end record),
merged into the sections `pgbuild audit` reports. Data only: nothing here imports or runs the file,
and checksums are verified through `runtime.artifact.Artifact`, which uses `zipfile` only."""

import os
import struct
import zipfile
from dataclasses import dataclass

from runtime.artifact import CODE_MEMBERS, MANIFEST, Artifact
from runtime.errors import PgError

LOCAL_HEADER = b"PK\x03\x04"
END_RECORD = b"PK\x05\x06"
END_RECORD_SIZE = 22
MAX_COMMENT = 0xFFFF


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
    if name in CODE_MEMBERS:
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
