"""How many CPU threads torch may use: `--threads N`, or by default the cores actually free.

torch's own default is every physical core, which on a machine that other jobs also use makes
each matrix product wait for cores that are busy: the same evaluation ran 3-8x slower at load
2-8 on two cores than with one thread. So the default is the CPUs this process may run on less
the 1-minute load average (at least 1), and never more than torch's own default (which
OMP_NUM_THREADS lowers); under torchrun the free cores are shared by the processes of a node.
"""

import os


def free_cores():
    """CPUs this process may use, less the ones the load average says are busy; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        busy = 0.0
    return max(1, int(cpus - busy + 0.5))


def default_threads():
    import torch

    per_process = free_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's
    return max(1, min(torch.get_num_threads(), per_process))


def set_threads(threads=None):
    """Use `threads` intra-op threads (None: `default_threads()`); returns the number set."""
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads
