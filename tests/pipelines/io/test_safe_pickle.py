"""The restricted `.npy` / pickle loader: round trips, numpy 1.x pickles, attacks, junk."""

from __future__ import annotations

import builtins
import io
import math
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.lib import format as npy_format

from pipelines.io.safe_pickle import (
    CamDecodeError,
    UnsafePickleError,
    load_cls_labels,
    load_npy_pickle,
)

# ---------------------------------------------------------------- helpers


def npy_save(value: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)
    return buffer.getvalue()


def npy_object_file(payload: bytes, shape: tuple[int, ...] = ()) -> bytes:
    """An object-dtype .npy header followed by an arbitrary pickle payload."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": shape}
    )
    return header.getvalue() + payload


def numpy1_pickle(value: Any, protocol: int) -> bytes:
    """The pickle numpy 1.x writes: module `numpy.core.multiarray` instead of `numpy._core`.

    Protocols <= 3 name globals as text lines, so the module can be patched in place.
    """
    container = np.empty((), dtype=object)
    container[()] = value
    payload = pickle.dumps(container, protocol=protocol)
    patched = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy._core" not in patched and b"numpy.core.multiarray\n" in patched
    return patched


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and b.shape == a.shape
        assert b.dtype == a.dtype.newbyteorder("=")  # decoded arrays are native-endian
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert type(a) is type(b) and (a == b or (a != a and b != b))
    elif isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


def cam_dict() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {0: rng.random((5, 7), dtype=np.float32), 14: rng.random((5, 7), dtype=np.float32)}


class RunsCall:
    """Pickles as `function(*args)`: the shape of every pickle exploit."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple]:
        return self.function, self.args


def attacks(sentinel: Path) -> list[Any]:
    touch = f"touch {sentinel}"
    return [
        RunsCall(os.system, touch),
        RunsCall(subprocess.call, ["touch", str(sentinel)]),
        RunsCall(subprocess.Popen, ["touch", str(sentinel)]),
        RunsCall(builtins.eval, f"open({str(sentinel)!r}, 'w')"),
        RunsCall(builtins.exec, f"open({str(sentinel)!r}, 'w')"),
        RunsCall(builtins.getattr, "", "join"),
        RunsCall(builtins.open, str(sentinel), "w"),
        RunsCall(__import__("importlib").import_module, "os"),
    ]


# ---------------------------------------------------------------- round trips


def test_numpy2_cam_dict_round_trip() -> None:
    cams = cam_dict()
    decoded = load_npy_pickle(npy_save(cams))
    assert_same(cams, decoded)
    assert all(v.flags.writeable and v.flags.c_contiguous for v in decoded.values())


def test_clip_es_dict_and_mixed_values_round_trip() -> None:
    value = {
        "keys": np.array([0, 14], np.int64),
        "attn_highres": np.random.default_rng(1).random((2, 4, 6)).astype(np.float16),
        "scalars": [np.float32(0.5), np.int64(3), np.bool_(True)],
        "plain": [1, 2.5, None, True, "text", b"bytes", (1, 2), 3 + 4j],
        "strings": np.array(["ab", "c"]),
    }
    assert_same(value, load_npy_pickle(npy_save(value)))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.array([True, False]),
        np.array(3.5),
        np.zeros((0, 4), np.uint8),
    ],
)
def test_plain_array_round_trip(array: np.ndarray) -> None:
    decoded = load_npy_pickle(npy_save(array))
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == array.dtype.newbyteorder("=") and decoded.shape == array.shape


def test_version_2_header() -> None:
    array = np.arange(5, dtype=np.float32)
    buffer = io.BytesIO()
    npy_format.write_array(buffer, array, version=(2, 0))
    np.testing.assert_array_equal(load_npy_pickle(buffer.getvalue()), array)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_numpy1_style_pickles(protocol: int) -> None:
    cams = cam_dict()
    cams["x"] = np.float32(2.0)
    decoded = load_npy_pickle(npy_object_file(numpy1_pickle(cams, protocol)))
    assert_same(cams, decoded)


