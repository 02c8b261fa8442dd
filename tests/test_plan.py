"""kernels/_plan.py and csrc/triton_plan.cpp: eager calls replayed from recorded plans.

What could go wrong: a recording that binds a launch's tensor to the wrong source (an input, a
fresh allocation, a persistent buffer) or misses work the implementation did outside its launches
(then a replay computes something else); a plan outliving what it read (the TF32 switch, the
stream, a CUDA-graph capture); the C++ autograd node giving other grads than the op's Python
backward, or none for second order. The recorder's rules run on the CPU (CI); the replays need
the CUDA build of the extension and a GPU.
"""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import anml_fast.ops  # noqa: E402

conv_ops = sys.modules["anml_fast.ops.conv_valid"]
head_ops = sys.modules["anml_fast.ops.gated_head"]
CONV = conv_ops._kernels() if conv_ops.available("cuda" if torch.cuda.is_available() else "cpu") else None
if CONV is None:
    pytest.skip("the Triton ops run on the CPU only under TRITON_INTERPRET=1", allow_module_level=True)
HEAD = head_ops._kernels()
_plan = sys.modules[CONV.EagerOp.__module__.replace("_eager", "_plan")]
_launch = sys.modules[_plan.__name__.replace("_plan", "_launch")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Store:
    """Stands in for the C++ plan table: keeps what `record` offers it."""
    def plan_store(self, op_id, args, ok, launches, allocs, outputs, tuple_out, keep):
        self.offered = dict(ok=ok, steps=launches, allocs=allocs, outputs=outputs, tuple_out=tuple_out, keep=keep)
        return 0


class _Kernel:
    """A launch target that runs nothing (launch() records before it launches)."""


def _recorded(impl, *args, monkeypatch):
    def no_launch(kernel, grid, *a, **k):
        rec = _launch._RECORDING.rec
        rec.steps.append((kernel, grid, a, k))
    monkeypatch.setattr(_launch, "launch", no_launch)
    store = _Store()
    out = _plan.record(store, 1, lambda *a: impl(no_launch, *a), args)
    return out, store.offered


def test_a_recording_binds_inputs_allocations_and_persistent_buffers(monkeypatch):
    x, w = torch.randn(2, 3), torch.randn(3)
    buffer = _plan.persistent(torch.zeros(8, dtype=torch.int32))
    kernel = _Kernel()

    def impl(launch, x, w):
        out = x.new_empty((2, 3))
        scratch = torch.empty_like(w)
        launch(kernel, (2, 1), x, w, out, 7, 0.5, None, Scratch=scratch, Count=buffer[2:], FLAG=True)
        return out, scratch

    out, offered = _recorded(impl, x, w, monkeypatch=monkeypatch)
    assert offered["ok"] and offered["tuple_out"]
    (kid, grid, _, _, binds), = offered["steps"]
    assert kid == id(kernel) and grid == (2, 1)
    # x, w: inputs 0, 1; out: allocation 0; the scalars: constants; scratch: allocation 1;
    # the counters' view: a constant kept alive by the plan
    assert binds == ((1, 0), (1, 1), (2, 0), (0, 0), (0, 0), (0, 0), (2, 1), (0, 0), (0, 0))
    assert offered["outputs"] == (0, 1)
    assert len(offered["keep"]) == 1 and offered["keep"][0].untyped_storage().data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("what", ["fill", "input view", "foreign tensor", "output is an input", "copy", "other aten op",
                                  "input written in place", "input written by out="])
def test_calls_that_do_more_than_allocate_and_launch_are_not_recorded(what, monkeypatch):
    x = torch.randn(4, 4)
    foreign = torch.zeros(4)  # an unregistered tensor made before the call
    kernel = _Kernel()

    def impl(launch, x):
        out = torch.empty_like(x)
        if what == "fill":
            out.zero_()
        src = x[1:] if what == "input view" else x  # a slice: not one of the ATen steps
        launch(kernel, (1,), src, out, foreign if what == "foreign tensor" else out)
        if what == "copy":
            out.copy_(x)
        if what == "other aten op":
            batch = x.new_empty((1, 4, 4))
            torch.bmm(batch, batch)
        if what == "input written in place":  # a replay would not bump the input's version
            x.addmm_(out, out)
        if what == "input written by out=":
            torch.mm(out, out, out=x)
        return x if what == "output is an input" else out

    _, offered = _recorded(impl, x, monkeypatch=monkeypatch)
    assert not offered["ok"]


def test_aten_steps_are_recorded_in_order_with_their_results_bound(monkeypatch):
    """The cuBLAS products (and the transposes that feed them) become steps C++ replays through
    the dispatcher: every tensor bound to an input, an allocation or an earlier step's result, the
    schema's defaults filled in, an out= result bound to its allocation."""
    h, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    kernel = _Kernel()

    def impl(launch, h, w, b):
        a = torch.empty_like(h)
        launch(kernel, (1,), h, a)
        logits = h.new_empty((4, 3))
        torch.addmm(b, a, w.t(), out=logits)
        da = torch.mm(logits, w)  # a result no allocation holds
        launch(kernel, (2,), da, w.t())  # the same transpose again: bound to the first one's result
        scratch = torch.empty_like(a)
        scratch.addmm_(logits, w, alpha=-0.5)  # in place on an allocation (on an input: refused)
        return logits

    with torch.no_grad():
        out, offered = _recorded(impl, h, w, b, monkeypatch=monkeypatch)
    assert offered["ok"] and offered["outputs"] == (1,)
    steps = offered["steps"]
    assert [s[0] if isinstance(s[0], str) else "launch" for s in steps] == [
        "launch", "aten::t", "aten::addmm", "aten::mm", "launch", "aten::addmm_"]
    assert steps[0][4] == ((1, 0), (2, 0))
    assert steps[1][1:] == ("", (None,), ((1, 1),), (0,))  # w.t(): the steps' result 0
    assert steps[2][1:] == ("out", (None, None, None, 1, 1, None),
                            ((1, 2), (2, 0), (3, 0), (0, 0), (0, 0), (2, 1)), (-1,))
    assert steps[3][3:] == (((2, 1), (1, 1)), (1,))  # da: result 1
    assert steps[4][4] == ((3, 1), (3, 0))
    assert steps[5][1:] == ("", (None, None, None, 1, -0.5), ((2, 2), (2, 1), (1, 1), (0, 0), (0, 0)), (-1,))


def test_a_grad_spec_may_not_read_the_grad_of_a_non_differentiable_output():
    """Such grads reach the C++ node's backward undefined (it does not fill them with zeros)."""
    op = HEAD.direct.gated_head_ce_fwd
    with pytest.raises(ValueError, match="non-differentiable"):
        op.plan_backward(HEAD.direct.gated_head_ce_bwd, ((0, 0), (0, 1)), (0, -1), nondiff=(1, 2))
    assert op.grad_spec[5] == (1, 2)  # the op's own spec is left as it was


def test_a_call_refused_a_plan_under_autograd_is_not_offered_again(monkeypatch):
    """plan_autograd's -1 (no plan will serve this call) sends the call straight to the
    implementation under the Python Function: plan_run would only compute the same key again."""
    offered = []

    class Ext:  # the C++ plan table, refusing every call
        plan_grad_spec = staticmethod(lambda *a: 0)
        plan_autograd = staticmethod(lambda *a: -1)
        plan_run = staticmethod(lambda *a: offered.append(a) or -1)

    monkeypatch.setattr(_plan, "ext", lambda: Ext)
    op = HEAD.direct.gated_head_fwd
    monkeypatch.setattr(op, "grad_spec", list(op.grad_spec))  # its C++ spec id stays as it was
    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    w, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    leaves = [t.clone().to(DEVICE).requires_grad_() for t in (h, z, w, b)]
    out = op(*leaves)
    assert offered == [] and "unplanned" in out.grad_fn.name()
    twin = [t.clone().to(DEVICE).requires_grad_() for t in (h, z, w, b)]
    want = torch.nn.functional.linear(twin[0] * torch.sigmoid(twin[1]), twin[2], twin[3])
    torch.testing.assert_close(out, want)
    for a, b_ in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), twin)):
        torch.testing.assert_close(a, b_)


