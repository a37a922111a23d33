"""Compiling the training forward as the record does, and counting what the compiler builds.

The record compiles its model with `dynamic=False, fullgraph=True`: static shapes, and an error
rather than a silent fall-back to Python at a graph break. Each distinct state the forward reads
(depth recurrence off or on) gets a graph of its own; anything else that forced a recompile
(a stray shape, a Python value the graph was specialised on) would cost tens of seconds of the
training clock, so the count is recorded with the run (`TrainResult.compilations`).
"""

import torch

from runtime.errors import PgError


class GraphCounter:
    """A torch.compile backend that hands each graph to `backend` and counts them: the first
    compile and every recompile (new guards: looping switched on, another input shape) add one."""

    def __init__(self, backend):
        try:
            self.backend = torch._dynamo.lookup_backend(backend)
        except torch._dynamo.exc.InvalidBackend:
            raise PgError(f"train.compile_backend: unknown torch.compile backend {backend!r} "
                          f"(e.g. inductor, aot_eager)") from None
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return self.backend(graph, example_inputs)


def compile_training(model, backend):
    """`model` compiled as the record's training step is, and the counter of its graphs."""
    counter = GraphCounter(backend)
    return torch.compile(model, backend=counter, dynamic=False, fullgraph=True), counter
