"""Model configuration: JSON-able, stored in every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import CheckpointError

KINDS = ("anml", "oml")
INPUT_NORMS = ("reference", "standard")  # how data.tasks.normalize scales images


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of an ANML or OML model. The defaults are the protocol's (about 2.6M + 3.5M parameters)."""

    kind: str = "anml"
    nm_channels: int = 112  # ANML neuromodulatory trunk
    pln_channels: int = 256  # ANML prediction trunk, and OML's convs
    num_outputs: int = 1000
    oml_hidden: int = 1024
    # How images are scaled before the model sees them (data.tasks.normalize). None: the kind's
    # default, "reference" for ANML (faithful) and "standard" for OML, which learns nothing from
    # the reference's nearly constant images (it has no normalisation layers to recover them).
    input_norm: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {KINDS}")
        if self.input_norm is None:
            object.__setattr__(self, "input_norm", "standard" if self.kind == "oml" else "reference")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input normalisation {self.input_norm!r} is not one of {INPUT_NORMS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model config has unknown keys {sorted(unknown)}")
        # A stored config without the key predates it, and every model then saw the reference's
        # scaling (OML too); only new configs take the kind's default.
        d = {"input_norm": "reference", **d}
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad model config {d}: {e}") from None
