"""`--threads N` for every pgbuild command that runs torch for long (runtime/threads.py says why
the default is the cores actually free rather than torch's all cores)."""

import click


def _apply(ctx, param, value):
    if not ctx.resilient_parsing:  # not while the shell completes a command line
        from runtime.threads import set_threads
        set_threads(value)
    return value


def threads_option(f):
    """Sets torch's thread count as soon as the command line is parsed, before the command runs."""
    return click.option("--threads", type=click.IntRange(min=1), expose_value=False, is_eager=True, callback=_apply,
                        help="CPU threads for torch (default: the cores not busy, from the 1-minute load average)")(f)
