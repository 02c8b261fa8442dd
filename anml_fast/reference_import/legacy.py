"""Reading torch's legacy (pre-1.6, non-zip) format without running anything in it.

The authors ran PyTorch 1.4, whose `torch.save` wrote this format; torch's weights-only reader
refuses a whole module in it (its records carry the module's class and source).
"""
from __future__ import annotations

import io
import math
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError
from .stubs import (LEARNER_NAMES, PARAMETER_LIST_NAME, _MAX_EXTRA_LEARNER_NAMES, _first_line,
                    _LearnerStub, _ParameterListStub, _Recorded, _refusal_message)

# # Layout, as torch/serialization.py's _legacy_save writes it and _legacy_load reads it: pickles of
# the magic number, the protocol version and a sys_info dict; the main pickle, whose persistent ids
# are ('storage', storage_type, key, location, numel, view_metadata) and, for nn.Module classes,
# ('module', cls, source_file, source); a pickle of the sorted storage keys; then per key an int64
# element count and the storage's bytes. The data is little-endian whatever machine wrote it; the
# count is too since torch 1.5, but torch <= 1.4 wrote it in the saver's byte order, which sys_info's
# little_endian flag records.

# Storage classes by name; "torch.cuda" ones come from models saved on a GPU (and load on the CPU).
_LEGACY_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}
_LEGACY_STORAGE_MODULES = ("torch", "torch.cuda")
_LEGACY_HEAD_BYTES = 64  # the magic number's pickle takes at most 24 bytes in any protocol


class _StorageType:
    """What a storage class name in the file resolves to: a dtype, and deliberately not callable."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _RootStorage:
    """One storage of the file: its bytes are allocated while the pickle is read, filled after it."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)


class _StorageView:
    """A storage as a tensor record refers to it: `length` elements of a root from `start` on."""

    def __init__(self, root: _RootStorage, start: int, length: int):
        self.root, self.start, self.length = root, start, length


