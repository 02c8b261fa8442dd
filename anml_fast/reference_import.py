"""Import a model saved by the authors' ANML code (or the OML code it derives from).

The reference saves its whole `Learner` module with `torch.save(maml.net, path)`: a pickle, which
would run arbitrary code if loaded the ordinary way. Here the file is read by torch's weights-only
unpickler, which builds nothing but tensors, parameters and plain containers; the few reference
classes the file names (`model.learner.Learner`, torch's `ParameterList`) are mapped to inert stubs
that merely keep their pickled state. Anything else the pickle names (`posix.system`, ...) is
refused before it could be called, and reported as a one-line CheckpointError.

The authors ran PyTorch 1.4, whose `torch.save` wrote the legacy (pre-1.6, non-zip) format. torch's
weights-only reader refuses a whole module in that format (its records carry the module's class
and source), so such files are read here by our own parser of that layout, with an unpickler that
admits the same few names and builds tensors by our code, not torch's rebuild functions.

What we take from the Learner: its `vars` list, whose order is our `param_specs()` order (28 tensors
for ANML, NM first; 16 for OML). Its `vars_bn` running statistics are ignored: the reference
normalises in training mode, so they never influence its outputs.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path
from types import MappingProxyType

import torch

from .checkpoint import Checkpoint, check_params
from .errors import CheckpointError
from .models import ModelConfig, build

# Where the reference code defines its Learner (both the ANML and the OML repositories keep it in
# model/learner.py and run their scripts from the repository root).
LEARNER_NAMES = ("model.learner.Learner",)
PARAMETER_LIST_NAME = "torch.nn.modules.container.ParameterList"
COUNTS = {28: "anml", 16: "oml"}
_MAX_EXTRA_LEARNER_NAMES = 4  # forks that moved the Learner; bounded so a file cannot loop us


class _Recorded:
    """Stands in for a class named in the file: keeps the pickled state and has no behaviour.

    The weights-only unpickler creates it with `cls.__new__` and hands it its state through
    `__setstate__`, so no code of the original class (or ours, beyond this) ever runs.
    """

    # What a stub reads as when the file created it but never gave it a state.
    recorded_state = MappingProxyType({})

    def __setstate__(self, state):
        # Protocol-2 pickles may carry (dict_state, slot_state); only the dict matters here.
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        self.__dict__["recorded_state"] = state if isinstance(state, dict) else {}


class _LearnerStub(_Recorded):
    pass


class _ParameterListStub(_Recorded):
    pass


def import_reference(path: str | os.PathLike, kind: str | None = None) -> Checkpoint:
    """Read a reference checkpoint (whole pickled Learner, its state_dict, or a list of its tensors).

    `kind` ("anml" or "oml") overrides the guess made from the number of tensors (28 or 16).
    Every problem, including a file that tries to name a non-allowlisted global, is a
    CheckpointError naming the file.
    """
    path = Path(path)
    source = str(path)
    if kind is not None and kind not in COUNTS.values():
        raise CheckpointError(f"{source}: unknown model kind {kind!r}; expected one of {sorted(COUNTS.values())}")
    if not path.is_file():
        raise CheckpointError(f"{source}: no such reference checkpoint file")
    obj = _restricted_load(path)
    tensors, neuromodulation = _reference_tensors(obj, source)
    config, params = _to_params(tensors, kind, neuromodulation, source)
    info = {"imported_from": source, "imported_kind": config.kind}
    return Checkpoint(config=config, params=params, info=info)


def _restricted_load(path: Path):
    if _is_legacy_format(path):
        return _legacy_load(path)
    learner_names = list(LEARNER_NAMES)
    for _ in range(_MAX_EXTRA_LEARNER_NAMES + 1):
        allow = [(_LearnerStub, n) for n in learner_names] + [(_ParameterListStub, PARAMETER_LIST_NAME)]
        try:
            with torch.serialization.safe_globals(allow):
                # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot
                # override an explicit argument, so the environment cannot make this load unsafe.
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = _refused_global(str(e))
            # A fork that keeps its Learner elsewhere is still the same inert record, so such a
            # name may be mapped to the stub too; nothing else is ever admitted.
            if refused and refused.rpartition(".")[2] == "Learner" and refused not in learner_names \
                    and re.fullmatch(r"[A-Za-z_][\w.]*", refused):
                learner_names.append(refused)
                continue
            raise CheckpointError(_unpickling_message(path, str(e), refused)) from None
        except Exception as e:  # noqa: BLE001 - a weights-only load only reads, so any failure is a bad file
            detail = _first_line(str(e)) if str(e).strip() else "the file ends too early"
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or not "
                                  f"written by torch.save; {type(e).__name__}: {detail})") from None
    raise CheckpointError(f"{path}: names too many different Learner classes ({learner_names})")


def _refused_global(message: str) -> str | None:
    for pattern in (r"GLOBAL (\S+) was not an allowed global", r"Unsupported global: GLOBAL (\S+)",
                    r"unsupported GLOBAL (\S+) whose module"):
        m = re.search(pattern, message)
        if m:
            return m.group(1)
    return None


def _unpickling_message(path: Path, message: str, refused: str | None) -> str:
    if refused:
        return _refusal_message(path, refused)
    # torch prefixes the unpickler's own message with a long multi-line explanation; keep its core.
    m = re.search(r"WeightsUnpickler error:\s*(.*)", message)
    detail = _first_line(m.group(1) if m else message)
    return f"{path}: not a readable reference checkpoint (the weights-only reader stopped at: {detail})"


def _refusal_message(path: Path, refused: str) -> str:
    return (f"{path}: refused to load: the file names the global {refused}, which is neither a "
            f"tensor type nor a reference Learner (nothing in the file was run)")


# --- torch's legacy (pre-1.6, non-zip) format ---------------------------------------------------
#
# Layout, as torch/serialization.py's _legacy_save writes it and _legacy_load reads it: pickles of
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


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else "no detail"
    return line if len(line) <= 200 else line[:197] + "..."


def _reference_tensors(obj, source: str) -> tuple[list, bool | None]:
    """The Learner's `vars` in order, and its Neuromodulation flag when the file records it."""
    if isinstance(obj, _LearnerStub):
        state = obj.recorded_state
        modules = state.get("_modules")
        plist = modules.get("vars") if isinstance(modules, dict) else None
        if not isinstance(plist, _ParameterListStub):
            raise CheckpointError(f"{source}: the pickled Learner has no `vars` parameter list")
        flag = state.get("Neuromodulation")
        return _parameter_list(plist, source), flag if isinstance(flag, bool) else None
    if isinstance(obj, _ParameterListStub):
        return _parameter_list(obj, source), None
    if isinstance(obj, (list, tuple)):
        return list(obj), None
    if isinstance(obj, dict):
        return _from_dict(obj, source), None
    raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a reference Learner, "
                          f"state_dict or list of tensors")


