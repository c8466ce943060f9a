"""Property: arbitrary bytes and arbitrary pickles at the CAM loader never run code and only
ever give arrays or a clear rejection.

The restricted unpickler's own properties live in tests/pipelines/io/test_safe_pickle.py (its
strategies are reused here). This case drives the stage's entry point,
`pipelines.ingest.rows.decode_cam` (what ingest calls on every `.npy`), with four generators: random
bytes, random bytes behind a valid `.npy` object header, random pickle opcode streams, and pickles
of plain values with an exploit (os.system, subprocess, eval, exec, open, import) hidden anywhere in
them, some of them byte-mutated. The only allowed outcomes: (class ids, C x H x W float32 planes in
[0, 1]) or `RowRejected`; any other exception, or the sentinel file appearing, fails the case.
"""

from __future__ import annotations

import pickle
import pickletools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipelines.ingest.rows import decode_cam
from pipelines.io.class_spaces import ClassSpace
from pipelines.io.rows import RowRejected
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES
from tests.pipelines.io.test_safe_pickle import attacks, npy_object_file, safe_values

SPACE = ClassSpace("custom", tuple(SYNTHETIC_CLASSES.class_names))
VECTOR = SPACE.num_classes - 1
OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]

valid_cams = st.dictionaries(
    st.integers(0, VECTOR - 1),
    hnp.arrays(np.float32, (3, 4), elements=st.floats(0, 1, width=32)),
    min_size=1,
    max_size=3,
)
opcode_streams = st.lists(
    st.tuples(st.sampled_from(OPCODES), st.binary(max_size=6)), max_size=24
).map(lambda ops: b"\x80\x04" + b"".join(code + arg for code, arg in ops) + b".")


def _container(value: Any, protocol: int) -> bytes:
    container = np.empty((), dtype=object)
    container[()] = value
    return npy_object_file(pickle.dumps(container, protocol=protocol))


def test_cam_loader_property(tmp_path_factory, reliability) -> None:
    reliability.case(
        kind="input",
        name="CAM loader: arbitrary bytes and arbitrary pickles (property-based)",
        injected=(
            "hypothesis-generated `.npy` payloads into `pipelines.ingest.rows.decode_cam`: random "
            "bytes, random bytes behind a valid object-array header, random pickle opcode streams, "
            "valid CAM dicts, and pickles of plain values carrying one of 8 exploits (os.system, "
            "subprocess.call/Popen, eval, exec, getattr, open, import_module) at a random place, "
            "optionally with 1-4 random byte edits"
        ),
        checked="every example returns class ids + finite C x H x W float32 planes in [0, 1] or "
        "raises RowRejected (nothing else); the exploits' sentinel file never appears",
    )
    sentinel = tmp_path_factory.mktemp("pickle") / "ran"
    outcomes: Counter[str] = Counter()

    def check(data: bytes, what: str) -> None:
        try:
            class_ids, planes = decode_cam(
                data, layout="mctformer", space=SPACE, vector_length=VECTOR, max_bytes=1 << 20
            )
        except RowRejected as exc:
            assert exc.reason and "\n" not in exc.reason
            outcomes[f"{what}: rejected"] += 1
        else:
            assert isinstance(planes, np.ndarray) and planes.dtype == np.float32
            assert planes.ndim == 3 and planes.shape[0] == len(class_ids)
            assert np.isfinite(planes).all() and planes.min() >= 0 and planes.max() <= 1
            assert all(isinstance(c, int) and 1 <= c < SPACE.num_classes for c in class_ids)
            outcomes[f"{what}: decoded"] += 1
        assert not Path(sentinel).exists(), f"{what}: an exploit ran"

    settings_ = settings(
        max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )

    @settings_
    @given(junk=st.binary(max_size=600))
    def random_bytes(junk: bytes) -> None:
        check(junk, "random bytes")
        check(npy_object_file(junk), "random bytes behind an .npy header")

    @settings_
    @given(stream=opcode_streams)
    def random_opcodes(stream: bytes) -> None:
        check(npy_object_file(stream), "random opcode streams")

    @settings_
    @given(cams=valid_cams, protocol=st.integers(2, 5))
    def valid(cams: dict[int, np.ndarray], protocol: int) -> None:
        check(_container(cams, protocol), "valid CAM dicts")

    @settings_
    @given(
        value=safe_values,
        attack=st.integers(0, 7),
        where=st.sampled_from(["top", "dict value", "list", "dict key", "cam plane"]),
        protocol=st.integers(0, 5),
        edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    )
    def exploits(
        value: Any, attack: int, where: str, protocol: int, edits: list[tuple[int, int]]
    ) -> None:
        exploit = attacks(Path(sentinel))[attack]
        poisoned: Any = {
            "top": exploit,
            "dict value": {0: value, 1: exploit},
            "list": [value, exploit],
            "dict key": {(1, exploit): value},
            "cam plane": {0: np.zeros((3, 4), np.float32), 2: exploit},
        }[where]
        data = bytearray(_container(poisoned, protocol))
        for position, byte in edits:
            data[position % len(data)] = byte
        check(bytes(data), "exploit pickles" + (" (mutated)" if edits else ""))

    for prop in (random_bytes, random_opcodes, valid, exploits):
        prop()
    assert outcomes["valid CAM dicts: decoded"] > 0
    assert outcomes["exploit pickles: decoded"] == 0  # unmutated exploits are always refused
    reliability.observe(f"{sum(outcomes.values())} payloads tried, none ran code")
    for key, count in sorted(outcomes.items()):
        reliability.observe(f"{key}: {count}")
