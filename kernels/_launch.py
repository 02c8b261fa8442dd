"""Launching the package's Triton kernels with little host work per eager call.

At batch 1 a kernel runs for a few microseconds, and an eager call is bound by the host: on an
H200 machine (2026-11-29, bench/host_cost.py) Triton's `kernel[grid](...)` took about 40 us a
launch, of which its C launcher took about 15; the rest binds the arguments, works out their
specialisation (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16) and hashes a
cache key, every call. `launch` keeps the compiled kernel per call signature under a key it builds
itself from the same facts (coarser work, the same distinctions), and on a hit hands the
arguments straight to the compiled kernel's launcher.

The first call of a signature, and every call that is not a plain eager CUDA launch, goes through
Triton's own path (via torch's `wrap_triton`, which a tracer captures): under Triton's
interpreter, torch.compile, fake or functional tensors (opcheck, AOT dispatch), with a launch
hook set (a profiler such as proton), with ANML_FAST_CACHED_LAUNCH=0 in the environment, or on a
Triton before 3.3 or whose compiled kernels lack the launcher attributes this relies on (then for
the rest of the process).

Where the package's extension was built with CUDA (anml_fast._C, csrc/triton_launch.cpp), a hit
does not even come back to Python: after Triton's path has compiled and launched a kernel once,
its launch recipe (the CUfunction, its metadata, and which argument feeds each of the compiled
kernel's parameters) is stored in C++, and later calls like it are keyed, packed and launched
there with cuLaunchKernelEx in one C call (on an H200 machine the Python key and Triton's
launcher had cost 30 us a launch). ANML_FAST_CXX_LAUNCH=0 keeps the launches in Python.
"""
from __future__ import annotations

import os
import threading

import torch
import triton
from torch.library import wrap_triton

from ._pdl import _INTERPRETED

try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: no launch hooks to honour here, and no fast path
    _knobs = None

# Triton 3.3 and later hand the launcher every argument, constexprs included (this relies on it).
# ANML_FAST_CACHED_LAUNCH=0 (read at import) sends every launch down Triton's own path.
_TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2])
_ENABLED = [_knobs is not None and not _INTERPRETED and _TRITON >= (3, 3)
            and os.environ.get("ANML_FAST_CACHED_LAUNCH", "1") != "0"]
# The C++ launch (read at import): the Triton versions whose launcher's parameter layout
# (the kernel's runtime parameters, then its scratch pointers) csrc/triton_launch.cpp repeats.
_CXX_ENABLED = [_ENABLED[0] and _TRITON < (3, 9)
                and os.environ.get("ANML_FAST_CXX_LAUNCH", "1") != "0"]
_CXX: list = []  # [anml_fast._C's launch functions, or None], resolved at the first launch
# The plan recording in progress on this thread (kernels/_plan.py): `_RECORDING.rec`, else unset
_RECORDING = threading.local()


def _cxx():
    if not _CXX:
        try:
            import importlib
            ext = importlib.import_module("anml_fast._C")
            _CXX.append(ext if hasattr(ext, "triton_launch") else None)
        except Exception:  # not built, or built without CUDA: the launches stay in Python
            _CXX.append(None)
    return _CXX[0]


def _arg_key(a):
    """What Triton specialises a runtime argument on (its type, a pointer's 16-byte alignment, an
    integer's width and whether it is 1 or a multiple of 16), or the argument itself."""
    t = type(a)
    if t is torch.Tensor:
        return (a.dtype, a.data_ptr() & 15 == 0)
    if t is int:
        width = 32 if -(1 << 31) <= a < (1 << 31) else (64 if -(1 << 63) <= a < (1 << 63) else 65)
        return (width, a == 1, a & 15 == 0)
    if t is float:
        return float
    return (t, a)


MAX_SIGNATURES = 256  # a kernel's cached call signatures (a handful in practice)


class _Known:
    """A kernel's parameters as `launch` needs them, and its compiled kernels by call key."""
    __slots__ = ("kernel", "cache", "constexpr", "runtime", "params", "defaults", "cxx")

    def __init__(self, kernel):
        # held, so that the kernel's id, the key here and in C++, is never another kernel's
        self.kernel = kernel
        self.cache: dict = {}
        self.params = [(p.name, p.is_constexpr) for p in kernel.params]
        self.defaults = {n: p.default for n, p in kernel.signature.parameters.items()}
        self.constexpr = tuple(c for _, c in self.params)
        # the rest, constexprs and launch options (num_warps, launch_pdl, ...), enter the key by value
        self.runtime = frozenset(n for n, c in self.params if not c)
        # held whatever _CXX_ENABLED says now: launch() reads the switch at each call
        ext = _cxx()
        self.cxx = ext
        if ext is not None:
            ext.triton_kernel(id(kernel), self.constexpr, self.runtime)


