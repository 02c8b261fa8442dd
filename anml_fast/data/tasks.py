"""Omniglot as tensors on the run's device, and the samplers of meta-training and meta-testing.

All sampling draws from a `torch.Generator` on the run's device, so that no step waits on the host
and the whole random stream can be saved in a checkpoint and resumed exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import OmniglotImages
from ..models.config import INPUT_NORMS
from .omniglot import NORM_MEAN, NORM_STD, STANDARD_MEAN, STANDARD_STD

META_TRAIN_CLASSES = 963  # the first 963 background classes (the reference drops the last one)
META_TEST_POOL = 650  # meta-test classes are drawn from the first 650 evaluation classes
TRAIN_DRAWINGS = 15  # drawings 1-15 train, 16-20 test
REMEMBER_SIZE = 64


def normalize(images: torch.Tensor, device: torch.device | str = "cpu",
              input_norm: str = "reference") -> torch.Tensor:
    """uint8 [..., 28, 28] -> float32 [..., 1, 28, 28] exactly as ToTensor then Normalize compute it.

    "reference": the reference code's constants, which leave every image nearly constant (about
    -0.0427 +- 2e-4); ANML's normalisation layers recover the drawing, a network without them
    (OML) cannot. "standard": the same constants as they were evidently meant (mean 0.92206,
    std 0.08426 of pixels in [0, 1]), giving images of unit scale.
    """
    x = images.to(device).to(torch.float32).div(255)
    if input_norm == "standard":
        return x.sub(STANDARD_MEAN).div(STANDARD_STD).unsqueeze(-3)
    if input_norm != "reference":
        raise ValueError(f"input normalisation {input_norm!r} is not one of {INPUT_NORMS}")
    return x.sub(NORM_MEAN).div(NORM_STD).unsqueeze(-3)


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """[..., 1, H, W] -> [..., 3, H, W]: the reference's three identical channels, as a view."""
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:])


@dataclass
class MetaTrainBatch:
    """T tasks: each a trajectory of one class and the meta-loss batch (remember set + trajectory)."""

    classes: torch.Tensor  # [T]
    traj_x: torch.Tensor  # [T, L, 3, 28, 28]
    traj_y: torch.Tensor  # [T, L]
    meta_x: torch.Tensor  # [T, R + L, 3, 28, 28]
    meta_y: torch.Tensor  # [T, R + L]

    def select(self, tasks: slice) -> "MetaTrainBatch":
        """Some of the tasks (a process's share in a distributed run)."""
        return MetaTrainBatch(self.classes[tasks], self.traj_x[tasks], self.traj_y[tasks],
                              self.meta_x[tasks], self.meta_y[tasks])


class MetaTrainSampler:
    """Samples the protocol's meta-training tasks from the first 963 background classes."""

    def __init__(self, data: OmniglotImages, device: torch.device | str,
                 num_classes: int = META_TRAIN_CLASSES, dtype: torch.dtype = torch.float32,
                 input_norm: str = "reference"):
        self.images = normalize(data.background[:num_classes], device, input_norm).to(dtype)  # [C, 20, 1, 28, 28]
        self.num_classes, self.num_drawings = self.images.shape[:2]
        self.device = torch.device(device)

    def sample(self, generator: torch.Generator, tasks: int = 1, traj_len: int = 20,
               remember: int = REMEMBER_SIZE) -> MetaTrainBatch:
        if not 1 <= traj_len <= self.num_drawings:
            raise ValueError(f"trajectory length {traj_len} must be in 1..{self.num_drawings}")
        if not 1 <= tasks <= self.num_classes:
            raise ValueError(f"tasks per meta-step {tasks} must be in 1..{self.num_classes}")
        dev = self.device
        classes = torch.randperm(self.num_classes, generator=generator, device=dev)[:tasks]
        order = torch.rand(tasks, self.num_drawings, generator=generator, device=dev).argsort(1)
        drawings = order[:, :traj_len]
        traj_x = self.images[classes[:, None], drawings]
        traj_y = classes[:, None].expand(tasks, traj_len)
        rc = torch.randint(self.num_classes, (tasks, remember), generator=generator, device=dev)
        rd = torch.randint(self.num_drawings, (tasks, remember), generator=generator, device=dev)
        meta_x = torch.cat([self.images[rc, rd], traj_x], 1)
        meta_y = torch.cat([rc, traj_y], 1)
        return MetaTrainBatch(classes, as_rgb(traj_x), traj_y, as_rgb(meta_x), meta_y)


class MetaTestSet:
    """The evaluation classes split into drawings 1-15 (train) and 16-20 (test), on the device."""

    def __init__(self, data: OmniglotImages, device: torch.device | str,
                 pool: int = META_TEST_POOL, dtype: torch.dtype = torch.float32,
                 input_norm: str = "reference"):
        images = normalize(data.evaluation, device, input_norm).to(dtype)  # [659, 20, 1, 28, 28]
        self.train = images[:, :TRAIN_DRAWINGS]
        self.test = images[:, TRAIN_DRAWINGS:]
        self.pool = pool
        self.device = torch.device(device)

    def draw_classes(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """n distinct classes from the pool, in ascending index order (the reference's order)."""
        if not 1 <= n <= self.pool:
            raise ValueError(f"number of classes {n} must be in 1..{self.pool}")
        perm = torch.randperm(self.pool, generator=generator, device=generator.device)[:n]
        return perm.sort().values.to(self.device)