@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_protocols(protocol: int) -> None:
    container = np.empty((), dtype=object)
    container[()] = cam_dict()
    payload = pickle.dumps(container, protocol=protocol)
    assert_same(cam_dict(), load_npy_pickle(npy_object_file(payload)))


def test_one_dimensional_object_array_gives_a_list() -> None:
    container = np.empty(2, dtype=object)
    container[0], container[1] = {"a": 1}, [np.float32(1)]
    assert_same([{"a": 1}, [np.float32(1)]], load_npy_pickle(npy_save(container)))


# ---------------------------------------------------------------- attacks


def test_the_canary_is_live(tmp_path: Path) -> None:
    """Plain unpickling of the attack really runs it: the refusals below are meaningful."""
    sentinel = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCall(os.system, f"touch {sentinel}")))
    assert sentinel.exists()


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_attacks_are_refused(tmp_path: Path, index: int, protocol: int) -> None:
    sentinel = tmp_path / "ran"
    attack = attacks(sentinel)[index]
    container = np.empty((), dtype=object)
    container[()] = {0: np.zeros((2, 2), np.float32), 1: [attack]}
    with pytest.raises(UnsafePickleError, match="unsafe pickle: refused global"):
        load_npy_pickle(npy_object_file(pickle.dumps(container, protocol=protocol)))
    assert not sentinel.exists()


def test_attack_in_cls_labels(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    data = npy_save({"img": RunsCall(os.system, f"touch {sentinel}")})
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_cls_labels(data)
    assert not sentinel.exists()


def test_hand_written_posix_system_pickle(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    payload = f"cposix\nsystem\n(Vtouch {sentinel}\ntR.".encode()
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_npy_pickle(npy_object_file(payload))
    assert not sentinel.exists()


def test_allowed_globals_cannot_be_abused() -> None:
    # numpy.ndarray called directly would allocate: it resolves to a non-callable marker
    call_ndarray = b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R."
    with pytest.raises(UnsafePickleError, match="numpy.ndarray"):
        load_npy_pickle(npy_object_file(call_ndarray))
    # _reconstruct of something other than ndarray
    other = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R."
    with pytest.raises(UnsafePickleError, match="other than numpy.ndarray"):
        load_npy_pickle(npy_object_file(other))
    # BUILD on an allowed global would set attributes on a module-level object
    build = b"\x80\x02cnumpy\ndtype\n}U\x01xK\x01sb."
    with pytest.raises(UnsafePickleError, match="BUILD"):
        load_npy_pickle(npy_object_file(build))
    with pytest.raises(UnsafePickleError, match="BINPERSID"):
        load_npy_pickle(npy_object_file(b"\x80\x02U\x01xQ."))


def test_nested_object_arrays_are_refused() -> None:
    inner = np.array([1, "a", None], dtype=object)
    with pytest.raises(CamDecodeError, match="object arrays"):
        load_npy_pickle(npy_save({0: inner}))


@pytest.mark.parametrize(
    "value",
    [
        {0: {1, 2}},  # sets are not plain containers here
        {0: np.dtype("f4")},  # a bare dtype is not a value
        {0: np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])},  # structured
        {0: np.datetime64("2020-01-01")},
    ],
)
def test_unsupported_values_are_refused(value: Any) -> None:
    with pytest.raises(CamDecodeError):
        load_npy_pickle(npy_save(value))


def test_cycles_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CamDecodeError, match="cyclic"):
        load_npy_pickle(npy_save({0: loop}))


def test_shared_references_decode_in_linear_time() -> None:
    node: list[Any] = [1]
    for _ in range(40):  # 2**40 leaves if expanded
        node = [node, node]
    decoded = load_npy_pickle(npy_save({0: node}))
    assert decoded[0][0] is decoded[0][1]


