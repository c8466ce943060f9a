"""The driver's listing of ingest inputs."""

from __future__ import annotations

import sys

import numpy as np

from pipelines.ingest.listing import pack_label, unpack_label


def test_a_packed_label_vector_comes_back_exactly_and_small() -> None:
    vector = np.zeros(80, dtype=np.float32)
    vector[[0, 17, 79]] = 1
    vector[5] = 0.5  # not a valid label, but carried as is: the task refuses it
    packed = pack_label(vector)
    assert isinstance(packed, str) and unpack_label(None) is None
    np.testing.assert_array_equal(unpack_label(packed), vector)
    as_floats = sys.getsizeof([0.0] * 80) + 80 * sys.getsizeof(0.5)
    assert sys.getsizeof(packed) < as_floats / 4
