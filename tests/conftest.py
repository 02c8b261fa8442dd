import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs the kernels on CPU tensors; it must be on before any kernel is
    # defined, i.e. before anything imports anml_fast.ops.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from anml_fast.data.cache import OmniglotImages  # noqa: E402
from anml_fast.models import ModelConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_plans():
    """No op-call plan (kernels/_plan.py) outlives a test: tests change kernel modules' constants
    (tile tables, thresholds) that a plan would have read when it was recorded."""
    yield
    import sys
    plan = sys.modules.get("anml_fast.kernels._plan")
    if plan is not None:
        plan.clear()


@pytest.fixture(autouse=True)
def _ieee_float32_convolutions():
    """float32 convolutions in IEEE float32 unless a test asks for TF32: PyTorch's default lets
    cuDNN use TF32 (a 10-bit mantissa), and the Triton convolutions follow the same flag, so the
    two sides of a fused-against-twin comparison would each carry a TF32 error of their own."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """torch.testing.assert_close, plus where the largest difference is."""
    diff = (actual.double() - expected.double()).abs()
    if diff.numel():
        i = int(diff.argmax())
        where = f"{what}: max |diff| {diff.max().item():.3g} at flat index {i} " \
                f"(actual {actual.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g})"
    else:
        where = what
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{where}\n{m}")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot; under CI its absence is a failure, not a skip."""
    root = Path(os.environ.get("ANML_FAST_DATA", REPO.parent / "shared" / "omniglot"))
    if not (root / "omniglot-py" / "images_background").is_dir():
        msg = f"Omniglot not found at {root} (set ANML_FAST_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def omniglot(omniglot_root, omniglot_cache_dir):
    from anml_fast.data.cache import load_omniglot

    return load_omniglot(omniglot_root, omniglot_cache_dir, progress=False)


@pytest.fixture(scope="session")
def synthetic_data() -> OmniglotImages:
    """Omniglot-shaped random images: fast, for everything that does not need real drawings."""
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (1623, 20, 28, 28), dtype=torch.uint8, generator=g)
    return OmniglotImages(images, [f"images_x/class{i:04d}" for i in range(1623)], 964)


TINY = ModelConfig(kind="anml", nm_channels=4, pln_channels=6)
TINY_OML = ModelConfig(kind="oml", pln_channels=6, oml_hidden=16)
