"""CaseOps: the 2026-04-27 record's lossless capitalization transform, and the byte counts that
score a CaseOps dataset in bits per byte of the ORIGINAL text.

The transform lowercases ASCII words and says how to restore them with four reserved characters
(reserved SentencePiece pieces, so the tokenizer shares one piece between "the", "The" and
"THE"). Over every maximal run of ASCII letters:

- all lowercase: unchanged;
- all capitals, two letters or more: ALLCAPS, then the word lowercased;
- a capital then lowercase letters: TITLE, then the word lowercased;
- anything else (mixed case, a lone capital): TITLE if the first letter is a capital, then the
  word lowercased with CAPNEXT before each later letter that was a capital.

A control character found in the text is escaped as ESC + the character. `decode` inverts it
exactly. Since the transform adds characters, bytes must be counted on the original text: every
validation token's share of it is `original_bytes` of its surface (the controls count nothing,
an escaped one what it weighs in UTF-8), written beside the token shards as a sidecar.
"""

import re

from runtime.errors import PgError

NAME = "caseops_v1"
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_WORD = re.compile(r"[A-Za-z]+")
_CONTROL = re.compile("[" + "".join(CONTROLS) + "]")
_CONTROL_BYTES = len(TITLE.encode())


def _encode_word(match):
    word = match.group()
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[0].isupper() and word[1:].islower():
        return TITLE + lower
    head = (TITLE if word[0].isupper() else "") + lower[0]
    return head + "".join(CAPNEXT + low if ch.isupper() else low for ch, low in zip(word[1:], lower[1:]))


def encode(text):
    """`text` with its ASCII capitals turned into lowercase letters and control characters."""
    return _WORD.sub(_encode_word, _CONTROL.sub(lambda m: ESC + m.group(), text))


def decode(text):
    """The original of an `encode`d text; a malformed one is refused."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ESC:
            if i + 1 == n:
                raise PgError("CaseOps text ends in an escape")
            out.append(text[i + 1])
            i += 2
        elif ch in (TITLE, ALLCAPS) or _WORD.match(ch):
            mode = ch if ch in (TITLE, ALLCAPS) else None
            word = _WORD.match(text, i + (mode is not None))
            if word is None:
                raise PgError(f"CaseOps marker at character {i} is not followed by a word")
            out.append(_decode_word(mode, word.group(), text, word.end()))
            i = word.end()
            while i < n and text[i] == CAPNEXT:  # a capital further into the word
                word = _WORD.match(text, i + 1)
                if word is None:
                    raise PgError(f"CaseOps CAPNEXT at character {i} is not followed by a letter")
                out.append(word.group()[0].upper() + word.group()[1:])
                i = word.end()
        elif ch == CAPNEXT:
            raise PgError(f"CaseOps CAPNEXT at character {i} is outside a word")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _decode_word(mode, letters, text, end):
    if mode == ALLCAPS:
        if end < len(text) and text[end] == CAPNEXT:
            raise PgError("CaseOps ALLCAPS word holds a CAPNEXT")
        return letters.upper()
    return letters[0].upper() + letters[1:] if mode == TITLE else letters


def original_bytes(surfaces):
    """UTF-8 bytes of the original text behind each piece, from the pieces' surfaces (their
    spans of the encoded text) in order. The controls are pieces of their own (reserved), so a
    piece is either one control, counting nothing unless an ESC came just before it, or text
    whose letters were one byte each before the transform as after."""
    counts, escaped = [], False
    for surface in surfaces:
        if surface in CONTROLS:
            counts.append(_CONTROL_BYTES if escaped else 0)
            escaped = surface == ESC and not escaped
        else:
            counts.append(len(surface.encode()))
            escaped = False
    return counts


def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes for
    length-delimited fields; fixed-width fields skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            continue
        else:
            raise PgError(f"SentencePiece returned an unreadable piece list (wire type {wire})")
        yield number, value


def encode_with_surfaces(sp, texts):
    """[(token ids, surfaces)] of each text: SentencePiece's SentencePieceText message (pieces =
    field 2, each with id = 2 and surface = 3), read here rather than through the protobuf
    package, which pgbuild does not depend on."""
    out = []
    for message in sp.encode(texts, return_type="serialized_proto"):
        ids, surfaces = [], []
        for number, piece in _fields(message):
            if number == 2:
                fields = dict(_fields(piece))
                ids.append(fields.get(2, 0))
                surfaces.append(fields.get(3, b"").decode("utf-8", "surrogateescape"))
        out.append((ids, surfaces))
    return out
