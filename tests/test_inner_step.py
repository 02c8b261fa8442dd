"""The autograd-free batch-1 PLN step on the fused ops against the autograd step on the twins."""
import pytest
import torch

from anml_fast import ops
from anml_fast.models import build
from anml_fast.training.inner_step import PLN_NAMES, pln_sgd_step_autograd, pln_sgd_step_fused
from conftest import TINY, assert_close

# These compare compiled ops and twins on CPU tensors, which needs the Triton kernels under the
# interpreter (conftest turns it on where there is no GPU, as in CI). On a CUDA machine Triton
# runs on the GPU only, so they skip there; test_gpu_trainer and test_gpu_evaluation make the
# same comparisons on the GPU at full size.
pytestmark = pytest.mark.skipif(
    not all(v is True for v in ops.available().values()),
    reason="compares compiled ops and twins on CPU tensors (Triton's interpreter, on where no GPU "
           f"is); not all ops run here: {ops.available()}")


@pytest.mark.parametrize("fused_norm_blocks", [(), (1, 2, 3)], ids=["norm-launches", "norm-in-conv"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
def test_fused_step_equals_autograd_step_on_twins(dtype, tol, fused_norm_blocks):
    net = build(TINY)
    params = net.init_params(torch.Generator().manual_seed(0), dtype=dtype)
    # inputs with real spread (the reference's near-constant images make float32 ill-conditioned)
    x = torch.randn(1, 3, 28, 28, dtype=dtype)
    y = torch.tensor([7])
    gate = net.gate(params, x)
    pln = {n: params[n] for n in PLN_NAMES}
    before = {n: t.clone() for n, t in pln.items()}
    with ops.use_backend("torch"):
        ref_loss, ref = pln_sgd_step_autograd(net, params, pln, x, y, gate, 0.1)
    loss, new = pln_sgd_step_fused(net, params, pln, x, y, gate, 0.1, fused_norm_blocks=fused_norm_blocks)
    assert all(torch.equal(before[n], pln[n]) for n in PLN_NAMES)  # inputs untouched
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol)
    for n in PLN_NAMES:
        assert_close(new[n], ref[n], atol=tol, rtol=tol, what=n)


def test_donated_head_weights_are_updated_in_place():
    """donate=True (the inner loop after its first step) gives the same step, in the given tensors."""
    net = build(TINY)
    params = net.init_params(torch.Generator().manual_seed(0))
    x, y = torch.randn(1, 3, 28, 28), torch.tensor([3])
    gate = net.gate(params, x)
    pln = {n: params[n].clone() for n in PLN_NAMES}
    _, kept = pln_sgd_step_fused(net, params, pln, x, y, gate, 0.1)
    _, donated = pln_sgd_step_fused(net, params, pln, x, y, gate, 0.1, donate=True)
    for n in PLN_NAMES:
        assert torch.equal(kept[n], donated[n]), n
    assert donated["pln.fc.weight"] is pln["pln.fc.weight"] and donated["pln.fc.bias"] is pln["pln.fc.bias"]
