"""kernels/_eager.py: plain eager calls of the Triton ops skip the custom-op dispatch.

What could go wrong: the direct path's autograd (an autograd.Function built from the op's own
setup_context and backward) giving other grads than the registered op, or other grads depending
on which inputs require them; a traced or transformed call taking the direct path. These run on
the CPU under Triton's interpreter (CI) and on a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import anml_fast.ops  # noqa: E402

conv_ops = sys.modules["anml_fast.ops.conv_valid"]  # the modules (the package's names are the ops)
head_ops = sys.modules["anml_fast.ops.gated_head"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not conv_ops.available("cpu"):
    pytest.skip("the Triton ops run on the CPU only under TRITON_INTERPRET=1", allow_module_level=True)

HEAD = head_ops._kernels()
CONV = conv_ops._kernels()
_eager = sys.modules[HEAD.EagerOp.__module__]


def _head_inputs(dtype=torch.float64, rows=3):
    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(rows, 20, generator=g, dtype=dtype), torch.randn(rows, 20, generator=g, dtype=dtype)
    w, b = torch.randn(7, 20, generator=g, dtype=dtype) * 0.3, torch.randn(7, generator=g, dtype=dtype)
    y = torch.randint(0, 7, (rows,), generator=g)
    return [t.to(DEVICE) for t in (h, z, w, b)], y.to(DEVICE)


class _Refuse:
    """Stands in for a registered op: a call through the dispatcher fails the test."""
    def __call__(self, *args):
        raise AssertionError("went through the registered op")


def test_plain_eager_calls_skip_the_registered_op(monkeypatch):
    (h, z, w, b), y = _head_inputs()
    want = HEAD.gated_head_fwd(h, z, w, b)  # the registered op
    monkeypatch.setattr(HEAD.direct.gated_head_fwd, "op", _Refuse())
    torch.testing.assert_close(head_ops.gated_head(h, z, w, b), want)
    leaf = h.clone().requires_grad_()
    head_ops.gated_head(leaf, z, w, b).sum().backward()  # the autograd.Function, not the op
    assert leaf.grad is not None


def test_traced_and_transformed_calls_take_the_registered_op(monkeypatch):
    (h, z, w, b), _ = _head_inputs()
    monkeypatch.setattr(HEAD.direct.gated_head_fwd, "op", _Refuse())

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode(), pytest.raises(AssertionError, match="registered op"):
        head_ops.gated_head(h, z, w, b)
    with torch._subclasses.FakeTensorMode() as mode, pytest.raises(AssertionError, match="registered op"):
        head_ops.gated_head(*(mode.from_tensor(t) for t in (h, z, w, b)))
    with pytest.raises(AssertionError, match="registered op"):
        torch.func.vmap(lambda hh: head_ops.gated_head(hh, z, w, b))(h.unsqueeze(1))
    monkeypatch.setattr(_eager, "ENABLED", [False])
    with pytest.raises(AssertionError, match="registered op"):
        head_ops.gated_head(h, z, w, b)


def _grads(fn, inputs, need, grad_seed=0):
    leaves = [t.clone().requires_grad_(n) for t, n in zip(inputs, need)]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    wanted = [t for t in leaves if t.requires_grad]
    return out.detach(), torch.autograd.grad(out, wanted, g)


NEEDS = [(True, True, True, True), (True, False, False, False), (False, True, False, True), (False, False, True, False)]


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "".join("x" if v else "-" for v in n))
def test_direct_grads_equal_the_registered_ops(need):
    (h, z, w, b), y = _head_inputs()
    cases = [
        (HEAD.direct.gated_head_fwd, HEAD.gated_head_fwd, (h, z, w, b), need),
        (lambda *a: HEAD.direct.gated_head_ce_fwd(*a, y), lambda *a: HEAD.gated_head_ce_fwd(*a, y), (h, z, w, b), need),
    ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 7, generator=g, dtype=torch.float64).to(DEVICE)
    cw = (torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64) * 0.3).to(DEVICE)
    gamma, beta = (1 + torch.rand(4, generator=g, dtype=torch.float64)).to(DEVICE), \
        torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE)
    cases.append((CONV.direct.conv_valid, CONV.conv_valid, (x, cw), need[:2]))
    cases.append((lambda *a: CONV.direct.conv_valid_plane_norm(*a, True),
                  lambda *a: CONV.conv_valid_plane_norm(*a, True), (x, cw, gamma, beta), need))
    for direct, registered, inputs, nd in cases:
        if not any(nd):
            continue
        out, got = _grads(direct, inputs, nd)
        out_ref, want = _grads(registered, inputs, nd)
        torch.testing.assert_close(out, out_ref)
        for a, b_ in zip(got, want):
            torch.testing.assert_close(a, b_)


def test_double_backward_through_the_direct_path():
    (h, z, w, b), y = _head_inputs(rows=2)
    leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
    torch.autograd.gradgradcheck(lambda *a: HEAD.direct.gated_head_ce_fwd(*a, y)[0], leaves)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    cw = (torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) * 0.3).to(DEVICE).requires_grad_()
    torch.autograd.gradgradcheck(CONV.direct.conv_valid, (x, cw))


def test_the_environment_turns_the_direct_path_off():
    code = ("import sys, anml_fast.ops; m = sys.modules['anml_fast.ops.gated_head']; "
            "print(sys.modules[m._kernels().EagerOp.__module__].ENABLED[0])")
    seen = {}
    for value in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ANML_FAST_EAGER_DIRECT": value},
                             capture_output=True, text=True, check=True).stdout.split()
        seen[value] = out[-1]
    assert seen == {"0": "False", "1": "True"}, seen
