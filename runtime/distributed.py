"""torchrun's process group: joining it, and this process's place among the ranks.

Under torchrun every process runs the same command; each joins the group, takes the GPU numbered
by its LOCAL_RANK, and does its share of the work. Outside torchrun there is one rank.
"""

import os

import torch
import torch.distributed as dist


def init_distributed():
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) if launched by it; returns this
    rank's device, or None when not launched by torchrun."""
    if "RANK" not in os.environ:
        return None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def leave_distributed():
    """Leave the process group, if this process joined one, once every rank is done with it: a
    rank that exits (or tears the group down) while another still talks to it makes gloo abort
    the other ("terminate called without an active exception"), after the work succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Ranks:
    """This process's place among the ranks of the joined process group (one rank when none)."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self):
        return self.rank == 0

    def share(self, items):
        """A contiguous slice of `items` for this rank."""
        n = len(items)
        return items[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def sum_(self, tensor):
        """All-reduce `tensor` in place: every rank ends with the sum over the ranks."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
