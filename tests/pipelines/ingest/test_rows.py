"""Row validation of the ingest stage on hand-made inputs (no Ray, no storage)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest.rows import (
    RowLimits,
    build_row,
)
from pipelines.io import schema
from pipelines.io.class_spaces import VOC, class_space_from_arg
from pipelines.io.codecs import decode_cam_column
from pipelines.io.rows import RowRejected, check_image_id

H, W = 24, 32


def _jpeg(h: int = H, w: int = W) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _npy(obj: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)  # writing side: how MCTformer stores CAMs
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _label(*fg_indices: int, length: int = 20) -> list[float]:
    vec = [0.0] * length
    for i in fg_indices:
        vec[i] = 1.0
    return vec


def _row(**overrides: object) -> dict:
    cam = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    args: dict = dict(
        image_id="2007_000032",
        image=_jpeg(),
        cam=_npy({0: cam, 14: 1 - cam}),
        label_vector=_label(0, 14),
        gt=None,
        source="cams/2007_000032.npy",
        split="train",
        layout="mctformer",
        space=VOC,
        limits=RowLimits(),
    )
    args.update(overrides)
    return build_row(**args)


def test_good_row_has_contract_columns_and_round_trips_cam() -> None:
    row = _row(gt=_png(np.where(np.arange(H * W).reshape(H, W) % 7 == 0, 255, 15)))
    assert set(row) == set(schema.INGEST_COLUMNS)
    assert row[schema.LABELS] == [1, 15]  # VOC: cls_labels index + 1
    assert row[schema.CAM_CLASSES] == [1, 15]
    assert (row[schema.HEIGHT], row[schema.WIDTH]) == (H, W)
    cams = decode_cam_column(row[schema.CAM], 2, H, W)
    assert cams.shape == (2, H, W)
    assert np.allclose(cams[0], np.linspace(0, 1, H * W).reshape(H, W), atol=1e-3)


def test_clip_es_layout() -> None:
    cams = np.random.default_rng(0).random((2, H, W)).astype(np.float16)
    row = _row(cam=_npy({"keys": np.array([14, 0]), "attn_highres": cams}), layout="clip-es")
    assert row[schema.CAM_CLASSES] == [1, 15]
    decoded = decode_cam_column(row[schema.CAM], 2, H, W)
    assert np.allclose(decoded[0], cams[1], atol=1e-3)  # sorted by class id


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"image_id": "../../etc/passwd"}, "unsafe image id"),
        ({"image": None}, "missing image"),
        ({"image": b"not an image"}, "cannot decode image"),
        ({"image": _jpeg()[:200]}, "cannot decode image"),
        ({"cam": None}, "missing CAM"),
        ({"cam": b"\x93NUMPY garbage"}, "undecodable CAM"),
        ({"cam": _npy({0: np.full((H, W), np.nan, np.float32)})}, "NaN"),
        ({"cam": _npy({0: np.zeros((H + 1, W), np.float32)}), "label_vector": _label(0)}, "shape"),
        (
            {"cam": _npy({0: np.zeros((H, W)), 3: np.zeros((H, W))})},
            "CAM class not in the image's labels",
        ),
        ({"cam": _npy({0: np.zeros((H, W))})}, "without a CAM plane"),
        ({"label_vector": _label()}, "empty label vector"),
        ({"label_vector": _label(0, length=80)}, "bad label vector"),
        ({"label_vector": None}, "no image-level label"),
        ({"gt": _png(np.full((H, W), 40))}, "outside the class space"),
        ({"gt": _png(np.zeros((H, W + 1)))}, "size mismatch: ground truth"),
    ],
)
def test_bad_rows_are_rejected_with_reason(overrides: dict, reason: str) -> None:
    with pytest.raises(RowRejected) as info:
        _row(**overrides)
    assert reason in info.value.reason


def test_malicious_pickle_is_refused_without_running(tmp_path) -> None:
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    payload = _npy(np.array({0: Evil()}, dtype=object))
    with pytest.raises(RowRejected) as info:
        _row(cam=payload)
    assert "unsafe pickle" in info.value.reason
    assert not sentinel.exists()
    # a raw pickle that is not even a .npy file is refused too
    with pytest.raises(RowRejected):
        _row(cam=pickle.dumps(Evil()))
    assert not sentinel.exists()


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = _jpeg(200, 300)
    with pytest.raises(RowRejected) as info:
        _row(image=big, limits=RowLimits(max_pixels=200 * 300 - 1))
    assert "pixel limit" in info.value.reason


def test_image_id_alphabet() -> None:
    assert check_image_id("COCO_train2014_000000000009") == "COCO_train2014_000000000009"
    for bad in ["", "a/b", "..", "a..b", "/abs", "x\x00y", "-lead"]:
        with pytest.raises(RowRejected):
            check_image_id(bad)


def test_coco_index_space() -> None:
    space = class_space_from_arg("coco91")
    cam = np.zeros((H, W), np.float32)
    row = _row(cam=_npy({0: cam, 17: cam}), label_vector=_label(0, 17, length=90), space=space)
    assert row[schema.LABELS] == [1, 18]  # 90-d COCO category-id vector: index i -> id i + 1


def test_decode_cam_column_checks_size() -> None:
    with pytest.raises(ValueError):
        decode_cam_column(b"\x00" * 10, 1, 2, 3)