def test_the_recording_switch_is_off_outside_a_recording(monkeypatch):
    _recorded(lambda launch, x: torch.empty_like(x), torch.randn(2), monkeypatch=monkeypatch)
    assert getattr(_launch._RECORDING, "rec", None) is None


# ---------------------------------------------------------------------------------------------
# Replays (CUDA build and a GPU)
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _ext_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _plan.ext() is None:
        pytest.fail("plans are unavailable: anml_fast._C was built without CUDA, or the C++ launch is off")
    return _plan.ext()


def _conv_inputs(dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 256, 13, 13, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(256, 256, 3, 3, device="cuda", dtype=dtype, generator=g) * 0.02
    gy = torch.randn(1, 256, 11, 11, device="cuda", dtype=dtype, generator=g)
    return x, w, gy


def _python(fn):
    was = _plan.enable(False)
    try:
        return fn()
    finally:
        _plan.enable(was)


@gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_replayed_conv_calls_equal_the_python_path(tf32):
    _ext_or_skip()
    torch.backends.cudnn.allow_tf32 = tf32
    x, w, gy = _conv_inputs()
    want_y = _python(lambda: CONV.direct.conv_valid(x, w))
    want_g = _python(lambda: CONV.direct.conv_valid_backward(gy, x, w, True, True))
    before = _plan.stats()["served"]
    for _ in range(4):
        x2, w2, gy2 = (t.clone() for t in (x, w, gy))  # new addresses each call
        assert torch.equal(CONV.direct.conv_valid(x2, w2), want_y)
        gx, gw = CONV.direct.conv_valid_backward(gy2, x2, w2, True, True)
        assert torch.equal(gx, want_g[0]) and torch.equal(gw, want_g[1])
    assert _plan.stats()["served"] - before >= 4  # the last two calls of each op at least


@gpu
def test_a_plan_follows_the_tf32_switch_and_the_stream():
    _ext_or_skip()
    x, w, _ = _conv_inputs()
    results = {}
    for tf32 in (False, True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        for _ in range(3):
            y = CONV.direct.conv_valid(x, w)
        want = _python(lambda: CONV.direct.conv_valid(x, w))
        assert torch.equal(y, want)
        results[tf32] = y
    assert not torch.equal(results[False], results[True])  # TF32 products differ at this length
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            y = CONV.direct.conv_valid(x, w)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, results[False])


@gpu
def test_plans_stay_out_of_cuda_graph_capture():
    _ext_or_skip()
    x, w, _ = _conv_inputs()
    for _ in range(3):
        want = CONV.direct.conv_valid(x, w)
    served = _plan.stats()["served"]
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            y = CONV.direct.conv_valid(x, w)
    torch.cuda.current_stream().wait_stream(side)
    assert _plan.stats()["served"] == served
    graph.replay()
    assert torch.equal(y, want)


def _conv_grads(x, w, gy, need):
    xl, wl = x.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1])
    y = anml_fast.ops.conv_valid(xl, wl, backend="compiled")
    y.backward(gy)
    return y.detach(), xl.grad, wl.grad, y.grad_fn


