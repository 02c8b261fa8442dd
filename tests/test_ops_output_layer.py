"""The fused meta-test output-layer Adam step against its twin and run_output_layer's arithmetic."""
import re

import pytest
import torch

from anml_fast.ops.reference import adam_update_batched_ as _adam_batched_
from anml_fast.ops import output_layer as ol
from tests.conftest import assert_close

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

pytestmark = pytest.mark.skipif(not ol.available(DEVICE), reason=str(ol.unavailable_reason(DEVICE)))

# Adam normalises the gradient, so the update is ~lr per element whatever the logits' rounding;
# W's error is then a few ulps of W plus lr x (relative error of m / sqrt(v)). Observed under the
# interpreter over 12 steps, max |diff| on any state tensor: 9e-8 (float32), 2.2e-16 (float64);
# the bounds leave ~10x (~50x for float64, whose sums reorder against baddbmm's blocking).
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-14, rtol=1e-12)}
# O = 1: the degenerate single class. The shipped tiles take whole rows of up to 1024 features in
# one chunk; test_small_tiles_carry_sums_across_feature_chunks runs the chunk loop.
SHAPES = [(3, 37, 50), (2, 19, 300), (1, 1, 7)]
NAMES = ("W", "b", "mW", "vW", "mb", "vb", "logits")


def make_state(T, O, F_, dtype=torch.float32, seed=0, X=None):
    """[W, b, mW, vW, mb, vb] of T fresh layers, and their logits primed for step 1 if X is given."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(T, O, F_, generator=g, dtype=dtype) * (2 / F_) ** 0.5  # Kaiming-normal scale
    b = torch.zeros(T, O, dtype=dtype)
    state = (W, b, torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b))
    state = [t.to(DEVICE) for t in state]
    if X is not None:
        state.append(ol.output_layer_logits(state[0], state[1], X, st(1)))
    return state


def make_sequence(T, O, F_, S, dtype=torch.float32, seed=1):
    """Xseq [T, S, F] (ReLU features, some exact zeros) and Yseq [T, S], as run_output_layer has them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, S, F_, generator=g, dtype=dtype).relu()
    Y = torch.randint(0, O, (T, S), generator=g)
    lr = torch.logspace(-4, -2, T, dtype=dtype)
    return X.to(DEVICE), Y.to(DEVICE), lr.to(DEVICE)


def st(s: int) -> torch.Tensor:
    """The op's step argument: the step number as a device tensor."""
    return torch.tensor(s, device=DEVICE)


def fused_and_twin(T, O, F_, S):
    """Fresh float32 layers stepped S times by the op and by the twin: (fused state, twin state)."""
    Xseq, Yseq, lr = make_sequence(T, O, F_, S)
    fused = make_state(T, O, F_, X=Xseq)
    ref = [t.clone() for t in fused]
    for s in range(S):
        ol.output_layer_adam_step_(*fused, Xseq, Yseq, lr, st(s + 1))
        ol.output_layer_adam_step_reference_(*ref, Xseq, Yseq, lr, st(s + 1))
    return fused, ref


def run_output_layer_steps(W, b, Xseq, Yseq, lr):
    """The meta-test output-layer Adam loop written out with host-int steps (an independent
    reference for the op and its twin, which read the step from the device)."""
    T = W.shape[0]
    mW, vW, mb, vb = (torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b))
    rows = torch.arange(T, device=W.device)
    for s in range(Xseq.shape[1]):
        f = Xseq[:, s]
        logits = torch.baddbmm(b.unsqueeze(2), W, f.unsqueeze(2)).squeeze(2)
        d = torch.softmax(logits, 1)
        d[rows, Yseq[:, s]] -= 1
        gW = d.unsqueeze(2) * f.unsqueeze(1)
        _adam_batched_(W, gW, mW, vW, s + 1, lr)
        _adam_batched_(b, d, mb, vb, s + 1, lr)
    return W, b, mW, vW, mb, vb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_twin_over_steps(shape, dtype):
    T, O, F_ = shape
    S = 5
    Xseq, Yseq, lr = make_sequence(T, O, F_, S, dtype)
    fused = make_state(T, O, F_, dtype, X=Xseq)
    ref = [t.clone() for t in fused]
    for s in range(S):
        ol.output_layer_adam_step_(*fused, Xseq, Yseq, lr, st(s + 1))
        ol.output_layer_adam_step_reference_(*ref, Xseq, Yseq, lr, st(s + 1))
        for name, got, want in zip(NAMES, fused, ref):
            assert_close(got, want, **TOL[dtype], what=f"{name} after step {s + 1}")
    # the carried logits are the next image's under the updated layer
    want = ol.output_layer_logits(fused[0], fused[1], Xseq, st(S + 1))
    assert_close(fused[6], want, **TOL[dtype], what="carried logits")
    if O > 1:  # with one class softmax is 1 and d = 0: nothing moves
        assert not torch.equal(fused[0], make_state(T, O, F_, dtype)[0])


