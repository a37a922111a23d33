"""The click group every pgbuild command hangs from."""

import sys

import click

from runtime.errors import PgError, refuse


class PgGroup(click.Group):
    """Turns `PgError`, from any command below it, into one `error:` line and exit status 2,
    never a traceback. A subgroup run on its own (as tests do) keeps the same contract. Under
    torchrun, a command that succeeded leaves the process group with every rank before exiting."""

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except PgError as e:
            ctx.exit(refuse(e))
        if "torch.distributed" in sys.modules:  # a command that never touched torch has no group to leave
            from runtime.distributed import leave_distributed
            leave_distributed()
        return result
