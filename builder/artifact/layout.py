"""How a code stream's matrices are laid out, chosen by measured bytes.

Codes are quantized row-major. An LZ codec sees more when similar rows sit side by side and each
column runs contiguously, as the top record found (TECHNIQUES §5): rows put in greedy L1
nearest-neighbour order, then the matrix stored transposed. That costs a stored uint16 row order
per matrix, and it only helps where rows really resemble each other (a trained embedding table);
an order-0 coder such as rans gains nothing from it. So the packer codes each stream both ways and
keeps the smaller, counting the row orders' bytes.
"""

import hashlib

import numpy as np

MAX_ROWS = 1 << 16
"""Row orders are stored as uint16."""


def greedy_row_order(codes):
    """Rows chained by greedy L1 nearest neighbour from row 0: each next row is the closest
    remaining one to the last (ties: lowest index)."""
    rest = np.arange(1, len(codes))
    pool = codes[1:].astype(np.int16)
    order = [0]
    last = codes[0].astype(np.int16)
    while len(rest):
        j = int(np.abs(pool - last).sum(1, dtype=np.int32).argmin())
        order.append(int(rest[j]))
        last = pool[j].copy()
        keep = np.ones(len(rest), bool)
        keep[j] = False  # a copy, but order-preserving so ties stay on the lowest index
        rest, pool = rest[keep], pool[keep]
    return np.array(order, np.uint16)


class RowOrders:
    """Greedy row orders remembered by the codes' digest: budget fitting repacks many times."""

    def __init__(self):
        self._cache = {}

    def __call__(self, codes):
        key = hashlib.sha256(codes.tobytes()).digest() + bytes(str(codes.shape), "ascii")
        if key not in self._cache:
            self._cache[key] = greedy_row_order(codes)
        return self._cache[key]


def reorderable(entry):
    return entry["enc"].startswith("int") and entry["enc"] != "int8t" and len(entry["shape"]) == 2 \
        and 1 < entry["shape"][0] <= MAX_ROWS and not entry.get("transposed") and "row_order" not in entry


def nn_columns(raw, entries, row_orders):
    """`raw` with every reorderable tensor's codes put in greedy row order and transposed, and
    {entry index: row order}. Slices keep their offsets and sizes."""
    out, orders = bytearray(raw), {}
    for i, entry in enumerate(entries):
        if not reorderable(entry):
            continue
        _, offset, nbytes = entry["data"]
        codes = np.frombuffer(raw, np.int8, nbytes, offset).reshape(entry["shape"][0], -1)
        orders[i] = row_orders(codes)
        out[offset:offset + nbytes] = np.ascontiguousarray(codes[orders[i]].T).tobytes()
    return bytes(out), orders
