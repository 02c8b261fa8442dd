"""Model configuration: JSON-able, stored in every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import CheckpointError

KINDS = ("anml", "oml")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of an ANML or OML model. The defaults are the protocol's (about 2.6M + 3.5M parameters)."""

    kind: str = "anml"
    nm_channels: int = 112  # ANML neuromodulatory trunk
    pln_channels: int = 256  # ANML prediction trunk, and OML's convs
    num_outputs: int = 1000
    oml_hidden: int = 1024

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {KINDS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model config has unknown keys {sorted(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad model config {d}: {e}") from None
