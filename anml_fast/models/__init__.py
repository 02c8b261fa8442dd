"""ANML and OML models: configuration, functional forwards, and an nn.Module face."""
from .config import KINDS, ModelConfig
from .module import FunctionalModel
from .networks import ANML, OML, Network, Params, build, select

__all__ = ["KINDS", "ModelConfig", "FunctionalModel", "ANML", "OML", "Network", "Params", "build", "select"]
