"""Programmatic dependent launch (kernels/_pdl.py, csrc/cuda/pdl.cuh): the contract that makes it
safe, checked on the sources, and when a launch asks for it.

A kernel launched with PDL may be placed while its predecessor still runs; it is correct only if
it touches no memory before `griddepcontrol.wait`. So every kernel the package launches must wait
as its first statement. (test_gpu_trainer checks on the GPU that the bits do not change.)
"""
import ast
import re
import sys

import pytest
import torch

from conftest import REPO

pytest.importorskip("triton")
import anml_fast.ops.conv_valid  # noqa: E402,F401  (imports the kernels, however they are found)

_pdl = sys.modules[sys.modules["anml_fast.ops.conv_valid"]._kernels().pdl_args.__module__]


def _launched_triton_kernels():
    """{file: {name: FunctionDef}} of every function a launch names in kernels/."""
    found = {}
    for path in sorted((REPO / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        # launch(kernel, grid, ...) (kernels/_launch.py), under gated_head_step's name for it, or
        # conv_valid's _launch(kernel, ...), which calls it
        names = {c.args[0].id for c in ast.walk(tree) if isinstance(c, ast.Call) and c.args
                 and getattr(c.func, "id", None) in ("launch", "launch_kernel", "_launch") and isinstance(c.args[0], ast.Name)}
        if names & set(defs):
            found[path.name] = {n: defs[n] for n in names if n in defs}
    return found


def test_every_triton_kernel_waits_first():
    kernels = _launched_triton_kernels()
    assert {"conv_valid.py", "gated_head.py", "output_layer.py", "adam_batched.py"} <= set(kernels)
    for file, defs in kernels.items():
        for name, fn in defs.items():
            assert "PDL" in [a.arg for a in fn.args.args], f"{file}: {name} takes no PDL constexpr"
            body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
                else fn.body
            first, last = ast.unparse(body[0]), ast.unparse(body[-1])
            assert first in ("pdl_enter(PDL)", "pdl_wait(PDL)"), \
                f"{file}: {name} starts with {first!r}, not pdl_enter(PDL) or pdl_wait(PDL)"
            if first == "pdl_wait(PDL)":  # then its successor may launch only at its end
                assert last == "pdl_launch_dependents(PDL)", \
                    f"{file}: {name} begins with pdl_wait(PDL) but ends with {last!r}, not pdl_launch_dependents(PDL)"


def test_every_cuda_kernel_waits_first_and_launches_through_the_helper():
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    assert sources
    kernels = 0
    for path in sources:
        text = path.read_text()
        assert "<<<" not in text, f"{path.name}: a <<<...>>> launch bypasses launch_kernel (pdl.cuh)"
        for m in re.finditer(r"__global__[^{]*\{", text):
            kernels += 1
            body = text[m.end():].lstrip()
            assert body.startswith("pdl_enter();"), f"{path.name}: a kernel does not start with pdl_enter()"
    assert kernels >= 3


def test_launch_args_only_for_real_cuda_tensors(monkeypatch):
    assert _pdl.launch_args(torch.zeros(2)) == {"PDL": False}  # CPU (the interpreter's tensors)
    monkeypatch.setenv("ANML_FAST_PDL", "0")
    assert not _pdl.enabled()
    monkeypatch.setenv("ANML_FAST_PDL", "1")
    assert _pdl.enabled()
    if torch.cuda.is_available():
        x = torch.zeros(2, device="cuda")
        assert _pdl.launch_args(x)["PDL"] == (torch.cuda.get_device_capability()[0] >= 9 and _pdl.HAS_GDC)
        assert _pdl.launch_args(torch.nn.Parameter(x)) == {"PDL": False}  # a subclass: maybe a tracer's
        monkeypatch.setenv("ANML_FAST_PDL", "0")
        assert _pdl.launch_args(x) == {"PDL": False}
