"""Fitting the artifact under `--budget-bytes` by lowering precision where it hurts least.

Start from the recipe's bit widths and pack for real. While the file is over budget, lower one
tensor by one bit at a time, always the one whose Hessian-weighted error grows least per byte
saved (bytes estimated from the codes' order-0 entropy), until the estimate covers the overshoot;
then pack and measure again. Small steps keep the result close to the budget. With
quant.prune_to_fit, zeroing the cheapest ±1 codes is tried first at every step (`prune_to_fit`).
"""

import numpy as np

from builder.quant.primitives import prune_count
from runtime.errors import PgError


def fit_budget(quantizer, pack, budget, reserve=0, report=print):
    """Returns (plan, artifact bytes) with len(bytes) <= budget - reserve; `pack(plan)` builds the
    bytes. `reserve` keeps room for what the caller adds to the manifest afterwards."""
    plan = quantizer.default_plan()
    blob = pack(plan)
    while len(blob) > budget - reserve:
        fitted = prune_to_fit(quantizer, pack, plan, blob, budget - reserve, report)
        if fitted is not None:
            return fitted
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


def _global_prune_order(quantizer, plan):
    """(tensor names, owner of each ±1 code in global cost order, ±1 codes per tensor). Each
    tensor's codes keep their own cheapest-first order inside the global one, so the first n
    globally are, per tensor, a prefix of what `Choice.prune` zeroes."""
    names = list(plan)
    costs = [quantizer.prune_order(name, plan[name])[1] for name in names]
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(costs)] + [np.zeros(0, int)])
    order = np.argsort(np.concatenate(costs + [np.zeros(0)]), kind="stable")
    return names, owner[order], [len(c) for c in costs]


def _with_pruned(plan, names, owners, sizes, count):
    """`plan` with the `count` globally cheapest ±1 codes zeroed, on top of what it already prunes."""
    per_tensor = np.bincount(owners[:count], minlength=len(names))
    out = dict(plan)
    for i, name in enumerate(names):
        zeroed = max(prune_count(plan[name].prune, sizes[i]), int(per_tensor[i]))
        if zeroed:
            out[name] = plan[name]._replace(prune=zeroed / sizes[i])
    return out


def _next_count(lo, hi, lo_bytes, hi_bytes, cap, step):
    """The next count to pack: interpolated between the bracket's sizes (bytes fall almost linearly
    with the count), or its midpoint on every other step so the bracket at least halves."""
    if step % 2 == 0 and lo_bytes > hi_bytes:
        guess = lo + (hi - lo) * (lo_bytes - cap) / (lo_bytes - hi_bytes)
    else:
        guess = (lo + hi) / 2
    return min(max(int(guess), lo + 1), hi - 1)


def prune_to_fit(quantizer, pack, plan, blob, cap, report=print):
    """(plan, artifact bytes) fitting `cap` bytes with the globally cheapest ±1 codes zeroed
    (costs in loss units when the quantizer has a probe), their count found by bisection on
    really packed files to within 1% of the count; None when the recipe does not ask for it
    (quant.prune_to_fit = 0) or when zeroing that fraction of all ±1 codes does not fit. `blob` is
    `pack(plan)`, already over the cap. `cap` is in bytes, decimal, like the budget (the
    03-25 record's TARGET_MB=15.9 was multiplied by 1024², overshooting 16,000,000)."""
    if not quantizer.qcfg.prune_to_fit:
        return None
    names, owners, sizes = _global_prune_order(quantizer, plan)
    lo, hi = 0, int(quantizer.qcfg.prune_to_fit * len(owners))
    lo_bytes, hi_blob = len(blob), pack(_with_pruned(plan, names, owners, sizes, hi))
    if len(hi_blob) > cap:
        report(f"budget: zeroing {hi:,} ±1 codes leaves {len(hi_blob):,} bytes, over {cap:,}")
        return None
    step = 0
    while hi - lo > max(1, hi // 100):
        count = _next_count(lo, hi, lo_bytes, len(hi_blob), cap, step)
        trial = pack(_with_pruned(plan, names, owners, sizes, count))
        if len(trial) <= cap:
            hi, hi_blob = count, trial
        else:
            lo, lo_bytes = count, len(trial)
        step += 1
    report(f"budget: zeroed {hi:,} of {len(owners):,} ±1 codes, artifact now {len(hi_blob):,} bytes (cap {cap:,})")
    return _with_pruned(plan, names, owners, sizes, hi), hi_blob


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


def candidate_rows(quantizer, name):
    """[(choice, error in loss units, measured bytes)] for every candidate encoding of a tensor."""
    scale = quantizer.loss_per_error(name)
    rows = []
    for choice in quantizer.candidates(name):
        encoded = quantizer.encode(name, choice)
        rows.append((choice, scale * encoded.error, measured_bytes(encoded)))
    return rows


def allocate(quantizer, pack, budget, reserve=0, report=print, table=None):
    """Rate-distortion allocation: choose each matrix's encoding (bit width, clip, transform)
    to minimize the summed Hessian-weighted error, each tensor's in loss units when the quantizer
    has a loss probe, subject to the packed file fitting.

    Candidate bytes are measured per tensor; what they do not capture (code, manifest, control
    tensors, container, cross-tensor compression) is measured by packing for real, and the target
    is corrected from that measurement until the file fits within 0.5% of the budget. `table`
    holds rows already computed ({name: candidate_rows}, by the ranks that split the work).
    Returns (plan, artifact bytes)."""
    cap = budget - reserve
    table = dict(table or {})
    for name in quantizer.quantized_names():
        if name not in table:
            table[name] = candidate_rows(quantizer, name)
    target, best, closest = cap, None, None
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
        elif closest is None or len(blob) < len(closest[1]):
            closest = (plan, blob)
        if predicted == 0:
            break
        target = predicted + (cap - len(blob))  # what the packed file adds beyond the candidates
    if best is None and closest is not None:
        best = prune_to_fit(quantizer, pack, *closest, cap, report)
    if best is None:
        raise PgError(f"budget of {budget:,} bytes is too small: the smallest encodings the allocator may "
                      "choose (quant.rd_bits) give "
                      f"{len(pack({n: min(r, key=lambda r: r[2])[0] for n, r in table.items()})):,} bytes")
    return best
