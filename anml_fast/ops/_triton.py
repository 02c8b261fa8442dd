"""Loading the Triton kernel modules (kernels/, installed as anml_fast.kernels), failures remembered."""
from __future__ import annotations

import importlib
from types import ModuleType


def import_kernels(name: str) -> tuple[ModuleType | None, str | None]:
    """(the kernel module, None), or (None, why it did not import: no Triton, say).

    Called when an op module is imported, not on first use: torch.compile cannot trace an import
    inside an op.
    """
    try:
        try:
            return importlib.import_module(f"anml_fast.kernels.{name}"), None
        except ModuleNotFoundError as e:
            if e.name != "anml_fast.kernels":
                raise
            # A source checkout run without installing (PYTHONPATH=.): setup.py maps kernels/ to
            # anml_fast.kernels only at install time. Only one of the two names is ever imported,
            # so the ops are registered once.
            return importlib.import_module(f"kernels.{name}"), None
    except Exception as e:  # anything at all means "these kernels are not here"
        return None, f"{type(e).__name__}: {e}"


def require(kernels: ModuleType | None, import_error: str | None, what: str,
            instead: str = "backend='torch'") -> ModuleType:
    """The kernel module an op module imported, or the error its ops raise when there is none."""
    if kernels is None:
        raise RuntimeError(f"anml_fast's Triton {what} not available ({import_error}); use {instead}")
    return kernels


class TritonSelfTest:
    """Whether a Triton op module works here, decided once by running its ops against their twins.

    `self_test(device)` returns None when they agree, else why not; any exception counts as "no".
    On CUDA the ops run when a GPU is present; on the CPU only when the kernels were defined under
    TRITON_INTERPRET=1 (Triton's interpreter: for tests, far too slow for training).
    """

    def __init__(self, kernels: ModuleType | None, import_error: str | None, self_test):
        self.kernels, self.import_error, self.self_test = kernels, import_error, self_test
        self.state: dict[str, object] = {}

    def interpreted(self) -> bool:
        return self.kernels is not None and self.kernels.interpreted()

    def _device(self):
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu") if self.interpreted() else None

    def available(self, device=None) -> bool:
        import torch

        if device is not None:
            on_cuda = torch.device(device).type == "cuda"
            if on_cuda != torch.cuda.is_available() or (not on_cuda and not self.interpreted()):
                return False
        if "ok" not in self.state:
            try:
                if self.kernels is None:
                    reason = f"the Triton kernels did not import ({self.import_error})"
                elif self._device() is None:
                    reason = "no CUDA device, and the kernels were not defined under TRITON_INTERPRET=1"
                else:
                    # as DeviceSelfTest does: independent of the caller's grad mode
                    with torch.inference_mode(False), torch.enable_grad():
                        reason = self.self_test(self._device())
            except Exception as e:  # anything at all means "do not use these kernels here"
                reason = f"{type(e).__name__}: {e}"
            self.state.update(reason=reason, ok=reason is None)
        return bool(self.state["ok"])

    def unavailable_reason(self, device=None) -> str | None:
        """Why `available(device)` said no (None if it said yes or has not run)."""
        import torch

        if device is not None and torch.device(device).type == "cpu" and not self.interpreted():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return self.state.get("reason")  # type: ignore[return-value]
