"""Safe decoding of `.npy` files that hold pickles (MCTformer/WeakTr/CLIP-ES CAMs, cls_labels).

`np.save(path, some_dict)` writes a 0-d object array whose payload is a pickle, and loading an
untrusted pickle runs arbitrary code (docs/CONTRACTS.md). This module never calls `np.load(...,
allow_pickle=True)`: it reads the npy header with numpy's non-pickling helpers and runs a
restricted unpickler on the payload.

The unpickler resolves only the globals needed to rebuild numpy arrays and scalars (numpy 1.x
names `numpy.core.*`, numpy 2.x `numpy._core.*`) and a few plain builtins; anything else raises
`UnsafePickleError` naming the refused global. Even the allowed numpy globals are replaced by
placeholders that collect the pickled state, so numpy's own `__setstate__` never sees attacker
data: arrays are rebuilt here with `np.frombuffer` after checking dtype, shape and byte counts.
Object-dtype arrays are refused except as the npy container itself (no nested pickles), and
sizes are capped so that a small file cannot allocate gigabytes.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

DEFAULT_MAX_BYTES = 512 * 2**20  # largest accepted .npy file (a COCO CAM dict is ~10-50 MB)
DEFAULT_MAX_ELEMENTS = 128 * 2**20  # total array elements over all arrays of one file
_MAX_HEADER_BYTES = 10_000  # numpy's own default cap on the header dict
_MAX_OPCODES = 2_000_000  # a CAM pickle has a few hundred; a label dict ~10 per image
_MAX_NODES = 2_000_000  # containers + leaves walked when converting the unpickled tree
_MAX_DEPTH = 64  # nesting depth of containers
_MAX_STRING_ITEMSIZE = 2**20  # bytes per element of 'U'/'S' arrays

# Opcodes that reach outside the pickle stream (persistent ids, the copyreg extension registry).
_REFUSED_OPCODES = frozenset({"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"})
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})
_DTYPE_CODE = re.compile(r"^(b1|[iu][1248]|f(2|4|8|12|16)|c(8|16|24|32)|O[48]|[US]\d{1,8})$")
_ALLOWED_KINDS = frozenset("biufcUSO")
_NESTED_OBJECTS = "object arrays are not accepted inside the pickle"


class CamDecodeError(ValueError):
    """The bytes are not a well-formed, acceptable `.npy` file (truncated, corrupt, too big)."""


class UnsafePickleError(CamDecodeError):
    """The pickle names a global outside the allow-list (it would construct or call it)."""


class _Global:
    """What an allow-listed global resolves to: callable, but immune to the BUILD opcode.

    Returning a module-level function itself would let a pickle BUILD on it and set its
    attributes (`__defaults__`, ...) for the rest of the process.
    """

    __slots__ = ("_function", "_name")

    def __init__(self, function: Callable[..., Any] | None, name: str) -> None:
        self._function = function
        self._name = name

    def __call__(self, *args: Any) -> Any:
        if self._function is None:
            raise UnsafePickleError(f"unsafe pickle: refused call of {self._name}")
        return self._function(*args)

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError(f"unsafe pickle: refused BUILD on {self._name}")


# `numpy.ndarray` is only ever an argument of `_reconstruct`; calling it would allocate.
_NDARRAY = _Global(None, "numpy.ndarray")


class _Budget:
    """Running total of array elements decoded from one file."""

    __slots__ = ("max_elements", "elements")

    def __init__(self, max_elements: int) -> None:
        self.max_elements = max_elements
        self.elements = 0

    def take(self, count: int) -> None:
        self.elements += count
        if self.elements > self.max_elements:
            raise CamDecodeError(
                f"arrays hold more than {self.max_elements} elements in total (limit)"
            )


class _DTypeSpec:
    """Collects `numpy.dtype(code, align, copy)` + BUILD state; resolved only on use."""

    __slots__ = ("code", "state")

    def __init__(self, code: object) -> None:
        if isinstance(code, bytes):
            code = code.decode("latin1")
        if not isinstance(code, str) or not _DTYPE_CODE.match(code):
            raise CamDecodeError(f"unsupported dtype code {code!r}")
        self.code = code
        self.state: tuple | None = None

    def __setstate__(self, state: object) -> None:
        if self.state is not None:
            raise CamDecodeError("dtype state set twice")
        if not isinstance(state, tuple) or len(state) not in (8, 9):
            raise CamDecodeError("malformed dtype state")
        self.state = state

    def resolve(self) -> np.dtype:
        byteorder, subarray, names, fields, elsize = "|", None, None, None, -1
        if self.state is not None:
            version, byteorder, subarray, names, fields, elsize = self.state[:6]
            metadata = self.state[8] if len(self.state) == 9 else None
            if version not in (3, 4) or byteorder not in ("<", ">", "|", "="):
                raise CamDecodeError("malformed dtype state")
            if subarray is not None or names is not None or fields is not None or metadata:
                raise CamDecodeError("structured or sub-array dtypes are not accepted")
        prefix = byteorder if byteorder in ("<", ">") else ""
        dtype = np.dtype(prefix + self.code)
        if dtype.kind not in _ALLOWED_KINDS:
            raise CamDecodeError(f"unsupported dtype {dtype}")
        if type(elsize) is not int or (elsize != -1 and elsize != dtype.itemsize):
            raise CamDecodeError("dtype element size does not match its code")
        if dtype.itemsize > _MAX_STRING_ITEMSIZE:
            raise CamDecodeError(f"dtype {dtype} is too wide")
        return dtype


class _ArraySpec:
    """Collects `_reconstruct(ndarray, ...)` + BUILD state and rebuilds the array safely.

    Scalars and protocol-5 buffers are wrapped in one too (already built), so that a BUILD
    opcode aimed at them reaches `__setstate__` here, never numpy's.
    """

    __slots__ = ("budget", "value", "object_items", "shape")

    def __init__(self, budget: _Budget, value: np.ndarray | np.generic | None = None) -> None:
        self.budget = budget
        self.value = value
        self.object_items: list | None = None  # object-dtype arrays: the pickled elements
        self.shape: tuple[int, ...] | None = None if value is None else tuple(value.shape)

    def __setstate__(self, state: object) -> None:
        if self.shape is not None:
            raise CamDecodeError("array state set twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise CamDecodeError("malformed array state")
        shape, dtype_spec, is_fortran, data = state[-4:]
        shape = _checked_shape(shape)
        dtype = _resolve(dtype_spec, "array state")
        count = math.prod(shape)
        self.budget.take(count)
        if dtype.kind == "O":
            if not isinstance(data, list) or len(data) != count:
                raise CamDecodeError("object array state does not match its shape")
            self.object_items = data
        else:
            self.value = _array_from_bytes(data, dtype, shape, bool(is_fortran))
        self.shape = shape


def _resolve(dtype_spec: object, what: str, refuse_objects: str = "") -> np.dtype:
    """The dtype of a pickled `numpy.dtype(...)`; object dtypes refused with `refuse_objects`."""
    if not isinstance(dtype_spec, _DTypeSpec):
        raise CamDecodeError(f"{what} without a dtype")
    dtype = dtype_spec.resolve()
    if refuse_objects and dtype.kind == "O":
        raise CamDecodeError(refuse_objects)
    return dtype


def _checked_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list) or len(shape) > 32:
        raise CamDecodeError("malformed array shape")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CamDecodeError(f"malformed array shape {shape!r}")
    return tuple(shape)


def _array_from_bytes(
    data: object, dtype: np.dtype, shape: tuple[int, ...], fortran: bool = False
) -> np.ndarray:
    """A fresh native-endian C-contiguous array from exactly `prod(shape)` elements of bytes."""
    if isinstance(data, str):  # numpy 1.x pickles written by Python 2, read as latin1
        data = data.encode("latin1")
    if not isinstance(data, bytes | bytearray):
        raise CamDecodeError("array data is not a byte string")
    count = math.prod(shape)
    if len(data) != count * dtype.itemsize:
        problem = "truncated" if len(data) < count * dtype.itemsize else "oversized"
        raise CamDecodeError(
            f"{problem} array data: {len(data)} bytes, shape {shape} of {dtype} needs "
            f"{count * dtype.itemsize}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count)
    array = flat.reshape(shape, order="F" if fortran else "C")
    return np.array(array, dtype=dtype.newbyteorder("="), order="C", copy=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, each to a checked stand-in."""

    def __init__(self, stream: io.BytesIO, budget: _Budget) -> None:
        super().__init__(stream, fix_imports=False, encoding="latin1")
        self.budget = budget
        functions: dict[str, Callable[..., Any]] = {
            "numpy.dtype": _make_dtype,
            "_codecs.encode": _latin1_encode,
            "builtins.complex": _make_complex,
            "builtins.list": list,
            "builtins.tuple": tuple,
            "builtins.dict": dict,
            "builtins.bytes": _make_bytes,
        }
        for core in ("numpy.core", "numpy._core"):
            functions[f"{core}.multiarray._reconstruct"] = self._reconstruct
            functions[f"{core}.multiarray.scalar"] = self._scalar
            functions[f"{core}.numeric._frombuffer"] = self._frombuffer
        self.allowed = {tuple(k.rsplit(".", 1)): _Global(f, k) for k, f in functions.items()}
        self.allowed[("numpy", "ndarray")] = _NDARRAY
        for name in ("list", "tuple", "dict", "complex", "bytes"):  # protocols 0-2 say __builtin__
            self.allowed[("__builtin__", name)] = self.allowed[("builtins", name)]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(f"unsafe pickle: refused global {module}.{name}") from None

    def persistent_load(self, pid: object) -> Any:
        raise UnsafePickleError("unsafe pickle: refused persistent id")

    def _reconstruct(
        self, subtype: object, shape: object = (0,), dtype: object = b"b"
    ) -> _ArraySpec:
        if subtype is not _NDARRAY:
            raise UnsafePickleError(
                "unsafe pickle: _reconstruct of a type other than numpy.ndarray"
            )
        return _ArraySpec(self.budget)

    def _scalar(self, dtype_spec: object, data: object = None) -> _ArraySpec:
        dtype = _resolve(dtype_spec, "scalar", "object scalars are not accepted")
        self.budget.take(1)
        return _ArraySpec(self.budget, _array_from_bytes(data, dtype, ())[()])

    def _frombuffer(
        self, buffer: object, dtype_spec: object, shape: object, order: object = "C"
    ) -> _ArraySpec:
        dtype = _resolve(dtype_spec, "buffer", _NESTED_OBJECTS)
        checked = _checked_shape(shape)
        self.budget.take(math.prod(checked))
        return _ArraySpec(self.budget, _array_from_bytes(buffer, dtype, checked, order == "F"))


