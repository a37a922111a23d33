"""Would an evaluation fit the challenge's ten minutes? A measured time, projected to the full
validation stream, against the limit: `pgbuild verify` times the artifact's own evaluation of a
prefix, `pgbuild record` reads the times each run measured at build time."""

from runtime.data import find_data, read_shard

EVAL_LIMIT_SECONDS = 600.0
"""The challenge's limit on evaluating a submission."""


def validation_positions(data, vocab, seq_len, tokenizer=None):
    """Positions the full validation stream of `data` scores, trimmed as the runtime trims it
    (whole seq_len sequences); counted from the shard headers, nothing read."""
    layout = find_data(data, vocab, tokenizer)
    tokens = sum(read_shard(path, mmap=True).size for path in layout.shards("val"))
    return max(tokens - 1, 0) // seq_len * seq_len


def projected_seconds(seconds, positions, full_positions=None, first=(0.0, 0)):
    """`seconds` measured on `positions`, scaled to `full_positions` (unchanged when that is not
    known). `first`: (seconds, positions) of the first batch, whose one-off costs (warm-up,
    compilation) count once; the rest scales with the positions."""
    first_seconds, first_positions = first
    if not full_positions or positions <= first_positions:
        return seconds
    scale = (full_positions - first_positions) / (positions - first_positions)
    return first_seconds + (seconds - first_seconds) * scale


def overtime_warning(mode, seconds, positions, full_positions=None, first=(0.0, 0), limit=EVAL_LIMIT_SECONDS,
                     where="this machine"):
    """One warning line when `mode` would take longer than `limit` on the full stream, else None."""
    projected = projected_seconds(seconds, positions, full_positions, first)
    if projected <= limit:
        return None
    basis = f"{seconds:.1f} s" + (f" for {positions:,} tokens" if positions else "")
    if positions and full_positions and full_positions != positions:
        basis += f", scaled to the full validation stream's {full_positions:,}"
    return (f"warning: {mode} evaluation would take about {projected:,.0f} s on {where} ({basis}), over the "
            f"challenge's {limit:.0f} s limit")


def run_warnings(run, full_positions=None):
    """The warnings for a run's build-time evaluation times (builder/judge/runs.py's `Run`)."""
    found = (overtime_warning(mode, seconds, run.eval_tokens, full_positions, where=f"the machine of run {run.label}")
             for mode, seconds in run.eval_seconds.items())
    return [w for w in found if w]