# ---------------------------------------------------------------- memory bombs and junk


def test_size_limits() -> None:
    data = npy_save(cam_dict())
    with pytest.raises(CamDecodeError, match="limit"):
        load_npy_pickle(data, max_bytes=len(data) - 1)
    with pytest.raises(CamDecodeError, match="elements"):
        load_npy_pickle(data, max_elements=40)
    header = io.BytesIO()
    npy_format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    with pytest.raises(CamDecodeError, match="elements"):
        load_npy_pickle(header.getvalue())


def test_huge_shape_in_array_state_is_refused_before_allocation() -> None:
    array = pickle.dumps(np.zeros(3, np.float32), protocol=2)
    bomb = array.replace(b"K\x03\x85", b"J\x00\xca\x9a\x3b\x85")  # shape (3,) -> (10**9,)
    assert bomb != array
    container = b"\x80\x02]" + bomb[2:-1] + b"a."
    with pytest.raises(CamDecodeError, match="elements"):
        load_npy_pickle(npy_object_file(container, shape=(1,)), max_elements=10**8)


def test_huge_length_prefix_is_refused() -> None:
    payload = b"\x80\x04\x8e" + (2**60).to_bytes(8, "little") + b"xx."  # BINBYTES8
    with pytest.raises(CamDecodeError, match="truncated"):
        load_npy_pickle(npy_object_file(payload))


def test_memo_index_bomb_is_refused() -> None:
    """One LONG_BINPUT of index 2**31 - 1 would make the C unpickler allocate a 16 GiB memo."""
    payload = b"\x80\x02]r\xff\xff\xff\x7f."
    with pytest.raises(CamDecodeError, match="memo index"):
        load_npy_pickle(npy_object_file(payload))


def test_frames_ending_inside_an_opcode() -> None:
    """CPython's file-based unpickler raises MemoryError (or SystemError) on these frames."""
    value = {"keys": np.array([0, 3]), "attn_highres": np.ones((2, 3, 3), np.float16)}
    container = np.empty((), dtype=object)
    container[()] = value
    payload = pickle.dumps(container, protocol=5)
    assert payload[2:3] == b"\x95"  # FRAME
    for length in range(1, len(payload)):
        framed = payload[:3] + length.to_bytes(8, "little") + payload[11:]
        assert_same(value, load_npy_pickle(npy_object_file(framed)))


def test_every_truncation_is_a_decode_error() -> None:
    data = npy_save({0: np.ones((3, 4), np.float32), "k": [1, 2]})
    for cut in range(len(data)):
        with pytest.raises(CamDecodeError):
            load_npy_pickle(data[:cut])
    plain = npy_save(np.ones((3, 4), np.float32))
    with pytest.raises(CamDecodeError, match="truncated"):
        load_npy_pickle(plain[:-1])


def test_junk_is_a_decode_error() -> None:
    with pytest.raises(CamDecodeError, match="npy"):
        load_npy_pickle(b"\xff\xd8\xff\xe0 a JPEG, not an npy file")
    with pytest.raises(CamDecodeError):
        load_npy_pickle(npy_object_file(b"\x80\x04garbage"))
    with pytest.raises(CamDecodeError):
        load_npy_pickle("not bytes")  # type: ignore[arg-type]


def test_object_container_must_match_header() -> None:
    payload = pickle.dumps(np.zeros(3, np.float32), protocol=4)  # not an object array
    with pytest.raises(CamDecodeError, match="not an object array"):
        load_npy_pickle(npy_object_file(payload))


# ---------------------------------------------------------------- cls_labels


def test_load_cls_labels() -> None:
    labels = {"2007_000032": np.eye(20, dtype=np.float32)[0], "b": np.zeros(20, np.float32)}
    decoded = load_cls_labels(npy_save(labels))
    assert list(decoded) == list(labels)
    for key in labels:
        assert decoded[key].dtype == np.float32
        np.testing.assert_array_equal(decoded[key], labels[key])
    numpy1 = load_cls_labels(npy_object_file(numpy1_pickle(labels, protocol=2)))
    np.testing.assert_array_equal(numpy1["2007_000032"], labels["2007_000032"])
    assert load_cls_labels(npy_save({"a": [0, 1.0]}))["a"].dtype == np.float32


