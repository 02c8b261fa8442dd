"""The meta-step's device work captured once in a CUDA graph and replayed every step.

A first-order meta-step launches about a thousand small kernels (20 inner steps of forward,
backward and update at batch 1, then the meta-loss and its backward); at these sizes the GPU
finishes each faster than Python can launch the next. Replaying a graph launches them all with
one call. What stays outside the graph, per step:
  - sampling (a handful of kernels on the device generator; its state is checkpointed, so the
    random stream and `--resume` are the same as on the eager path) and the output-row re-draw;
  - the Adam step: one launch of the multi-tensor op, whose bias correction depends on the step
    number, which a graph would freeze.
Nothing in the step reads a value back to the host. Shapes are static (tasks, trajectory length
and remember-set size are fixed for a run), so one capture serves the whole run.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..data.tasks import MetaTrainBatch
from .meta_step import StepResult

_FIELDS = ("classes", "traj_x", "traj_y", "meta_x", "meta_y")


class GraphedMetaStep:
    """Wraps `fn(batch) -> (grads, StepResult)`; call it with a batch of the shapes it was built for.

    The returned tensors are the graph's static outputs: they are overwritten by the next call, so
    consume them (the trainer adds them up, Adam reads the gradients) before calling again.
    """

    def __init__(self, fn: Callable[[MetaTrainBatch], tuple[dict, StepResult]], example: MetaTrainBatch,
                 warmup: int = 3):
        if example.traj_x.device.type != "cuda":
            raise ValueError("a CUDA graph needs the batch on a CUDA device")
        self.static = MetaTrainBatch(*(getattr(example, f).clone() for f in _FIELDS))
        # Warm-up on a side stream (as torch.cuda.graph requires): it also compiles the Triton
        # kernels and lets cuDNN and the caching allocator settle before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.grads, self.result = fn(self.static)

    def __call__(self, batch: MetaTrainBatch) -> tuple[dict, StepResult]:
        for f in _FIELDS:
            src, dst = getattr(batch, f), getattr(self.static, f)
            if src.shape != dst.shape:
                raise ValueError(f"batch.{f} has shape {tuple(src.shape)}; this graph was captured "
                                 f"for {tuple(dst.shape)}")
            dst.copy_(src)
        self.graph.replay()
        return self.grads, self.result
