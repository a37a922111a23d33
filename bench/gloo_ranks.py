"""Run a function on N local CPU processes joined into one gloo group: how the benches and the
tests check that ranks splitting the work get what one process gets.

    run_on_gloo_ranks(fn, world, *args)   # every rank calls fn(rank, world, *args)

Each process uses one torch thread. Leaving the group is where gloo aborts a process ("terminate
called without an active exception") if another is still talking to it, so the ranks leave in
step: a barrier ends their collectives (8 aborts in 40 runs of the two-rank TTT test without it,
0 in 50 with it), then each waits in the rendezvous store until every rank is out of the barrier
(a rank returning from it may still have a message in flight to the others; one abort in a CI
run of the whole suite had the barrier alone), and the store lives in this parent process, not in
rank 0, so no rank's exit can take it down under another. `fn` must live at module level:
torch.multiprocessing.spawn pickles it by name. The tests import this module with bench/ on
sys.path (tests/conftest.py), as the bench scripts do.
"""

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(minutes=10)


def _rank(rank, world, port, fn, args):
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
        dist.barrier()
        store.set(f"left/{rank}", "1")
        store.wait([f"left/{r}" for r in range(world)])
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, world, *args):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    mp.spawn(_rank, args=(world, store.port, fn, args), nprocs=world)