@gpu
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_the_cxx_autograd_node_gives_the_python_backwards_grads(need):
    _ext_or_skip()
    x, w, gy = _conv_inputs()
    want = _python(lambda: _conv_grads(x, w, gy, need))
    for _ in range(4):
        got = _conv_grads(x, w, gy, need)
        for a, b in zip(got[:3], want[:3]):
            assert (a is None and b is None) or torch.equal(a, b)
    assert "Planned" in got[3].name()  # the C++ node, not the Python Function


@gpu
def test_the_cxx_node_runs_the_backward_without_python(monkeypatch):
    _ext_or_skip()
    x, w, gy = _conv_inputs()
    for _ in range(3):
        _conv_grads(x, w, gy, (True, True))
    op = CONV.direct.conv_valid_backward

    def refuse(*args):
        raise AssertionError("the backward ran its Python")
    monkeypatch.setattr(op, "impl", refuse)
    _conv_grads(x, w, gy, (True, True))


@gpu
def test_the_cxx_node_builds_second_order_graphs_through_the_twin():
    _ext_or_skip()
    x, w, gy = _conv_inputs(torch.float64)
    x, w, gy = x[:, :8, :6, :6].contiguous(), w[:4, :8].contiguous(), gy[:, :4, :4, :4].contiguous()
    for _ in range(3):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = anml_fast.ops.conv_valid(xl, wl, backend="compiled")
    assert "Planned" in y.grad_fn.name()
    gx, = torch.autograd.grad(y, xl, gy, create_graph=True)
    gw2, = torch.autograd.grad((gx * gx).sum(), wl)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    gxt, = torch.autograd.grad(torch.nn.functional.conv2d(xt, wt), xt, gy, create_graph=True)
    want, = torch.autograd.grad((gxt * gxt).sum(), wt)
    torch.testing.assert_close(gw2, want)


@gpu
def test_the_head_node_gives_the_python_backwards_grads():
    _ext_or_skip()
    g = torch.Generator(device="cuda").manual_seed(0)
    h, z = (torch.randn(1, 2304, device="cuda", generator=g) for _ in range(2))
    w, b = torch.randn(1000, 2304, device="cuda", generator=g) * 0.02, torch.randn(1000, device="cuda", generator=g)
    gl = torch.randn(1, 1000, device="cuda", generator=g)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
        out = head_ops.gated_head(*leaves)
        out.backward(gl)
        return [out.detach()] + [t.grad for t in leaves], out.grad_fn
    want, _ = _python(grads)
    for _ in range(4):
        got, fn = grads()
        for a, b_ in zip(got, want):
            assert torch.equal(a, b_)
    assert "Planned" in fn.name()


