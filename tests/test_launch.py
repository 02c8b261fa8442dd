"""kernels/_launch.py: the eager launch path that keeps compiled kernels by its own call key.

Its risk is a key that merges two calls Triton would have compiled apart (a misaligned pointer,
an integer that is 1 or a multiple of 16, another constexpr), which would launch a kernel
compiled for the wrong facts: the GPU tests launch the same kernel under each of those changes,
in turn, and compare with torch. On the CPU (Triton's interpreter) `launch` is Triton's own path.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import anml_fast.ops.conv_valid  # noqa: E402,F401  (imports the kernels, however they are found)

_launch = sys.modules[sys.modules["anml_fast.ops.conv_valid"]._kernels().launch.__module__]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu


@triton.jit
def _axpby_kernel(X, Y, Out, n, alpha, beta, stride, BLOCK: tl.constexpr, SQUARE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs * stride, mask=mask)
    y = tl.load(Y + offs, mask=mask)
    out = alpha * x + beta * y
    if SQUARE:
        out = out * out
    tl.store(Out + offs, out, mask=mask)


def _run(x, y, n, alpha, beta, stride, block, square=None, by_name=False):
    out = torch.full((n,), float("nan"), device=x.device)
    extra = {} if square is None else {"SQUARE": square}
    grid = (triton.cdiv(n, block),)
    if by_name:  # runtime arguments by name too, as conv_valid passes its norm's
        _launch.launch(_axpby_kernel, grid, X=x, Y=y, Out=out, n=n, alpha=alpha, beta=beta, stride=stride,
                       BLOCK=block, **extra)
    else:
        _launch.launch(_axpby_kernel, grid, x, y, out, n, alpha, beta, stride, BLOCK=block, **extra)
    want = alpha * x[:n * stride:stride] + beta * y[:n]
    return out, want * want if square else want


def test_arg_key_tells_apart_what_triton_specialises_on():
    k = _launch._arg_key
    t = torch.zeros(8)
    assert k(t) != k(t[1:]), "a 16-byte aligned pointer and a misaligned one"
    assert k(t) != k(t.double())
    assert len({k(1), k(2), k(16)}) == 3 and k(2) == k(17) and k(16) == k(32)
    assert k(2 ** 31 - 1) != k(2 ** 31) and k(2 ** 63) not in (k(2 ** 62), k(2 ** 31))
    assert k(0.5) == k(2.0) and k(True) != k(False) and k(None) == k(None)


def test_launch_runs_the_kernel():
    """On the CPU under the interpreter this is Triton's own path; on a GPU the cached one."""
    x, y = torch.randn(100, device=DEVICE), torch.randn(100, device=DEVICE)
    for _ in range(3):
        out, want = _run(x, y, 100, 0.5, -2.0, 1, 32)
        torch.testing.assert_close(out, want)


@gpu
@pytest.mark.parametrize("cxx", [True, False], ids=["cxx-launch", "python-launch"])
def test_cached_launches_follow_every_change_of_specialisation(monkeypatch, cxx):
    """Both cached launches: the C++ one (csrc/triton_launch.cpp), and the Python one it falls back on."""
    monkeypatch.setattr(_launch, "_CXX_ENABLED", [cxx and _launch._CXX_ENABLED[0]])
    runs = []
    real_run = type(_axpby_kernel).run

    def counting(self, *args, **kwargs):
        runs.append(1)
        return real_run(self, *args, **kwargs)
    monkeypatch.setattr(type(_axpby_kernel), "run", counting)
    _launch._KERNELS.pop(id(_axpby_kernel), None)
    x, y = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    cases = [  # (x, y, n, alpha, beta, stride, BLOCK, SQUARE, by name)
        (x, y, 100, 0.5, -2.0, 1, 32, None, False),
        (x, y, 100, 1.5, 3.0, 1, 32, None, False),       # other float values: the same kernel
        (x[1:], y, 100, 0.5, -2.0, 1, 32, None, False),  # X misaligned
        (x, y[3:], 100, 0.5, -2.0, 1, 32, None, False),  # Y misaligned
        (x, y, 1, 0.5, -2.0, 1, 32, None, False),        # n == 1
        (x, y, 96, 0.5, -2.0, 1, 32, None, False),       # n % 16 == 0
        (x, y, 97, 0.5, -2.0, 2, 32, None, False),       # stride 2
        (x, y, 100, 0.5, -2.0, 1, 64, None, False),      # another BLOCK
        (x, y, 100, 0.5, -2.0, 1, 32, True, False),      # SQUARE given
        (x, y, 100, 0.5, -2.0, 1, 32, False, False),     # SQUARE given as its default
        (x, y, 100, 0.5, -2.0, 1, 32, None, True),       # by name
        (x[1:], y, 97, 0.25, 1.0, 1, 32, True, True),
    ]
    for rnd in range(3):
        for case in cases:
            out, want = _run(*case)
            torch.testing.assert_close(out, want, msg=lambda m: f"{case[2:]}: {m}")
        if rnd == 0:
            first = len(runs)
    assert first == len(cases) - 1, "every new call signature goes through Triton once (the float values share one)"
    assert len(runs) == first, "repeated call signatures never go through Triton again"


