"""builder/artifact/entropy.py + runtime/rans.py: the rans codec decodes exactly what it encoded, and
corrupt input is a one-line PgError."""

import numpy as np
import pytest

from builder.artifact.entropy import CONTEXT_CHOICES, encode, encode_with, lane_order, normalize
from runtime.artifact import Artifact
from runtime.codec import decode_streams, decompress
from runtime.errors import PgError
from runtime.rans import PROB_BITS, decode

RNG = np.random.default_rng(0)
EDGE_CASES = {
    "empty": b"",
    "one symbol": b"\x05",
    "one repeated symbol": bytes(100_000),
    "all 256 symbols": bytes(range(256)) * 3,
    "uniform bytes": RNG.integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
    "int6-like": (np.clip(np.round(RNG.standard_t(5, 70_001) * 2.4), -31, 31).astype(np.int8)).tobytes(),
}


@pytest.mark.parametrize("name", EDGE_CASES)
@pytest.mark.parametrize("contexts", CONTEXT_CHOICES)
def test_round_trip_is_exact(name, contexts):
    data = EDGE_CASES[name]
    assert decode(encode_with(data, contexts)) == data


def test_round_trip_on_real_quantized_codes(artifact):
    art = Artifact(artifact).verify()
    streams = decode_streams(art.manifest, art.read)
    codes = [raw for s, raw in zip(art.manifest["streams"], streams) if ".int" in s["name"]]
    assert codes
    for raw in codes:
        assert decompress("rans", encode(raw)) == raw


def test_codes_within_one_percent_of_order0_entropy():
    """A skewed stream codes near its order-0 entropy: the tables, lane states and rounding cost
    well under 1% here."""
    data = EDGE_CASES["int6-like"]
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    entropy = float(-(p * np.log2(p)).sum()) * len(data) / 8
    assert entropy < len(encode(data)) < entropy * 1.01


def test_normalize_keeps_every_present_symbol_and_sums_exactly():
    counts = np.zeros(256, np.int64)
    counts[:200] = 1
    counts[200] = 10 ** 9
    freq = normalize(counts)
    assert freq.sum() == 1 << PROB_BITS and (freq[:201] >= 1).all() and (freq[201:] == 0).all()


def test_lanes_cover_every_symbol_once():
    for n, lanes in ((10, 3), (9, 3), (1, 1), (100, 7)):
        order = lane_order(n, lanes)
        assert sorted(order[order >= 0].tolist()) == list(range(n))


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "table", "garbage"])
def test_corrupt_streams_raise_pgerror(damage):
    good = bytearray(encode(EDGE_CASES["int6-like"]))
    bad = {"truncate": good[:len(good) // 2], "header": b"\xff\xff\xff\xff" + good[4:],
           "table": good[:7] + b"\xff" * 40 + good[47:], "garbage": b"\x00\x01\x02",
           "flip": good[:-100] + bytes([good[-100] ^ 0x5A]) + good[-99:]}[damage]
    with pytest.raises(PgError) as err:
        decompress("rans", bytes(bad))
    assert "\n" not in str(err.value)
