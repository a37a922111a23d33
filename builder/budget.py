"""Fitting the artifact under `--budget-bytes` by lowering precision where it hurts least.

Start from the recipe's bit widths and pack for real. While the file is over budget, lower one
tensor by one bit at a time, always the one whose Hessian-weighted error grows least per byte
saved (bytes estimated from the codes' order-0 entropy), until the estimate covers the overshoot;
then pack and measure again. Small steps keep the result close to the budget.
"""

import numpy as np

from runtime.errors import PgError


def fit_budget(quantizer, pack, budget, reserve=0, report=print):
    """Returns (plan, artifact bytes) with len(bytes) <= budget - reserve; `pack(plan)` builds the
    bytes. `reserve` keeps room for what the caller adds to the manifest afterwards."""
    plan = quantizer.default_plan()
    blob = pack(plan)
    while len(blob) > budget - reserve:
        overshoot = len(blob) - (budget - reserve)
        saved = 0.0
        while saved < overshoot * 1.02 + 16:
            step = _cheapest_step(quantizer, plan)
            if step is None:
                raise PgError(f"budget of {budget:,} bytes is too small: even {quantizer.qcfg.min_bits}-bit codes "
                              f"everywhere give {len(pack(plan)):,} bytes")
            name, bytes_saved = step
            plan[name] = plan[name]._replace(bits=plan[name].bits - 1)
            saved += bytes_saved
        blob = pack(plan)
        report(f"budget: lowered precision, artifact now {len(blob):,} bytes (budget {budget:,})")
    return plan, blob


def _cheapest_step(quantizer, plan):
    best = None
    for name, choice in plan.items():
        if choice.bits <= quantizer.qcfg.min_bits:
            continue
        now, lower = quantizer.encode(name, choice), quantizer.encode(name, choice._replace(bits=choice.bits - 1))
        bytes_saved = max(now.estimated_bytes() - lower.estimated_bytes(), 1.0)
        cost = (lower.error - now.error) / bytes_saved
        if best is None or cost < best[0]:
            best = (cost, name, bytes_saved)
    return None if best is None else best[1:]


def measured_bytes(encoded, quality=9):
    """A candidate's stored size: each integer payload compressed on its own (brotli at a fast
    quality; the final artifact is packed with the real codecs and measured), fp16 side
    payloads (scales) at their raw size."""
    import brotli
    return sum(array.nbytes if array.dtype == np.float16 else len(brotli.compress(array.tobytes(), quality=quality))
               for _, array, _ in encoded.payloads())


def _lagrangian_choice(table, lam):
    """For multiplier lam, each tensor's candidate minimizing error + lam * bytes."""
    return {name: min(rows, key=lambda r: r[1] + lam * r[2]) for name, rows in table.items()}


def _best_within(table, target):
    """The allocation of least total error whose candidate bytes sum to at most `target`
    (bisection on the Lagrange multiplier, log scale)."""
    lo, hi = 1e-12, 1e12
    if sum(r[2] for r in _lagrangian_choice(table, lo).values()) <= target:
        return _lagrangian_choice(table, lo)
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if sum(r[2] for r in _lagrangian_choice(table, mid).values()) <= target:
            hi = mid
        else:
            lo = mid
    return _lagrangian_choice(table, hi)


def _spend_leftover(picks, table, target):
    """Bisection leaves bytes unused between two multipliers; spend them on the upgrades that
    lower the error most per byte, as long as they fit."""
    used = sum(row[2] for row in picks.values())
    while True:
        best = None
        for name, rows in table.items():
            current = picks[name]
            for row in rows:
                extra = row[2] - current[2]
                if row[1] < current[1] and 0 < extra <= target - used:
                    gain = (current[1] - row[1]) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, row)
        if best is None:
            return picks
        _, name, row = best
        used += row[2] - picks[name][2]
        picks[name] = row


def allocate(quantizer, pack, budget, reserve=0, report=print):
    """Rate-distortion allocation: choose each matrix's encoding (bit width, clip, transform)
    to minimize the summed Hessian-weighted error, each tensor's in loss units when the quantizer
    has a loss probe, subject to the packed file fitting.

    Candidate bytes are measured per tensor; what they do not capture (code, manifest, control
    tensors, container, cross-tensor compression) is measured by packing for real, and the target
    is corrected from that measurement until the file fits within 0.5% of the budget.
    Returns (plan, artifact bytes)."""
    cap = budget - reserve
    table = {}
    for name in quantizer.quantized_names():
        rows = []
        scale = quantizer.loss_per_error(name)
        for choice in quantizer.candidates(name):
            encoded = quantizer.encode(name, choice)
            rows.append((choice, scale * encoded.error, measured_bytes(encoded)))
        table[name] = rows
    target, best = cap, None
    for attempt in range(8):
        picks = _spend_leftover(_best_within(table, target), table, target)
        plan = {name: row[0] for name, row in picks.items()}
        blob = pack(plan)
        predicted = sum(row[2] for row in picks.values())
        report(f"allocation {attempt + 1}: {len(blob):,} bytes for a cap of {cap:,}")
        if len(blob) <= cap:
            if best is None or len(blob) > len(best[1]):
                best = (plan, blob)
            if len(blob) >= 0.995 * cap or target >= sum(max(r[2] for r in rows) for rows in table.values()):
                break
        if predicted == 0:
            break
        target = predicted + (cap - len(blob))  # what the packed file adds beyond the candidates
    if best is None:
        raise PgError(f"budget of {budget:,} bytes is too small: the smallest encodings the allocator may "
                      f"choose (quant.rd_bits) give {len(pack({n: min(r, key=lambda r: r[2])[0] for n, r in table.items()})):,} bytes")
    return best
