"""ANML and OML as functional forwards over a flat dict of named parameters.

Parameter names (stable; checkpoints use them):
  ANML: nm.conv{1,2,3}.{weight,bias}, nm.norm{1,2,3}.{weight,bias}, nm.fc.{weight,bias},
        pln.conv{1,2,3}.{weight,bias}, pln.norm{1,2,3}.{weight,bias}, pln.fc.{weight,bias}
        (in this order: the order of the reference's 28 `vars`, NM first).
  OML:  rln.conv{1..6}.{weight,bias}, pln.fc1.{weight,bias}, pln.fc2.{weight,bias}.
Inputs are [B, 3, 28, 28]; spatial sizes 28 -> 26 -> 13 -> 11 -> 5 -> 3 in both ANML trunks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from .config import ModelConfig

Params = dict[str, torch.Tensor]
IN_CHANNELS = 3
FEATURE_SIDE = 3  # the trunks end at 3 x 3
OML_STRIDES = (1, 1, 1, 2, 1, 2)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "kaiming" (normal, fan-in, gain sqrt 2), "zeros" or "ones"


class Network:
    """What every model offers the trainers; one subclass per kind."""

    output_layer: str  # prefix of the output layer, e.g. "pln.fc"
    inner_default: tuple[str, ...]  # prefixes adapted in the meta-training inner loop

    def __init__(self, config: ModelConfig):
        self.config = config

    def param_specs(self) -> list[ParamSpec]:
        raise NotImplementedError

    def gate(self, params: Params, x: torch.Tensor) -> torch.Tensor | None:
        """Whatever the inner loop may compute once per trajectory because it does not adapt it."""
        return None

    def features(self, params: Params, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the output layer."""
        raise NotImplementedError

    def forward(self, params: Params, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        w, b = params[f"{self.output_layer}.weight"], params[f"{self.output_layer}.bias"]
        return F.linear(self.features(params, x, gate), w, b)

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the logits (models with a fused head override this)."""
        return F.cross_entropy(self.forward(params, x, gate), y)

    def gate_params(self) -> tuple[str, ...]:
        """Prefixes of the parameters `gate` reads (they must not adapt if `gate` is reused)."""
        return ()

    def init_params(self, generator: torch.Generator | None = None, device="cpu",
                    dtype=torch.float32) -> Params:
        params = {}
        for spec in self.param_specs():
            t = torch.empty(spec.shape, device=device, dtype=dtype)
            if spec.init == "kaiming":
                torch.nn.init.kaiming_normal_(t, generator=generator)
            elif spec.init == "zeros":
                t.zero_()
            else:
                t.fill_(1.0)
            params[spec.name] = t
        return params

    def reset_output(self, params: Params, generator: torch.Generator | None = None) -> None:
        """Kaiming-normal output weight and zero bias, in place (meta-test start)."""
        with torch.no_grad():
            torch.nn.init.kaiming_normal_(params[f"{self.output_layer}.weight"], generator=generator)
            params[f"{self.output_layer}.bias"].zero_()

    def reset_output_rows(self, params: Params, rows: torch.Tensor,
                          generator: torch.Generator | None = None) -> None:
        """Kaiming-normal re-draw of some rows of the output weight, in place (meta-train step 1).

        The reference re-initialises only the weight row of the trajectory's class, not its bias.
        """
        w = params[f"{self.output_layer}.weight"]
        std = math.sqrt(2.0 / w.shape[1])
        with torch.no_grad():
            fresh = torch.randn(len(rows), w.shape[1], generator=generator, device=w.device, dtype=w.dtype)
            w[rows] = fresh * std

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.param_specs())


def _conv_specs(prefix: str, widths: list[int], norms: bool) -> list[ParamSpec]:
    specs, cin = [], IN_CHANNELS
    for i, c in enumerate(widths, 1):
        specs += [ParamSpec(f"{prefix}.conv{i}.weight", (c, cin, 3, 3), "kaiming"),
                  ParamSpec(f"{prefix}.conv{i}.bias", (c,), "zeros")]
        if norms:
            specs += [ParamSpec(f"{prefix}.norm{i}.weight", (c,), "ones"),
                      ParamSpec(f"{prefix}.norm{i}.bias", (c,), "zeros")]
        cin = c
    return specs


def _linear_specs(name: str, out_f: int, in_f: int) -> list[ParamSpec]:
    return [ParamSpec(f"{name}.weight", (out_f, in_f), "kaiming"), ParamSpec(f"{name}.bias", (out_f,), "zeros")]


class ANML(Network):
    """A neuromodulatory trunk (NM) whose sigmoid output gates the prediction trunk's (PLN) features."""

    output_layer = "pln.fc"
    inner_default = ("pln",)

    def param_specs(self):
        c = self.config
        feat_nm, feat_pln = c.nm_channels * FEATURE_SIDE ** 2, c.pln_channels * FEATURE_SIDE ** 2
        return (_conv_specs("nm", [c.nm_channels] * 3, True) + _linear_specs("nm.fc", feat_pln, feat_nm)
                + _conv_specs("pln", [c.pln_channels] * 3, True) + _linear_specs("pln.fc", c.num_outputs, feat_pln))

    @staticmethod
    def trunk(params: Params, prefix: str, x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2, 3):
            p = f"{prefix}.conv{i}"
            n = f"{prefix}.norm{i}"
            x = ops.conv_block(x, params[f"{p}.weight"], params[f"{p}.bias"],
                               params[f"{n}.weight"], params[f"{n}.bias"], pool=i < 3)
        return x.flatten(1)

    def gate(self, params, x):
        """The NM's pre-sigmoid output (the gate's logits), [B, pln_channels * 9]."""
        return F.linear(self.trunk(params, "nm", x), params["nm.fc.weight"], params["nm.fc.bias"])

    def gate_params(self):
        return ("nm",)

    def features(self, params, x, gate=None):
        if gate is None:
            gate = self.gate(params, x)
        return self.trunk(params, "pln", x) * torch.sigmoid(gate)

    def forward(self, params, x, gate=None):
        if gate is None:
            gate = self.gate(params, x)
        return ops.gated_head(self.trunk(params, "pln", x), gate, params["pln.fc.weight"], params["pln.fc.bias"])

    def loss(self, params, x, y, gate=None):
        if gate is None:
            gate = self.gate(params, x)
        return ops.gated_head_cross_entropy(self.trunk(params, "pln", x), gate, params["pln.fc.weight"],
                                            params["pln.fc.bias"], y)


class OML(Network):
    """OML as configured in the ANML code: 6 convs (RLN), then two linear layers (PLN)."""

    output_layer = "pln.fc2"
    inner_default = ("pln",)

    def param_specs(self):
        c = self.config
        return (_conv_specs("rln", [c.pln_channels] * len(OML_STRIDES), False)
                + _linear_specs("pln.fc1", c.oml_hidden, c.pln_channels * FEATURE_SIDE ** 2)
                + _linear_specs("pln.fc2", c.num_outputs, c.oml_hidden))

    def features(self, params, x, gate=None):
        for i, stride in enumerate(OML_STRIDES, 1):
            x = F.relu(F.conv2d(x, params[f"rln.conv{i}.weight"], params[f"rln.conv{i}.bias"], stride=stride))
        return F.relu(F.linear(x.flatten(1), params["pln.fc1.weight"], params["pln.fc1.bias"]))


def build(config: ModelConfig) -> Network:
    return {"anml": ANML, "oml": OML}[config.kind](config)


def select(names, prefixes) -> list[str]:
    """Parameter names that equal a prefix or start with `prefix.`, in model order."""
    prefixes = tuple(prefixes)
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