def _make_dtype(code: object, align: object = False, copy: object = True) -> _DTypeSpec:
    return _DTypeSpec(code)


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """Protocol-2 pickles spell bytes as `_codecs.encode(str, 'latin1')`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("unsafe pickle: _codecs.encode allowed only for str with latin1")
    return text.encode("latin1")


def _make_bytes(*args: object) -> bytes:
    """Protocols 0-2 spell b"" as `bytes()`; `bytes(n)` would allocate n bytes, so no ints."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], bytes):
        return args[0]
    raise UnsafePickleError("unsafe pickle: builtins.bytes allowed only for b'' or bytes")


def _make_complex(real: object = 0.0, imag: object = 0.0) -> complex:
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise CamDecodeError("complex() with non-numeric parts")
    return complex(real, imag)  # type: ignore[arg-type]


class _Converter:
    """Turns the unpickled tree into plain values, refusing leftovers and nested object arrays.

    Shared references are converted once (a small pickle can reference one list exponentially
    many times); cycles are refused.
    """

    _LEAVES = (str, bytes, int, float, complex, bool, type(None))

    def __init__(self) -> None:
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()
        self.nodes = 0

    def convert(self, obj: object, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise CamDecodeError(f"pickle holds more than {_MAX_NODES} values (limit)")
        if depth > _MAX_DEPTH:
            raise CamDecodeError(f"pickle nests deeper than {_MAX_DEPTH} levels")
        if isinstance(obj, self._LEAVES):
            return obj
        if isinstance(obj, bytearray):
            return bytes(obj)
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise CamDecodeError("pickle holds a cyclic structure")
        self.active.add(key)
        result: Any
        if isinstance(obj, _ArraySpec):
            if obj.shape is None:
                raise CamDecodeError("array without state")
            if obj.value is None:
                raise CamDecodeError(_NESTED_OBJECTS)
            result = obj.value
        elif type(obj) is dict:
            result = {}
            for k, v in obj.items():
                result[self.convert(k, depth + 1)] = self.convert(v, depth + 1)
        elif type(obj) is list:
            result = [self.convert(v, depth + 1) for v in obj]
        elif type(obj) is tuple:
            result = tuple(self.convert(v, depth + 1) for v in obj)
        else:
            raise CamDecodeError(f"unexpected {type(obj).__name__} value in pickle")
        self.active.discard(key)
        self.done[key] = result
        return result


def _read_header(stream: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(stream, max_header_size=_MAX_HEADER_BYTES)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(stream, max_header_size=_MAX_HEADER_BYTES)
    raise CamDecodeError(f"unsupported .npy format version {version}")


def _prescan(payload: bytes) -> bytes:
    """Walks the opcodes without executing them; returns the pickle without its frames.

    Refuses truncation, unknown and refused opcodes, absurd memo indices and too many opcodes.
    Frames (protocol 4+) only group opcodes for buffered reads and may be dropped; the C
    unpickler mishandles frames that end inside an opcode (measured: a fuzzed 400-byte file
    raised MemoryError), so the unpickler only ever sees the unframed stream checked here.
    """
    count = 0
    unframed = bytearray()
    copied_up_to = 0
    try:
        for opcode, arg, pos in pickletools.genops(payload):
            count += 1
            if count > _MAX_OPCODES:
                raise CamDecodeError(f"pickle has more than {_MAX_OPCODES} opcodes (limit)")
            if opcode.name in _REFUSED_OPCODES:
                raise UnsafePickleError(f"unsafe pickle: refused opcode {opcode.name}")
            # The C unpickler sizes its memo table by the largest index: one PUT of index
            # 2**31 would allocate 16 GiB. A real pickler numbers entries 0, 1, 2, ...
            if opcode.name in _MEMO_OPCODES and not (isinstance(arg, int) and 0 <= arg < count):
                raise CamDecodeError(f"corrupt pickle: memo index {arg!r} out of range")
            if opcode.name == "FRAME":
                unframed += payload[copied_up_to:pos]
                copied_up_to = pos + 9  # opcode byte + 8-byte length
            if opcode.name == "STOP":
                unframed += payload[copied_up_to : pos + 1]
    except CamDecodeError:
        raise
    except Exception as error:  # genops raises ValueError for short reads and unknown opcodes
        raise CamDecodeError(f"truncated or corrupt pickle in .npy file: {error}") from None
    return bytes(unframed)


def _decode_object_payload(payload: bytes, shape: tuple[int, ...], budget: _Budget) -> object:
    top = _RestrictedUnpickler(io.BytesIO(_prescan(payload)), budget).load()
    if not isinstance(top, _ArraySpec) or top.object_items is None:
        raise CamDecodeError("object .npy payload is not an object array")
    if top.shape != shape or len(shape) > 1:
        raise CamDecodeError(f"object array of shape {top.shape} (header {shape}) not accepted")
    converter = _Converter()
    items = [converter.convert(item) for item in top.object_items]
    return items[0] if shape == () else items


def load_npy_pickle(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> object:
    """Decodes the bytes of a `.npy` file (a numeric array, or the object array `np.save`
    writes for a dict/list) without ever running code from it; larger than `max_bytes` or
    decoding to more than `max_elements` array elements is refused.

    Returns:
        The numeric array, or the pickled value made only of dicts, lists, tuples, strings,
        bytes, numbers, None and numeric arrays/scalars (a 0-d object array gives its element).

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list.
        CamDecodeError: anything else wrong with the bytes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CamDecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CamDecodeError(f".npy file of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    budget = _Budget(max_elements)
    try:
        stream = io.BytesIO(data)
        try:
            shape, fortran_order, dtype = _read_header(stream)
        except CamDecodeError:
            raise
        except Exception as error:
            message = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise CamDecodeError(f"not a .npy file (bad or truncated header): {message}") from None
        payload = stream.read()
        if dtype.hasobject:
            if dtype.kind != "O":
                raise CamDecodeError("structured dtypes with object fields are not accepted")
            return _decode_object_payload(payload, shape, budget)
        if dtype.kind not in _ALLOWED_KINDS:
            raise CamDecodeError(f"unsupported .npy dtype {dtype}")
        budget.take(math.prod(shape))
        return _array_from_bytes(payload, dtype, shape, fortran_order)
    except CamDecodeError:
        raise
    except RecursionError:
        raise CamDecodeError("not a valid .npy file: structure nests too deeply") from None
    except MemoryError:
        raise CamDecodeError("not a valid .npy file: decoding would need too much memory") from None
    except Exception as error:  # corrupt input raises almost anything; report it uniformly
        message = str(error).splitlines()[0][:200] if str(error) else ""
        raise CamDecodeError(f"not a valid .npy file: {type(error).__name__}: {message}") from None


def load_cls_labels(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Decodes MCTformer/WeakTr `cls_labels.npy`, a pickled dict, as `{image_id: float32 (C,)}`;
    per-row checks (vector length, unsafe ids) are the caller's.

    Raises:
        UnsafePickleError / CamDecodeError: not a safe, well-formed dict of numeric vectors.
    """
    value = load_npy_pickle(data, max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise CamDecodeError(f"cls_labels holds a {type(value).__name__}, expected a dict")
    labels: dict[str, np.ndarray] = {}
    for key, vector in value.items():
        if isinstance(key, np.str_):
            key = str(key)
        if not isinstance(key, str):
            raise CamDecodeError(f"cls_labels key {key!r} is not a string")
        if isinstance(vector, list | tuple):
            if not all(isinstance(v, int | float | np.number) for v in vector):
                raise CamDecodeError(f"cls_labels[{key!r}] is not a numeric vector")
            vector = np.asarray(vector, dtype=np.float32)
        if not isinstance(vector, np.ndarray) or vector.dtype.kind not in "biuf":
            raise CamDecodeError(f"cls_labels[{key!r}] is not a numeric vector")
        if vector.ndim != 1:
            raise CamDecodeError(f"cls_labels[{key!r}] has shape {vector.shape}, expected 1-D")
        labels[key] = vector.astype(np.float32)
    return labels
