"""Recording an op's eager call as a plan that C++ replays (csrc/triton_plan.cpp).

An eager batch-1 call of a Triton op spends most of its host time in its own Python: checks,
allocations, the tile choice, each launch's keyword arguments. All of that is a function of the
call's key: the arguments' dtypes, shapes, strides, alignment and scalar values, the device and
stream, and the two switches the kernels read (TF32 for float32 convolutions: cudnn.allow_tf32;
PDL: ANML_FAST_PDL). A call whose key has been seen before is served from C++: the same outputs
and scratch are allocated, the same launch recipes (csrc/triton_launch.cpp) are launched with the
new tensors' pointers, and the same ATen products are called on the new tensors (they read
cuBLAS's switches when they run, as the Python path's calls do).

`record` runs the op's implementation once under a dispatch mode that sees every ATen op it
calls, and notes each launch (kernels/_launch.py). The call is recorded only if all it did was
allocate tensors, launch kernels, and call the few ATen ops in `_STEPS` (cuBLAS products and the
transposes that feed them, which C++ replays through the dispatcher), on tensors that are its
inputs, its allocations, those ops' results, or buffers registered as persistent (`persistent`,
the arrival counters), and writes none of its inputs (a replay below autograd would not bump
their version counters). Anything else (a fill, a copy, another ATen op, a view of an input
other than a transpose, an unregistered tensor) leaves that call to Python. C++ uses a plan only once
two recordings of its key agree exactly, and refuses a key for good when they do not, or when
three calls of it could not be recorded.

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
# ATen ops a plan replays through the dispatcher: the batch-84 head's cuBLAS products (a recording
# refused them, and those calls lost to their twins, 2026-11-29) and the transposes that feed them.
# Each one's results follow from the key (shapes, strides; autocast, which would change their
# dtype, keeps a call off plans); none syncs the host.
_STEPS = frozenset((_ATEN.t.default, _ATEN.transpose.int, _ATEN.mm.default, _ATEN.mm.out,
                    _ATEN.addmm.default, _ATEN.addmm.out, _ATEN.addmm_.default))
_VIEWS = frozenset((_ATEN.t.default, _ATEN.transpose.int))


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
    """Sees the implementation's ATen ops: allocations are noted, the ops of _STEPS become steps
    (beside the launches kernels/_launch.py notes, in call order), views of persistent buffers
    pass, anything else makes the call unrecordable."""

    def __init__(self):
        super().__init__()
        self.ok = True
        self.allocations: list[torch.Tensor] = []
        self.index: dict[int, int] = {}  # id of an allocation, or of a detached alias of one -> its index
        self.held: list[torch.Tensor] = []  # those aliases and the steps' results, alive while recorded
        # (kernel, grid, args, kwargs) per launch; (_ATEN_STEP, func, args, kwargs, result) per ATen step
        self.steps: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _ALLOCATIONS:
            self.index[id(out)] = len(self.allocations)
            self.allocations.append(out)
        elif func is _ATEN.detach.default and id(args[0]) in self.index:
            # torch hands a factory's result back through a detach under a dispatch mode
            self.index[id(out)] = self.index[id(args[0])]
            self.held.append(out)
        elif func in _STEPS:
            self.steps.append((_ATEN_STEP, func, args, kwargs, out))
            self.held.append(out)
        elif not (getattr(func, "is_view", False) and all(
                _is_persistent(a) for a in itertools.chain(args, kwargs.values())
                if isinstance(a, torch.Tensor))):
            self.ok = False
        return out


_ATEN_STEP = object()  # marks an ATen step among the recorded launches


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
    ok, steps, outputs, keep = rec.ok, (), (), []
    if ok:
        try:
            steps, outputs = _bind(rec, args, out, keep)
        except _Unplannable:
            ok = False
    e.plan_store(op_id, args, ok, steps, tuple(rec.allocations), outputs, isinstance(out, tuple), tuple(keep))
    return out


class _Unplannable(Exception):
    pass


def _layout(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _bind(rec: _Recording, args: tuple, out, keep: list):
    """The recording's steps with every tensor bound to its source: (1, i) input i, (2, j)
    allocation j, (3, k) the k-th new tensor an ATen step returned, (0, 0) a constant (a scalar,
    None, or a persistent buffer's pointer, held in `keep`). A tensor is found by identity, else
    by its layout (address, dtype, shape, strides): torch may hand an op's result back as another
    Python object of the same view."""
    by_id: dict[int, tuple] = {}
    by_layout: dict[tuple, tuple] = {}

    def know(t, binding):
        by_id.setdefault(id(t), binding)
        by_layout.setdefault(_layout(t), binding)

    for i, a in enumerate(args):
        if type(a) is torch.Tensor:
            know(a, (1, i))
    for j, a in enumerate(rec.allocations):
        know(a, (2, j))
    for i, j in rec.index.items():
        by_id.setdefault(i, (2, j))

    def find(v):
        return by_id.get(id(v)) or by_layout.get(_layout(v))

    def source(v):
        if type(v) is not torch.Tensor:
            return (0, 0)
        b = find(v)
        if b is not None:
            return b
        if _is_persistent(v):
            keep.append(v)
            return (0, 0)
        raise _Unplannable

    steps = []
    made = 0  # tensors the ATen steps returned so far
    for step in rec.steps:
        if step[0] is not _ATEN_STEP:
            kernel, grid, largs, lkwargs = step
            steps.append((id(kernel), tuple(grid), largs, lkwargs,
                          tuple(source(v) for v in itertools.chain(largs, lkwargs.values()))))
            continue
        _, func, sargs, skwargs, result = step
        values, binds = [], []
        for k, a in enumerate(func._schema.arguments):
            if k < len(sargs):
                v = sargs[k]
            elif a.name in skwargs:
                v = skwargs[a.name]
            elif a.has_default_value():
                v = a.default_value
            else:
                raise _Unplannable
            if type(v) is torch.Tensor:
                b = find(v)
                if b is None:  # the step needs the tensor itself, not a constant pointer
                    raise _Unplannable
                if b[0] == 1 and a.alias_info is not None and a.alias_info.is_write:
                    raise _Unplannable  # an input written (in place, out=): its version must move
                values.append(None)
                binds.append(b)
            elif v is None or type(v) in (bool, int, float):
                values.append(v)
                binds.append((0, 0))
            else:
                raise _Unplannable
        slots = []
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if type(t) is not torch.Tensor:
                raise _Unplannable
            if find(t) is not None:
                slots.append(-1)  # an out= or in-place op's result: a tensor already bound
            else:
                know(t, (3, made))
                slots.append(made)
                made += 1
        if func in _VIEWS and slots == [-1]:
            continue  # a view already bound: replaying it would make nothing new
        steps.append((str(func._schema.name), func._schema.overload_name, tuple(values), tuple(binds),
                      tuple(slots)))
    if isinstance(out, list):
        raise _Unplannable  # a replay returns tuples
    outs = out if isinstance(out, tuple) else (out,)
    outputs = []
    for t in outs:
        b = find(t) if type(t) is torch.Tensor else None
        if b is None or b[0] != 2:
            raise _Unplannable
        outputs.append(b[1])
    return tuple(steps), tuple(outputs)
