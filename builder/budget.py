"""Fitting the artifact under `--budget-bytes` by lowering precision where it hurts least.

Start from the recipe's bit widths and pack for real. While the file is over budget, lower one
tensor by one bit at a time, always the one whose Hessian-weighted error grows least per byte
saved (bytes estimated from the codes' order-0 entropy), until the estimate covers the overshoot;
then pack and measure again. Small steps keep the result close to the budget.
"""

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
            plan[name] -= 1
            saved += bytes_saved
        blob = pack(plan)
        report(f"budget: lowered precision, artifact now {len(blob):,} bytes (budget {budget:,})")
    return plan, blob


def _cheapest_step(quantizer, plan):
    best = None
    for name, bits in plan.items():
        if bits <= quantizer.qcfg.min_bits:
            continue
        now, lower = quantizer.encode(name, bits), quantizer.encode(name, bits - 1)
        bytes_saved = max(now.estimated_bytes() - lower.estimated_bytes(), 1.0)
        cost = (lower.error - now.error) / bytes_saved
        if best is None or cost < best[0]:
            best = (cost, name, bytes_saved)
    return None if best is None else best[1:]
