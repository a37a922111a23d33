"""Run a function on N local CPU processes joined into one gloo group: how the benches and the
tests check that ranks splitting the work get what one process gets.

    run_on_gloo_ranks(fn, world, *args)   # every rank calls fn(rank, world, *args)

Each process uses one torch thread. The ranks meet in a barrier before leaving the group: a rank
tearing it down while another still works makes gloo abort the other ("terminate called without
an active exception"; 8 runs in 40 of the two-rank TTT test without the barrier, 0 in 50 with
it). `fn` must live at module level: torch.multiprocessing.spawn pickles it by name. The tests
import this module with bench/ on sys.path (tests/conftest.py), as the bench scripts do.
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, world, port, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, world, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, fn, args), nprocs=world)