class _LegacyFile:
    """What the pickles of one legacy file share: its storages and the Learner names admitted."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.roots: dict[str, _RootStorage] = {}
        self.views: dict[str, _StorageView] = {}
        self.claimed_bytes = 0
        self.learner_names = set(LEARNER_NAMES)
        self.count_byteorders = ("little",)

    def corrupt(self, detail: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a readable legacy-format PyTorch file ({detail})")

    def storage(self, record: tuple) -> _StorageView:
        if len(record) not in (4, 5):
            raise self.corrupt(f"a storage record with {len(record)} fields")
        stype, key, _location, numel = record[:4]  # the location is ignored: all lands on the CPU
        view = record[4] if len(record) == 5 else None
        key = _ascii(key)
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_count(numel):
            raise self.corrupt("a malformed storage record")
        root = self.roots.get(key)
        if root is None:
            # Every storage's bytes must follow in the file, so a record claiming more than the file
            # holds is corrupt; checking before allocating keeps a crafted count from exhausting memory.
            self.claimed_bytes += numel * stype.dtype.itemsize
            if self.claimed_bytes > self.size:
                raise self.corrupt(f"its storages claim more than the file's {self.size} bytes")
            root = self.roots[key] = _RootStorage(key, stype.dtype, numel)
        elif (root.dtype, root.numel) != (stype.dtype, numel):
            raise self.corrupt(f"storage {key} is described as both {root.dtype}[{root.numel}] "
                               f"and {stype.dtype}[{numel}]")
        if view is None:
            return _StorageView(root, 0, numel)
        # torch has not written views since before 1.0, but its reader still accepts them.
        if not (isinstance(view, tuple) and len(view) == 3):
            raise self.corrupt("a malformed storage view record")
        view_key, offset, length = _ascii(view[0]), view[1], view[2]
        if not (isinstance(view_key, str) and _is_count(offset) and _is_count(length)
                and offset + length <= numel):
            raise self.corrupt(f"a view outside storage {key}")
        return self.views.setdefault(view_key, _StorageView(root, offset, length))

    def read_storages(self, keys, stream: io.BytesIO) -> None:
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise self.corrupt("the list of storage keys is malformed")
        # A storage the pickle uses but whose bytes are absent would leave uninitialised memory in
        # the weights; one listed but never used means the file is not what it claims to be.
        if len(set(keys)) != len(keys) or set(keys) != set(self.roots):
            raise self.corrupt("the listed storages do not match those the pickle uses")
        for key in keys:
            root = self.roots[key]
            count = stream.read(8)
            if len(count) < 8:
                raise self.corrupt(f"the file ends before storage {key}")
            counts = [int.from_bytes(count, order, signed=True) for order in self.count_byteorders]
            if root.numel not in counts:
                raise self.corrupt(f"storage {key} holds {counts[0]} elements where the pickle expects {root.numel}")
            nbytes = root.data.numel()
            data = stream.read(nbytes)
            if len(data) < nbytes:
                raise self.corrupt(f"the file ends inside storage {key}")
            if nbytes:
                root.data.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _ascii(value):
    # Files pickled by Python 2 may carry torch's internal keys as bytes (torch decodes them so too).
    return value.decode("ascii") if isinstance(value, bytes) else value


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(_is_count(v) for v in value)


class _LegacyUnpickler(pickle._Unpickler):
    """Reads one pickle of a legacy file, admitting only what a reference checkpoint needs.

    The pure-Python unpickler rather than the C one, because only its opcode table can be narrowed:
    beyond `find_class`, the opcodes that call or instantiate (REDUCE, NEWOBJ, BUILD, ...) accept
    only our own callables and stubs, so even a name admitted here cannot be used in another way.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream, legacy: _LegacyFile):
        super().__init__(stream, encoding="utf-8")  # torch.load's default for Python 2 strings
        self.legacy = legacy
        self.functions = {
            "torch._utils._rebuild_tensor": self.rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self.rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": self.rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self.rebuild_parameter_with_state,
        }
        self.callables = tuple(self.functions.values()) + (OrderedDict, set)

    def find_class(self, module, name):
        if module == "__builtin__":  # how protocol-2 pickles from Python 3 name builtins
            module = "builtins"
        full = f"{module}.{name}"
        if full in self.legacy.learner_names:
            return _LearnerStub
        # As for zip files: a fork that moved its Learner gets the same inert stub, boundedly often.
        if name == "Learner" and re.fullmatch(r"[A-Za-z_][\w.]*", module):
            if len(self.legacy.learner_names) >= len(LEARNER_NAMES) + _MAX_EXTRA_LEARNER_NAMES:
                raise CheckpointError(f"{self.legacy.path}: names too many different Learner classes")
            self.legacy.learner_names.add(full)
            return _LearnerStub
        if full == PARAMETER_LIST_NAME:
            return _ParameterListStub
        if module in _LEGACY_STORAGE_MODULES and name in _LEGACY_STORAGE_DTYPES:
            return _StorageType(name, _LEGACY_STORAGE_DTYPES[name])
        if full in self.functions:
            return self.functions[full]
        if full == "collections.OrderedDict":
            return OrderedDict
        if full == "builtins.set":  # nn.Module's _non_persistent_buffers_set, in newer files
            return set
        raise CheckpointError(_refusal_message(self.legacy.path, full))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid):
            raise self.legacy.corrupt(f"an unexpected persistent id {type(pid).__name__}")
        kind = _ascii(pid[0])
        if kind == "storage":
            return self.legacy.storage(pid[1:])
        if kind == "module" and 2 <= len(pid) <= 4:
            # The class was resolved by find_class when the record was read; the source file and
            # text after it are only what the saver found on disk, and are left unread.
            if isinstance(pid[1], type) and issubclass(pid[1], _Recorded):
                return pid[1]
            raise self.legacy.corrupt("a module record for something other than a Learner")
        raise self.legacy.corrupt(f"an unknown persistent record {str(kind)[:40]!r}")

    # Opcode handlers; each narrows the stock one to the objects this reader itself produced.

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in self.callables) or type(args) is not tuple:
            raise self.legacy.corrupt(f"it calls a {type(func).__name__}, which is not a tensor rebuild")
        # The containers only as pickle builds them (an empty OrderedDict filled by SETITEMS, a set
        # from a list), so that no call can iterate over a tensor element by element.
        if (func is OrderedDict and args) or (func is set and not (len(args) == 1 and type(args[0]) is list)):
            raise self.legacy.corrupt(f"it calls {func.__name__} with unexpected arguments")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new_stub(cls, args, {}))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new_stub(cls, args, kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def new_stub(self, cls, args, kwargs):
        # A pickled nn.Module is created as cls.__new__(cls) and then given its __dict__ by BUILD.
        if not (cls is _LearnerStub or cls is _ParameterListStub) or type(args) is not tuple or args \
                or type(kwargs) is not dict or kwargs:
            raise self.legacy.corrupt(f"it creates a {getattr(cls, '__name__', type(cls).__name__)} "
                                      f"object, which is not a module record")
        return cls.__new__(cls)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _Recorded):
            inst.__setstate__(state)
        elif type(inst) is not OrderedDict:
            # An OrderedDict's state is a state_dict's `_metadata` (module versions), not needed.
            raise self.legacy.corrupt(f"it sets the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build

    def load_inst(self):
        # INST and OBJ are protocol 0/1 instance creation, which torch.save never writes.
        raise self.legacy.corrupt("it uses protocol-0 instance creation")

    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_inst

    # What the file's torch._utils functions did, here over storages this reader allocated.

    def rebuild_tensor(self, storage, storage_offset, size, stride):
        if not isinstance(storage, _StorageView):
            raise self.legacy.corrupt("a tensor without a storage")
        if not (_is_count(storage_offset) and _is_shape(size) and _is_shape(stride)
                and len(size) == len(stride)):
            raise self.legacy.corrupt("a tensor with a malformed offset, shape or stride")
        # Overlapping strides (an expanded tensor) are never a weight, and would let a few bytes of
        # file stand for a tensor too large to copy.
        if math.prod(size) > storage.length:
            raise self.legacy.corrupt(f"a tensor of shape {size} larger than its storage of {storage.length}")
        # The last element a tensor reaches must lie inside its storage; as_strided would check
        # too, but only against the root, where a view's neighbours lie.
        end = storage_offset + (sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0)
        if end > storage.length:
            raise self.legacy.corrupt(f"a tensor of shape {size} reaching past its storage of {storage.length}")
        flat = storage.root.data.view(storage.root.dtype)
        return flat.as_strided(size, stride, storage.start + storage_offset)

    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                          metadata=None):
        # metadata carries the conjugate/negative view bits; a weight has neither.
        if metadata and (not isinstance(metadata, dict) or any(metadata.values())):
            raise self.legacy.corrupt("a tensor saved as a conjugate or negated view")
        return self.rebuild_tensor(storage, storage_offset, size, stride)

    def rebuild_parameter(self, data, requires_grad, backward_hooks):
        # A plain tensor will do: the importer detaches everything, and hooks are never restored.
        if not isinstance(data, torch.Tensor):
            raise self.legacy.corrupt("a parameter without a tensor")
        return data

    def rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        # The state is the Python attributes set on the parameter (the reference's `learn` flags).
        return self.rebuild_parameter(data, requires_grad, backward_hooks)