@pytest.mark.parametrize(
    "value", [[1, 2], {1: np.zeros(3)}, {"a": "text"}, {"a": np.zeros((2, 2))}, {"a": [None]}]
)
def test_load_cls_labels_refuses_malformed(value: Any) -> None:
    with pytest.raises(CamDecodeError):
        load_cls_labels(npy_save(value))


# ---------------------------------------------------------------- properties

PLAIN_TYPES = (dict, list, tuple, str, bytes, int, float, complex, bool, type(None))


def only_plain_values(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biufcUS"
    if isinstance(value, np.generic):
        return value.dtype.kind in "biufcUS"
    if not isinstance(value, PLAIN_TYPES):
        return False
    if isinstance(value, dict):
        return all(only_plain_values(k) and only_plain_values(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(only_plain_values(v) for v in value)
    return True


numeric_arrays = hnp.arrays(
    dtype=st.sampled_from(["f4", "f8", "f2", ">f4", "i8", "u1", "?", "c8"]).map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)
numpy_scalars = st.sampled_from([np.float32, np.float64, np.int64, np.uint8]).map(lambda t: t(3))
leaves = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.none(),
    st.booleans(),
    numeric_arrays,
    numpy_scalars,
)
safe_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.integers(0, 90), st.text(max_size=6)), children, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=safe_values, protocol=st.integers(0, 5), numpy1=st.booleans())
def test_property_safe_values_round_trip(value: Any, protocol: int, numpy1: bool) -> None:
    if numpy1 and protocol <= 3:
        data = npy_object_file(numpy1_pickle(value, protocol))
    else:
        container = np.empty((), dtype=object)
        container[()] = value
        data = npy_object_file(pickle.dumps(container, protocol=protocol))
    assert_same(value, load_npy_pickle(data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=safe_values,
    attack_index=st.integers(0, 7),
    protocol=st.integers(0, 5),
    data=st.data(),
)
def test_property_attacks_never_run(
    tmp_path_factory: pytest.TempPathFactory,
    value: Any,
    attack_index: int,
    protocol: int,
    data: st.DataObject,
) -> None:
    sentinel = tmp_path_factory.mktemp("attack") / "ran"
    attack = attacks(sentinel)[attack_index]
    where = data.draw(st.sampled_from(["top", "dict", "list", "key"]))
    if where == "top":
        poisoned: Any = attack
    elif where == "dict":
        poisoned = {"cam": value, 0: attack}
    elif where == "list":
        poisoned = [value, attack]
    else:
        poisoned = {(1, attack): value}
    container = np.empty((), dtype=object)
    container[()] = poisoned
    with pytest.raises(UnsafePickleError):
        load_npy_pickle(npy_object_file(pickle.dumps(container, protocol=protocol)))
    assert not sentinel.exists()


def _decodes_safely(data: bytes) -> None:
    try:
        value = load_npy_pickle(data)
    except CamDecodeError:
        return
    assert only_plain_values(value)


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=512))
def test_property_arbitrary_bytes(junk: bytes) -> None:
    _decodes_safely(junk)
    _decodes_safely(npy_object_file(junk))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=safe_values, protocol=st.integers(0, 5), data=st.data())
def test_property_mutated_pickles(value: Any, protocol: int, data: st.DataObject) -> None:
    """Random byte edits of valid pickles: a decode error or plain values, nothing else."""
    container = np.empty((), dtype=object)
    container[()] = {"v": value, "a": np.arange(4, dtype=np.float32)}
    payload = bytearray(pickle.dumps(container, protocol=protocol))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    _decodes_safely(npy_object_file(bytes(payload)))