def _cxx_built() -> bool:
    import anml_fast._C as ext
    return bool(getattr(ext, "WITH_CUDA", 0))


@gpu
def test_cxx_launch_serves_repeated_calls(monkeypatch):
    """Where the extension was built with CUDA, a repeated call is launched from C++: Triton's
    path (kernel.run) and the Python cache's launcher are not touched."""
    if not _cxx_built():
        pytest.skip("anml_fast._C was built without CUDA: the launches stay in Python")
    assert _launch._CXX_ENABLED[0] and _launch._cxx() is not None
    x, y = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    _run(x, y, 100, 0.5, -2.0, 1, 32)
    _run(x[1:], y, 1, 0.5, -2.0, 3, 32, square=True, by_name=True)

    def refuse(*args, **kwargs):
        raise AssertionError("left the C++ launch")
    monkeypatch.setattr(type(_axpby_kernel), "run", refuse)
    monkeypatch.setattr(_launch, "_arg_key", refuse)
    hits = _launch._cxx().triton_launch_stats()[0]
    for _ in range(3):
        for args, kw in (((x, y, 100, 1.5, -2.0, 1, 32), {}), ((x[1:], y, 1, 0.5, 4.0, 3, 32), dict(square=True, by_name=True))):
            out, want = _run(*args, **kw)
            torch.testing.assert_close(out, want)
    assert _launch._cxx().triton_launch_stats()[0] == hits + 6


@gpu
def test_cached_launch_is_captured_by_cuda_graphs():
    x, y = torch.randn(100, device="cuda"), torch.randn(100, device="cuda")
    out = torch.empty(100, device="cuda")
    launch = lambda: _launch.launch(_axpby_kernel, (4,), x, y, out, 100, 2.0, 1.0, 1, BLOCK=32)
    launch()  # compiled and cached before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    x.copy_(torch.randn(100, device="cuda"))
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out, 2 * x + y)


@gpu
def test_a_launch_hook_takes_tritons_path(monkeypatch):
    """With a launch hook set (a profiler), every launch goes through Triton, which calls it."""
    seen = []
    hook = lambda meta: seen.append(1)
    chain = triton.knobs.runtime.launch_enter_hook
    if hasattr(chain, "calls"):  # Triton's HookChain: a new list of calls, the old one restored after
        monkeypatch.setattr(chain, "calls", chain.calls + [hook])
    else:
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    x, y = torch.randn(100, device="cuda"), torch.randn(100, device="cuda")
    for _ in range(3):
        out, want = _run(x, y, 100, 0.5, -2.0, 1, 32)
        torch.testing.assert_close(out, want)
    assert len(seen) == 3


def test_the_environment_keeps_the_launches_in_python():
    """ANML_FAST_CXX_LAUNCH=0, read at import, turns the C++ launch off (the Python cache stays)."""
    code = ("import sys, anml_fast.ops.conv_valid; "
            "m = sys.modules[sys.modules['anml_fast.ops.conv_valid']._kernels().launch.__module__]; "
            "print(m._CXX_ENABLED[0], m._ENABLED[0])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ANML_FAST_CXX_LAUNCH": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["False", "True"], out


def test_the_environment_turns_the_cache_off():
    """ANML_FAST_CACHED_LAUNCH=0, read at import, sends every launch down Triton's own path."""
    code = ("import sys, anml_fast.ops.conv_valid; "
            "m = sys.modules[sys.modules['anml_fast.ops.conv_valid']._kernels().launch.__module__]; "
            "print(m._ENABLED[0])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter turns it off too
    seen = {}
    for value in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "ANML_FAST_CACHED_LAUNCH": value},
                             capture_output=True, text=True, check=True).stdout.split()
        seen[value] = out[-1]
    assert seen == {"0": "False", "1": "True"}, seen
