"""The plain-PyTorch twins against independent computations."""
import pytest
import torch

from anml_fast import ops
from anml_fast.training.adam import Adam
from conftest import assert_close


def test_adam_matches_torch_optim():
    shapes = [(5, 3), (7,), (2, 3, 4)]
    ours = {f"p{i}": torch.randn(s, dtype=torch.float64) for i, s in enumerate(shapes)}
    theirs = [v.clone().requires_grad_() for v in ours.values()]
    opt_t = torch.optim.Adam(theirs, lr=3e-3, foreach=False)
    opt_o = Adam(ours, lr=3e-3)
    for _ in range(5):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt_t.step()
        opt_o.step(dict(zip(ours, grads)))
    for (k, o), t in zip(ours.items(), theirs):
        assert_close(o, t.detach(), atol=1e-12, rtol=1e-12, what=k)


def test_adam_state_round_trip():
    p = {"a": torch.randn(4)}
    opt = Adam(p)
    opt.step({"a": torch.randn(4)})
    state = {k: v.clone() for k, v in opt.state_tensors().items()}
    opt2 = Adam({"a": p["a"].clone()})
    opt2.load_state_tensors(state)
    g = torch.randn(4)
    q = {"a": p["a"].clone()}
    opt2.params = q
    opt.step({"a": g})
    opt2.step({"a": g})
    assert torch.equal(p["a"], q["a"])


def test_sgd_update_is_out_of_place():
    w = [torch.randn(3), torch.randn(2, 2)]
    g = [torch.randn(3), torch.randn(2, 2)]
    new = ops.sgd_update(w, g, 0.1)
    for wi, gi, ni in zip(w, g, new):
        assert torch.equal(ni, wi - 0.1 * gi)
        assert ni.data_ptr() != wi.data_ptr()


@pytest.mark.parametrize("pool", [True, False])
def test_conv_block_gradcheck(pool):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    nw = torch.randn(4, dtype=torch.float64, requires_grad=True)
    nb = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.conv_block(*a, pool=pool), (x, w, b, nw, nb))


def test_gated_head_gradcheck():
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3, 6), (3, 6), (5, 6), (5,)]]
    assert torch.autograd.gradcheck(ops.gated_head, args)
