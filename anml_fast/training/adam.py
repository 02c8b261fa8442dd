"""Adam over a dict of named tensors, with its state as plain named tensors for checkpoints.

The arithmetic is torch.optim.Adam's (tested against it); keeping the state as named tensors lets a
checkpoint hold it in safetensors, and lets the fused multi-tensor update replace the step.
"""
from __future__ import annotations

import torch

from .. import ops


class Adam:
    def __init__(self, params: dict[str, torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        self.step_count = 0
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        names = [k for k in self.params if grads.get(k) is not None]
        self.step_count += 1
        ops.adam_update_([self.params[k] for k in names], [grads[k] for k in names],
                         [self.exp_avg[k] for k in names], [self.exp_avg_sq[k] for k in names],
                         self.step_count, self.lr, self.betas[0], self.betas[1], self.eps)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"adam.exp_avg.{k}": v for k, v in self.exp_avg.items()}
        out.update({f"adam.exp_avg_sq.{k}": v for k, v in self.exp_avg_sq.items()})
        out["adam.step"] = torch.tensor([self.step_count], dtype=torch.int64)
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.params:
            self.exp_avg[k].copy_(state[f"adam.exp_avg.{k}"])
            self.exp_avg_sq[k].copy_(state[f"adam.exp_avg_sq.{k}"])
        self.step_count = int(state["adam.step"][0])
