"""Recording an op's eager call as a plan that C++ replays (csrc/triton_plan.cpp).

An eager batch-1 call of a Triton op spends most of its host time in its own Python: checks,
allocations, the tile choice, each launch's keyword arguments. All of that is a function of the
call's key: the arguments' dtypes, shapes, strides, alignment and scalar values, the device and
stream, and the two switches the kernels read (TF32 for float32 convolutions: cudnn.allow_tf32;
PDL: ANML_FAST_PDL). A call whose key has been seen before is served from C++: the same outputs
and scratch are allocated and the same launch recipes (csrc/triton_launch.cpp) are launched with
the new tensors' pointers.

`record` runs the op's implementation once under a dispatch mode that sees every ATen op it
calls, and notes each launch (kernels/_launch.py). The call is recorded only if all it did was
allocate tensors and launch kernels whose tensors are its inputs, its allocations, or buffers
registered as persistent (`persistent`, the arrival counters); anything else (a fill, a copy, a
cuBLAS product, a view of an input, an unregistered tensor) leaves that call to Python. C++
uses a plan only once two recordings of its key agree exactly, and refuses a key for good when
they do not, or when three calls of it could not be recorded.

What a plan does not see: the kernels' module constants (tile tables, thresholds such as
kernels.gated_head.GEMM_MIN_ROWS). They are read when a call is recorded; after changing one,
call `clear()`. Plans serve only plain eager calls on the current device outside CUDA-graph
capture (kernels/_eager.py decides which calls are plain). ANML_FAST_PLANS=0 in the environment
(read at import) turns them off; `enable(False)` does so at run time.
"""
from __future__ import annotations

import itertools
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _launch

ENABLED = [os.environ.get("ANML_FAST_PLANS", "1") != "0"]
_EXT: list = []  # [anml_fast._C if it has the plan functions, else None]
_IDS = itertools.count(1)
# buffers a plan may point into as constants, by storage address; held, so that no address is reused
_PERSISTENT: dict[int, torch.Tensor] = {}

_ATEN = torch.ops.aten
_ALLOCATIONS = frozenset((_ATEN.empty.memory_format, _ATEN.empty_like.default, _ATEN.new_empty.default,
                          _ATEN.empty_strided.default, _ATEN.new_empty_strided.default))


def _built():
    """anml_fast._C where it was built with the plan functions, else None."""
    if not _EXT:
        cxx = _launch._cxx()
        _EXT.append(cxx if cxx is not None and hasattr(cxx, "plan_run") else None)
    return _EXT[0]


def _loaded():
    """What _built() found, without loading the extension if nothing has asked yet."""
    return _EXT[0] if _EXT else None


def ext():
    """anml_fast._C's plan functions, where they are built, plans are on, the launches go through
    C++ (kernels/_launch.py) and no Triton launch hook (a profiler) is set; else None."""
    if not (ENABLED[0] and _launch._CXX_ENABLED[0]) or _launch.hooks_set():
        return None
    return _built()


def new_id() -> int:
    """A fresh op id for the plan table (one per EagerOp)."""
    return next(_IDS)


def persistent(t: torch.Tensor) -> torch.Tensor:
    """Marks `t`'s storage as a buffer that lives for the process and that a plan may bind as a
    constant (a launch's views of it included); returns `t`."""
    _PERSISTENT[t.untyped_storage().data_ptr()] = t
    return t


def clear() -> None:
    """Forgets every plan (after changing a kernel module's constants)."""
    e = _loaded()
    if e is not None:
        e.plan_clear()


def enable(on: bool) -> bool:
    """Turns plans on or off for this process (the C++ autograd nodes' backwards included);
    returns the previous setting."""
    was = ENABLED[0]
    ENABLED[0] = bool(on)
    e = _loaded()
    if e is not None:
        e.plan_enable(ENABLED[0])
    return was


def stats() -> dict:
    """Calls served by plans, and the keys confirmed, awaiting a second recording, or refused."""
    e = _built()
    if e is None:
        return {"served": 0, "confirmed": 0, "pending": 0, "refused": 0}
    served, confirmed, pending, refused = e.plan_stats()
    return {"served": served, "confirmed": confirmed, "pending": pending, "refused": refused}


class _Recording(TorchDispatchMode):
    """Sees the implementation's ATen ops: allocations are noted, views of persistent buffers
    pass, anything else makes the call unrecordable."""

    def __init__(self):
        super().__init__()
        self.ok = True
        self.allocations: list[torch.Tensor] = []
        self.index: dict[int, int] = {}  # id of an allocation, or of a detached alias of one -> its index
        self.held: list[torch.Tensor] = []  # those aliases, alive while their ids are in use
        self.launches: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.index[id(out)] = len(self.allocations)
            self.allocations.append(out)
        elif func is _ATEN.detach.default and id(args[0]) in self.index:
            # torch hands a factory's result back through a detach under a dispatch mode
            self.index[id(out)] = self.index[id(args[0])]
            self.held.append(out)
        elif not (getattr(func, "is_view", False) and all(
                _is_persistent(a) for a in itertools.chain(args, (kwargs or {}).values())
                if isinstance(a, torch.Tensor))):
            self.ok = False
        return out


def _is_persistent(t: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() in _PERSISTENT


def record(e, op_id: int, impl, args: tuple):
    """Runs `impl(*args)` and offers the call to C++ as a plan of op `op_id`; returns its outputs."""
    rec = _Recording()
    _launch._RECORDING.rec = rec
    try:
        with rec:
            out = impl(*args)
    finally:
        _launch._RECORDING.rec = None
    ok, launches, outputs, keep = rec.ok, (), (), []
    if ok:
        try:
            launches, outputs = _bind(rec, args, out, keep)
        except _Unplannable:
            ok = False
    e.plan_store(op_id, args, ok, launches, tuple(rec.allocations), outputs, isinstance(out, tuple), tuple(keep))
    return out


class _Unplannable(Exception):
    pass


def _bind(rec: _Recording, args: tuple, out, keep: list):
    inputs = {id(a): i for i, a in enumerate(args) if type(a) is torch.Tensor}
    allocated = rec.index

    def source(v):
        if type(v) is not torch.Tensor:
            return (0, 0)
        i = inputs.get(id(v))
        if i is not None:
            return (1, i)
        j = allocated.get(id(v))
        if j is not None:
            return (2, j)
        if _is_persistent(v):
            keep.append(v)
            return (0, 0)
        raise _Unplannable

    launches = tuple((id(kernel), tuple(grid), largs, lkwargs,
                      tuple(source(v) for v in itertools.chain(largs, lkwargs.values())))
                     for kernel, grid, largs, lkwargs in rec.launches)
    if isinstance(out, list):
        raise _Unplannable  # a replay returns tuples
    outs = out if isinstance(out, tuple) else (out,)
    outputs = []
    for t in outs:
        j = allocated.get(id(t)) if type(t) is torch.Tensor else None
        if j is None:
            raise _Unplannable
        outputs.append(j)
    return launches, tuple(outputs)
