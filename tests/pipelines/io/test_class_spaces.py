"""Class spaces: names, the explicit COCO 91 <-> 81 mapping, multi-hot decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipelines.io.class_spaces import (
    COCO81,
    COCO81_TO_COCO91,
    COCO91,
    COCO91_TO_COCO81,
    COCO_UNUSED_IDS,
    VOC,
    ClassSpace,
    class_space_from_arg,
    coco81_to_coco91,
    coco91_to_coco81,
    labels_from_multihot,
)


def test_voc_names() -> None:
    assert VOC.num_classes == 21
    assert VOC.class_names[0] == "background"
    assert VOC.class_names[1] == "aeroplane" and VOC.class_names[15] == "person"
    assert VOC.class_names[11] == "diningtable" and VOC.class_names[20] == "tvmonitor"
    assert VOC.foreground_ids == tuple(range(1, 21))


def test_coco_spaces() -> None:
    assert COCO91.num_classes == 91 and COCO81.num_classes == 81
    assert COCO91.class_names[1] == "person" and COCO91.class_names[90] == "toothbrush"
    assert COCO91.class_names[13] == "stop sign" and COCO91.class_names[12] == "unused_12"
    assert all(COCO91.class_names[i] == f"unused_{i}" for i in COCO_UNUSED_IDS)
    assert len(COCO91.foreground_ids) == 80 and not set(COCO91.foreground_ids) & set(
        COCO_UNUSED_IDS
    )
    assert COCO81.class_names[1:] == tuple(COCO91.class_names[i] for i in COCO91.foreground_ids)
    assert COCO81.class_names[80] == "toothbrush" and COCO81.class_names[12] == "stop sign"


def test_mapping_tables_are_inverse_on_used_ids() -> None:
    for id81 in range(81):
        assert COCO91_TO_COCO81[COCO81_TO_COCO91[id81]] == id81
    assert all(COCO91_TO_COCO81[i] == 255 for i in COCO_UNUSED_IDS)
    assert COCO91_TO_COCO81[90] == 80 and COCO91_TO_COCO81[13] == 12
    for id91 in COCO91.foreground_ids:
        assert COCO81.class_names[COCO91_TO_COCO81[id91]] == COCO91.class_names[id91]
    with pytest.raises(ValueError):
        COCO91_TO_COCO81[0] = 1  # read-only


def test_label_map_conversion() -> None:
    labels = np.array([[0, 1, 90], [13, 255, 44]], np.uint8)
    to81 = coco91_to_coco81(labels)
    np.testing.assert_array_equal(to81, [[0, 1, 80], [12, 255, 40]])  # 44 bottle -> 40
    np.testing.assert_array_equal(coco81_to_coco91(to81), labels)
    with pytest.raises(ValueError, match=r"unused COCO category ids \[12\]"):
        coco91_to_coco81(np.array([1, 12]))
    with pytest.raises(ValueError, match="outside the coco91"):
        coco91_to_coco81(np.array([91]))
    with pytest.raises(ValueError, match="outside the coco81"):
        coco81_to_coco91(np.array([81]))


def test_multihot_voc_and_custom() -> None:
    vector = np.zeros(20, np.float32)
    vector[[0, 14]] = 1
    assert labels_from_multihot(vector, VOC) == [1, 15]
    custom = class_space_from_arg("background\ncat\ndog\n")
    assert labels_from_multihot([0, 1], custom) == [2]
    assert labels_from_multihot(np.zeros(20), VOC) == []


def test_multihot_coco() -> None:
    vector = np.zeros(90, np.float32)
    vector[[0, 12, 89]] = 1  # person, stop sign (id 13), toothbrush (id 90)
    assert labels_from_multihot(vector, COCO91) == [1, 13, 90]
    assert labels_from_multihot(vector, COCO81) == [1, 12, 80]
    contiguous = np.zeros(80, np.float32)
    contiguous[[0, 11, 79]] = 1
    assert labels_from_multihot(contiguous, COCO81) == [1, 12, 80]
    vector[11] = 1  # id 12 never occurs
    with pytest.raises(ValueError, match=r"unused COCO category ids \[12\]"):
        labels_from_multihot(vector, COCO91)
    with pytest.raises(ValueError, match="unused"):
        labels_from_multihot(vector, COCO81)


@pytest.mark.parametrize(
    ("length", "space"), [(21, VOC), (19, VOC), (80, COCO91), (91, COCO91), (81, COCO81)]
)
def test_multihot_wrong_length(length: int, space: ClassSpace) -> None:
    with pytest.raises(ValueError, match="expected length"):
        labels_from_multihot(np.zeros(length), space)


def test_multihot_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        labels_from_multihot(np.full(20, np.nan), VOC)
    with pytest.raises(ValueError, match="expected length"):
        labels_from_multihot(np.zeros((2, 10)), VOC)


def test_class_space_from_arg() -> None:
    assert class_space_from_arg("voc") is VOC
    assert class_space_from_arg(" COCO91 ") is COCO91
    assert class_space_from_arg("coco81") is COCO81
    custom = class_space_from_arg("background\n disc \n\nsquare\n")
    assert custom.name == "custom" and custom.class_names == ("background", "disc", "square")
    assert custom.num_classes == 3 and custom.multihot_lengths == (2,)
    assert class_space_from_arg(["background", "a"]).class_names == ("background", "a")


@pytest.mark.parametrize(
    "arg",
    [
        "coco",  # unknown single word
        "cat\nbackground\n",  # background not first
        "background\ncat\ncat\n",  # duplicate
        "background\n",  # no foreground
        "background\nbad\x00name\n",  # not printable
        "background\n" + "x" * 65 + "\n",  # too long
    ],
)
def test_class_space_from_arg_rejects(arg: str) -> None:
    with pytest.raises(ValueError):
        class_space_from_arg(arg)


def test_class_space_is_frozen_and_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        VOC.name = "coco91"  # type: ignore[misc]
    with pytest.raises(ValueError, match="name"):
        ClassSpace("ade20k", ("background", "wall"))
    with pytest.raises(ValueError, match="at most 255"):
        ClassSpace("custom", ("background",) + tuple(f"c{i}" for i in range(255)))
    assert 13 in COCO91.foreground_ids and 12 not in COCO91.foreground_ids
    assert 0 not in VOC.foreground_ids