# csrc/triton_launch.cpp's parameter kinds, by the compiled kernel's signature type
_CXX_KIND = {"i1": 1, "i8": 1, "u1": 1, "u8": 1, "i16": 2, "u16": 2, "i32": 3, "u32": 3, "i64": 4, "u64": 4,
             "fp32": 5, "f32": 5, "fp64": 6}


def _cxx_register(known: "_Known", compiled, args, kwargs) -> bool:
    """Store `compiled`'s launch recipe in C++ for calls like this one; False where that launcher
    cannot take it (clusters, scratch memory, instrumentation, a parameter type it does not pack)."""
    kernel, meta = known.kernel, compiled.metadata
    if (getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0)
            or getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "instrumentation_mode", "")):
        return False
    # the scratch pointers Triton's launcher appends after the kernel's parameters
    nulls = 2 if hasattr(meta, "profile_scratch_size") else (1 if hasattr(meta, "global_scratch_size") else 0)
    signature = compiled.src.signature
    sources = {n: len(args) + j for j, n in enumerate(kwargs)}
    params = []
    for i, p in enumerate(kernel.params):
        ty = signature.get(p.name)
        if ty is None:
            return False
        if ty == "constexpr":
            continue
        kind = 0 if ty.startswith("*") else _CXX_KIND.get(ty)
        if kind is None:
            return False
        source = i if i < len(args) else sources.get(p.name, -1)
        params.append((kind, source, known.defaults[p.name] if source < 0 else None))
    return known.cxx.triton_register(id(kernel), args, kwargs, compiled.function,
                                     (meta.num_warps, 1, meta.shared, bool(meta.launch_pdl),
                                      bool(getattr(meta, "launch_cooperative_grid", False))), nulls, tuple(params))


_KERNELS: dict[int, _Known] = {}


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton's HookChain (3.4 on) with a call in it, or a callable."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def hooks_set() -> bool:
    """Whether Triton's launch enter or exit hook is set (a profiler): launches then take Triton's path."""
    return _knobs is not None and (_hooked(_knobs.runtime.launch_enter_hook)
                                   or _hooked(_knobs.runtime.launch_exit_hook))


def _plain(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or not a.is_cuda):
            return False
    return True


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` (arguments positional or by name, constexprs and launch
    options such as num_warps by name)."""
    rec = getattr(_RECORDING, "rec", None)
    if rec is not None:
        rec.steps.append((kernel, grid, args, kwargs))
    if not (_ENABLED[0] and not hooks_set() and not torch.compiler.is_compiling()):
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    known = _KERNELS.get(id(kernel))
    if known is None:
        known = _KERNELS[id(kernel)] = _Known(kernel)
    cxx = known.cxx if _CXX_ENABLED[0] else None
    if cxx is not None:
        # the C++ launch checks what _plain does below: -1 for a call that is not a plain eager one
        state = cxx.triton_launch(id(kernel), grid, args, kwargs)
        if state == 1:
            return
        if state < 0:
            wrap_triton(kernel)[grid](*args, **kwargs)
            return
    if not (_plain(args) and _plain(kwargs.values())):
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    runtime = known.runtime
    device = torch.cuda.current_device()
    # a constexpr enters the key by value, a runtime argument by what Triton specialises it on
    key = (device, tuple(a if c else _arg_key(a) for a, c in zip(args, known.constexpr)),
           tuple((n, _arg_key(v) if n in runtime else v) for n, v in kwargs.items()))
    try:
        entry = known.cache.get(key)
    except TypeError:  # an unhashable constexpr: Triton's own path every time
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    if entry is None:
        # Triton's own path: compiles on the first call, launches, returns the compiled kernel
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if not all(hasattr(compiled, n) for n in ("run", "function", "packed_metadata")):
            _ENABLED[0] = False
            return
        if len(known.cache) >= MAX_SIGNATURES:
            known.cache.clear()
        # the launcher takes every parameter, constexprs included, in the kernel's order: where
        # each of those after the positional ones comes from (by name, or its default)
        recipe = tuple((n in kwargs, n, known.defaults[n]) for n, _ in known.params[len(args):])
        # [compiled, recipe, whether C++ took its recipe (None: not offered yet)]. C++ forgets
        # recipes past MAX_SIGNATURES too, and a hit here then offers it again
        known.cache[key] = [compiled, recipe, None]
        if cxx is not None:
            known.cache[key][2] = _cxx_register(known, compiled, args, kwargs)
        return
    compiled, recipe, cxx_took = entry
    if cxx is not None and cxx_took is not False:
        entry[2] = _cxx_register(known, compiled, args, kwargs)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args,
                 *[kwargs[n] if named else d for named, n, d in recipe])
