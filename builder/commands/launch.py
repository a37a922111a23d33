"""Running a command on several processes: `--nproc-per-node N` re-runs it under torchrun, and a
refusal from the ranks ends as the one `error:` line every pgbuild command ends with."""

import os
import re
import subprocess
import sys

import click

from runtime.errors import PgError, refuse


def launch_options(f):
    f = click.option("--rdzv-endpoint", help="rendezvous HOST:PORT for multi-node runs")(f)
    f = click.option("--nnodes", default=1, show_default=True, help="nodes for torchrun")(f)
    f = click.option("--nproc-per-node", default=1, show_default=True,
                     help="processes per node; >1 relaunches under torchrun")(f)
    return f


def maybe_relaunch(nproc_per_node, nnodes, rdzv_endpoint):
    """Re-run this very command under torch's launcher when more than one process is asked for."""
    if "RANK" in os.environ or (nproc_per_node <= 1 and nnodes <= 1):
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif nnodes > 1:
        raise PgError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
    else:
        cmd += ["--standalone"]
    sys.exit(run_launcher(cmd + ["-m", "builder"] + sys.argv[1:]))


TORCHRUN_LOG = re.compile(r"^[EWI]\d{4} .*torch/distributed/")
"""A line of torchrun's own logger ('E1206 01:02:03.000 123 torch/distributed/...')."""


def run_launcher(cmd):
    """Run torchrun, passing the ranks' output through; when a rank fails, end with one `error:`
    line (rank 0's refusal, or a pointer to the failing rank's traceback above) instead of the
    launcher's own report, and exit 2."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    refusal, launcher_failed = None, False
    for line in proc.stderr:
        if TORCHRUN_LOG.match(line) and line.startswith("E"):
            launcher_failed = True  # the ranks are done; what follows is torchrun's traceback wall
        if launcher_failed:
            continue
        if line.startswith("error: "):
            refusal = refusal or line
        else:
            sys.stderr.write(line)
    if proc.wait() == 0:
        if refusal:  # not a refusal after all (nothing failed): the line was output like any other
            sys.stderr.write(refusal)
        return 0
    return refuse(refusal[len("error: "):].rstrip() if refusal else
                  f"a process under torchrun failed (exit status {proc.returncode}); its output is above")
