"""An `nn.Module` face over the functional models, for people who want one.

Its `state_dict()` keys are the flat parameter names, so it loads our checkpoints directly.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .networks import build


class FunctionalModel(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig(), params: dict[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.net = build(config)
        params = params if params is not None else self.net.init_params(generator)
        for name, value in params.items():
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(value))

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward(self.params(), x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.params(), x)