def _head84(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h, z = (torch.randn(84, 2304, device="cuda", generator=g) for _ in range(2))
    w = torch.randn(1000, 2304, device="cuda", generator=g) * 0.02
    b = torch.randn(1000, device="cuda", generator=g)
    target = torch.randint(0, 1000, (84,), device="cuda", generator=g)
    return h, z, w, b, target


def _head84_ce_grads(h, z, w, b, target):
    leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
    loss = head_ops.gated_head_cross_entropy(*leaves, target)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves], loss.grad_fn.name()


@gpu
def test_batch84_head_replays_its_cublas_steps_and_follows_the_matmul_switch():
    """The meta-loss's head calls cuBLAS inside the op: its plans replay those products through the
    dispatcher, under the C++ autograd node (three outputs, two of them saved for the backward and
    not differentiable). Bit for bit the Python path's, for the forward and the backward, under the
    matmul TF32 switch off and on, flipped between calls (a replayed product reads it as it runs)."""
    _ext_or_skip()
    inputs = _head84()
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        results = {}
        for tf32 in (False, True, False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            want, _ = _python(lambda: _head84_ce_grads(*inputs))
            before = _plan.stats()["served"]
            for _ in range(3):
                got, node = _head84_ce_grads(*inputs)
                for a, b_ in zip(got, want):
                    assert torch.equal(a, b_)
            assert _plan.stats()["served"] > before
            assert "Planned" in node  # the C++ node, with logits and lse saved and non-differentiable
            results[tf32] = got
        assert not torch.equal(results[False][3], results[True][3])  # dW: TF32 products differ
        logits_want = _python(lambda: head_ops.gated_head(*inputs[:4]))
        for _ in range(3):
            assert torch.equal(head_ops.gated_head(*inputs[:4]), logits_want)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


@gpu
def test_the_cross_entropy_node_builds_second_order_graphs_through_the_twin():
    _ext_or_skip()
    h, z, w, b, target = _head84()
    h, z, w = (t[:rows, :40].double().contiguous() for t, rows in ((h, 6), (z, 6), (w, 7)))
    b, target = b[:7].double(), target[:6] % 7
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (h, z, w, b)]
        loss = head_ops.gated_head_cross_entropy(*leaves, target)
    assert "Planned" in loss.grad_fn.name()
    gh, = torch.autograd.grad(loss, leaves[0], create_graph=True)
    gw2, = torch.autograd.grad((gh * gh).sum(), leaves[2])
    twin = [t.clone().requires_grad_() for t in (h, z, w, b)]
    twin_loss = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(twin[0] * torch.sigmoid(twin[1]), twin[2], twin[3]), target)
    gh_t, = torch.autograd.grad(twin_loss, twin[0], create_graph=True)
    want, = torch.autograd.grad((gh_t * gh_t).sum(), twin[2])
    torch.testing.assert_close(gw2, want)


@gpu
def test_unplannable_calls_stay_correct():
    _ext_or_skip()
    x, w, _ = _conv_inputs()
    xt = x.transpose(2, 3)  # not contiguous: the implementation copies it, so no plan records it
    want = _python(lambda: CONV.direct.conv_valid(xt, w))
    for _ in range(5):
        assert torch.equal(CONV.direct.conv_valid(xt, w), want)
    assert _plan.stats()["refused"] >= 1


@gpu
def test_an_error_in_the_nodes_python_backward_reaches_python():
    """The C++ node calls the op's Python backward for second-order graphs; its error must come back
    as that error (in a subprocess: a C++ exception that crossed libraries badly would abort)."""
    _ext_or_skip()
    code = """
import sys, torch, anml_fast.ops as ops
K = sys.modules["anml_fast.ops.conv_valid"]._kernels()
x = torch.randn(1, 4, 6, 6, device="cuda", dtype=torch.float64, requires_grad=True)
w = torch.randn(3, 4, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
for _ in range(3):
    y = ops.conv_valid(x, w, backend="compiled")
assert "Planned" in y.grad_fn.name(), y.grad_fn.name()
def broken(*args):
    raise ValueError("python backward failed")
K.direct.conv_valid.grad_spec[3] = None  # re-register the spec with the broken backward
K.direct.conv_valid._backward = broken
y = ops.conv_valid(x, w, backend="compiled")
try:
    torch.autograd.grad(y.sum(), [x], create_graph=True)
except ValueError as e:
    print("raised:", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "raised: python backward failed" in run.stdout, run.stdout + run.stderr