def _is_legacy_format(path: Path) -> bool:
    """Whether the file opens as torch's legacy format does: with a pickle of its magic number."""
    try:
        with open(path, "rb") as f:
            head = f.read(_LEGACY_HEAD_BYTES)
        magic = _LegacyUnpickler(io.BytesIO(head), _LegacyFile(path, len(head))).load()
    except Exception:  # noqa: BLE001 - whatever else the file is, the zip reader judges it
        return False
    return type(magic) is int and magic == torch.serialization.MAGIC_NUMBER


def _legacy_load(path: Path):
    if sys.byteorder != "little":
        # The file's bytes are little-endian; a big-endian host would have to swap every element.
        raise CheckpointError(f"{path}: reading a legacy-format file needs a little-endian machine")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    legacy = _LegacyFile(path, len(data))
    stream = io.BytesIO(data)
    try:
        def next_pickle():
            return _LegacyUnpickler(stream, legacy).load()

        magic, version = next_pickle(), next_pickle()
        if type(magic) is not int or magic != torch.serialization.MAGIC_NUMBER:
            raise legacy.corrupt("bad magic number")
        if type(version) is not int or version != torch.serialization.PROTOCOL_VERSION:
            raise legacy.corrupt(f"unknown protocol version {str(version)[:20]}")
        sys_info = next_pickle()
        if not isinstance(sys_info, dict):
            raise legacy.corrupt("no sys_info record")
        if sys_info.get("little_endian", True) is False:
            legacy.count_byteorders = ("big", "little")  # torch <= 1.4, or a later one
        result = next_pickle()
        legacy.read_storages(next_pickle(), stream)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - nothing here runs file-supplied code, so it is a bad file
        detail = _first_line(str(e)) if str(e).strip() else "the file ends too early"
        raise legacy.corrupt(f"truncated or damaged; {type(e).__name__}: {detail}") from None
    return result