@pytest.mark.parametrize("tiles", [dict(BLOCK_O=1, BLOCK_F=16, num_warps=1, num_stages=1),
                                   dict(BLOCK_O=2, BLOCK_F=64, num_warps=2, num_stages=2),
                                   dict(BLOCK_O=4, BLOCK_F=32, num_warps=2, num_stages=1)],
                         ids=["1x16", "2x64", "4x32"])
def test_small_tiles_carry_sums_across_feature_chunks(tiles, monkeypatch):
    """Tiles narrower than the feature axis (300 = several chunks and a ragged tail) and row blocks
    that do not divide O: the next logits' running sum and every mask against the twin."""
    monkeypatch.setattr(ol._kernels(), "ADAM_CONFIGS", {1: tiles})
    fused, ref = fused_and_twin(T=2, O=19, F_=300, S=4)
    for name, got, want in zip(NAMES, fused, ref):
        assert_close(got, want, **TOL[torch.float32], what=f"{name} with tiles {tiles}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twin_matches_host_step_arithmetic(dtype):
    """The twin (step on the device) against the same arithmetic with the step as a host int. Not
    bitwise on CUDA: there a division by a host scalar is a multiplication by its reciprocal."""
    T, O, F_, S = 3, 37, 50, 6
    Xseq, Yseq, lr = make_sequence(T, O, F_, S, dtype)
    W, b = make_state(T, O, F_, dtype)[:2]
    want = run_output_layer_steps(W.clone(), b.clone(), Xseq, Yseq, lr)
    twin = make_state(T, O, F_, dtype, X=Xseq)
    for s in range(S):
        ol.output_layer_adam_step_reference_(*twin, Xseq, Yseq, lr, st(s + 1))
    for name, got, w in zip(NAMES[:6], twin, want):
        if DEVICE.type == "cpu":
            assert torch.equal(got, w), name
        else:
            assert_close(got, w, **TOL[dtype], what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_step_matches_run_output_layer(dtype):
    T, O, F_, S = 4, 23, 70, 12
    Xseq, Yseq, lr = make_sequence(T, O, F_, S, dtype, seed=7)
    W, b = make_state(T, O, F_, dtype, seed=3)[:2]
    want = run_output_layer_steps(W.clone(), b.clone(), Xseq, Yseq, lr)
    fused = make_state(T, O, F_, dtype, seed=3, X=Xseq)
    step = st(1)
    for s in range(S):  # one step tensor advanced in place, as run_output_layer does
        ol.output_layer_adam_step_(*fused, Xseq, Yseq, lr, step)
        step.add_(1)
    for name, got, w in zip(NAMES[:6], fused, want):
        assert_close(got, w, **TOL[dtype], what=name)


def test_strided_sequences_too():
    """X and Y go in by stride: a [S, T, F] buffer seen as [T, S, F], every other step taken."""
    T, O, F_, S = 2, 11, 40, 6
    X0, Y0, lr = make_sequence(T, O, F_, S)
    X = X0.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    Y = Y0.t().contiguous().t()[:, ::2]
    fused = make_state(T, O, F_, X=X)
    ref = [t.clone() for t in fused]
    for s in range(1, 4):
        ol.output_layer_adam_step_(*fused, X, Y, lr, st(s))
        ol.output_layer_adam_step_reference_(*ref, X.contiguous(), Y.contiguous(), lr, st(s))
    for name, got, want in zip(NAMES, fused, ref):
        assert_close(got, want, **TOL[torch.float32], what=name)


def test_step_past_the_sequence_reuses_its_last_image():
    """The image index is clamped (a device value cannot be checked without a sync)."""
    T, O, F_, S = 2, 7, 12, 3
    X, Y, lr = make_sequence(T, O, F_, S)
    fused = make_state(T, O, F_)
    fused.append(ol.output_layer_logits(fused[0], fused[1], X, st(S + 2)))
    ref = [t.clone() for t in fused]
    ol.output_layer_adam_step_(*fused, X, Y, lr, st(S + 2))
    ol.output_layer_adam_step_reference_(*ref, X[:, -1:], Y[:, -1:], lr, st(S + 2))
    for name, got, want in zip(NAMES, fused, ref):
        assert_close(got, want, **TOL[torch.float32], what=name)


def test_rejects_bad_inputs():
    T, O, F_ = 2, 5, 8
    Xseq, Yseq, lr = make_sequence(T, O, F_, 2)
    state = make_state(T, O, F_, X=Xseq)
    with pytest.raises(ValueError, match="logits must be"):
        ol.output_layer_adam_step_(*state[:6], state[6][:, :2], Xseq, Yseq, lr, st(1))
    with pytest.raises(TypeError, match="step must be a one-element int64 tensor"):
        ol.output_layer_adam_step_(*state, Xseq, Yseq, lr, 1)
    with pytest.raises(TypeError, match="step must be a one-element int64 tensor"):
        ol.output_layer_adam_step_(*state, Xseq, Yseq, lr, st(1).float())
    with pytest.raises(ValueError, match="X must be"):
        ol.output_layer_adam_step_(*state, Xseq[:, :, :4], Yseq, lr, st(1))
    with pytest.raises(ValueError, match="Y must be"):
        ol.output_layer_adam_step_(*state, Xseq, Yseq[:, :1], lr, st(1))
    with pytest.raises(TypeError, match="float32 or float64"):
        ol.output_layer_adam_step_(*state, Xseq.double(), Yseq, lr, st(1))
    W_strided = state[0].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        ol.output_layer_adam_step_(W_strided, *state[1:], Xseq, Yseq, lr, st(1))


def test_op_is_registered_with_mutations():
    schema = str(torch.ops.anml_fast.output_layer_adam_step_.default._schema)
    for name in NAMES:
        assert re.search(rf"Tensor\(\w+!\) {name}\b", schema), (name, schema)
    for name in ("X", "Y", "lr", "step"):
        assert not re.search(rf"Tensor\(\w+!\) {name}\b", schema), (name, schema)


# On CPU the kernels run in Triton's interpreter, which wrap_triton cannot capture into a graph, so
# opcheck's AOT-dispatch test (which calls the kernels with fake tensors) runs on GPU only; the
# CPU keeps the schema (mutation declarations checked against what the op really writes),
# autograd-registration and fake-tensor checks.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + \
    (("test_aot_dispatch_dynamic",) if CUDA else ())


def test_opcheck():
    T, O, F_ = 3, 37, 50
    Xseq, Yseq, lr = make_sequence(T, O, F_, 1)
    state = make_state(T, O, F_, X=Xseq)
    torch.library.opcheck(torch.ops.anml_fast.output_layer_adam_step_.default,
                          (*state, Xseq, Yseq, lr, st(1)), test_utils=OPCHECK_UTILS)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8])