def _parameter_list(plist: _ParameterListStub, source: str) -> list:
    params = plist.recorded_state.get("_parameters")
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: the pickled `vars` list holds no parameters")
    return _by_index({str(k): v for k, v in params.items()}, source, "`vars`")


def _by_index(indexed: dict[str, object], source: str, what: str) -> list:
    """Values of a {"0": t0, "1": t1, ...} mapping in index order; the indices must be 0..n-1."""
    try:
        order = sorted(indexed, key=int)
    except ValueError:
        raise CheckpointError(f"{source}: {what} has non-numeric keys {sorted(indexed)[:4]}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise CheckpointError(f"{source}: {what} indices are not 0..{len(order) - 1}")
    return [indexed[k] for k in order]


def _from_dict(d: dict, source: str) -> list:
    keys = [k for k in d if isinstance(k, str)]
    if len(keys) != len(d):
        raise CheckpointError(f"{source}: a dict with non-string keys is not a state_dict")
    # Our own flat names (e.g. a dict someone exported): put them in param_specs order.
    for k in COUNTS.values():
        names = [s.name for s in build(ModelConfig(kind=k)).param_specs()]
        if set(names) == set(keys):
            return [d[n] for n in names]
    # A Learner's state_dict, possibly from a wrapper (`net.vars.3`); `vars_bn.*` is ignored.
    indexed = {}
    for key in keys:
        m = re.fullmatch(r"(?:.*\.)?vars\.(\d+)", key)
        if m:
            indexed[m.group(1)] = d[key]
        elif not re.fullmatch(r"(?:.*\.)?vars_bn\.\d+", key):
            raise CheckpointError(f"{source}: unexpected state_dict key {key!r} "
                                  f"(expected vars.N, vars_bn.N or anml_fast parameter names)")
    if not indexed:
        raise CheckpointError(f"{source}: the state_dict holds no `vars.N` tensors")
    return _by_index(indexed, source, "the state_dict's `vars`")


def _dim(t: torch.Tensor, i: int, source: str, index: int) -> int:
    if t.dim() <= i:
        raise CheckpointError(f"{source}: tensor {index} has shape {tuple(t.shape)}, too few dimensions")
    return int(t.shape[i])


def _to_params(tensors: list, kind: str | None, neuromodulation: bool | None,
               source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: item {i} of the parameter list is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {i} has dtype {t.dtype}, expected floating point")
        # A file may describe storage-less (meta) or sparse tensors; neither is a usable weight.
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise CheckpointError(f"{source}: tensor {i} is a {t.layout} tensor on {t.device}, "
                                  f"expected a dense one with data")
    guessed = COUNTS.get(len(tensors))
    if kind is None:
        if guessed is None:
            raise CheckpointError(f"{source}: holds {len(tensors)} parameter tensors; a reference ANML "
                                  f"model has 28 and an OML model 16")
        kind = guessed
    expected = {v: k for k, v in COUNTS.items()}[kind]
    if len(tensors) != expected:
        raise CheckpointError(f"{source}: holds {len(tensors)} parameter tensors; kind {kind!r} has {expected}")
    if neuromodulation is not None and neuromodulation != (kind == "anml"):
        raise CheckpointError(f"{source}: the Learner says Neuromodulation={neuromodulation}, "
                              f"which does not fit kind {kind!r}")
    if kind == "anml":
        config = ModelConfig(kind="anml", nm_channels=_dim(tensors[0], 0, source, 0),
                             pln_channels=_dim(tensors[14], 0, source, 14),
                             num_outputs=_dim(tensors[26], 0, source, 26))
    else:
        config = ModelConfig(kind="oml", pln_channels=_dim(tensors[0], 0, source, 0),
                             oml_hidden=_dim(tensors[12], 0, source, 12),
                             num_outputs=_dim(tensors[14], 0, source, 14))
    names = [s.name for s in build(config).param_specs()]
    # Plain tensors, not the file's Parameters (they carry requires_grad and the reference's `learn`
    # flags); float32 because the reference trains in it and our trainers assume it.
    # copy=True: a file may lay several tensors over one storage, and our safetensors checkpoints
    # refuse tensors that share memory.
    params = {n: t.detach().to(torch.float32, copy=True).contiguous() for n, t in zip(names, tensors)}
    check_params(config, params, source)
    bad = [n for n, t in params.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {bad[:4]} (a diverged run?)")
    return config, params


__all__ = ["import_reference", "LEARNER_NAMES"]