def test_anml_size_on_gpu(T):
    fused, ref = fused_and_twin(T, O=1000, F_=2304, S=10)
    for name, got, want in zip(NAMES, fused, ref):
        assert_close(got, want, **TOL[torch.float32], what=name)


@pytest.mark.gpu
def test_compiles_fullgraph_on_gpu():
    T, O, F_ = 2, 1000, 2304
    Xseq, Yseq, lr = make_sequence(T, O, F_, 2)
    fused = make_state(T, O, F_, X=Xseq)
    ref = [t.clone() for t in fused]
    step = torch.compile(ol.output_layer_adam_step_, fullgraph=True)
    for s in range(2):
        step(*fused, Xseq, Yseq, lr, st(s + 1))
        ol.output_layer_adam_step_reference_(*ref, Xseq, Yseq, lr, st(s + 1))
    for name, got, want in zip(NAMES, fused, ref):
        assert_close(got, want, **TOL[torch.float32], what=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_graph_replayed_trajectory_equals_eager_steps(backend):
    """run_output_layer's CUDA-graph replay (evaluation.trajectories.run_steps) over 250 steps, two
    replays and a tail of eager steps, against the same op stepped eagerly: the same kernels in
    the same order, so the same bits. (Fused against twin over so many float32 Adam steps is not
    a tolerance question: Adam's m / sqrt(v) turns last-bit differences of tiny gradients into
    lr-sized ones.)"""
    from anml_fast import ops
    from anml_fast.evaluation.trajectories import run_steps

    T, O, F_, S = 3, 1000, 2304, 250
    Xseq, Yseq, lr = make_sequence(T, O, F_, S)
    graphed = make_state(T, O, F_, X=Xseq)
    eager = [t.clone() for t in graphed]
    step = st(1)

    def one():
        ops.output_layer_adam_step_(*graphed, Xseq, Yseq, lr, step, backend=backend)
        step.add_(1)

    counts = []
    run_steps(one, S, DEVICE, counts.append)
    assert sum(counts) == S and int(step) == S + 1
    for s in range(S):
        ops.output_layer_adam_step_(*eager, Xseq, Yseq, lr, st(s + 1), backend=backend)
    for name, got, want in zip(NAMES, graphed, eager):
        assert torch.equal(got, want), name
