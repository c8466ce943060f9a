"""Pseudo-mask rows without Ray: validation, inference planes, CRF post-processing, counts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map, voc_palette
from pipelines.io.rows import RowRejected
from pipelines.io.storage import resolve
from pipelines.pseudo_masks.infer import MaskPredictor, allowed_classes, predict_probabilities
from pipelines.pseudo_masks.rows import (
    GT,
    IMAGE,
    META,
    PROBS,
    RowSpec,
    check_labels,
    finish_row,
    postprocess,
    prepare_row,
)
from tests.pipelines.pseudo_masks.inputs import (
    CLASS_NAMES,
    HEIGHT,
    WIDTH,
    ingest_rows,
    make_checkpoint,
    refine_rows_from,
    tiny_config,
)
from weakclip.config import VOC_POST_CRF

K = len(CLASS_NAMES)
SPEC = RowSpec(num_classes=K, input_stage="ingest", splits=("train",))


def test_labels_are_validated_against_the_class_space() -> None:
    assert check_labels([3, 1, 3], K) == [1, 3]
    assert check_labels(None, K) == []
    for bad in ([0], [K], [-1], ["1"], "12", [True]):
        with pytest.raises(RowRejected):
            check_labels(bad, K)


def test_prepare_row_accepts_good_rows_and_rejects_bad_ones() -> None:
    row = ingest_rows(1)[0]
    meta, image, gt = prepare_row(row, SPEC)
    assert meta["image_id"] == row[schema.IMAGE_ID] and meta["labels"] == sorted(row["labels"])
    assert image == row[schema.IMAGE] and gt == row[schema.GT] and meta["baseline"]["cnt"]
    refine = refine_rows_from([row])[0]
    meta, _, _ = prepare_row(refine, RowSpec(num_classes=K, input_stage="refine", splits=None))
    assert sum(meta["baseline"]["cnt"]) > 0
    cases = {
        "unsafe image id": {schema.IMAGE_ID: "../../etc/passwd"},
        "outside [1, 7)": {schema.LABELS: [1, 9]},
        "undecodable image": {schema.IMAGE: b"\x89PNG not really"},
        "the row says": {schema.HEIGHT: HEIGHT + 1},
        "missing image": {schema.IMAGE: None},
        "pixel limit": {schema.HEIGHT: 100_000, schema.WIDTH: 100_000},
        "undecodable ground truth": {schema.GT: b"garbage"},
        "undecodable CAM": {schema.CAM: b"\x00" * 10},
    }
    for reason, change in cases.items():
        with pytest.raises(RowRejected, match=re.escape(reason)):
            prepare_row({**row, **change}, SPEC)
    gt_bad = np.full((HEIGHT, WIDTH), 9, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gt_bad).save(buffer, format="PNG")
    with pytest.raises(RowRejected, match="ground truth holds"):
        prepare_row({**row, schema.GT: buffer.getvalue()}, SPEC)


def test_restricted_probabilities_cover_only_the_allowed_classes() -> None:
    assert allowed_classes([4, 2], K, restrict=True) == [0, 2, 4]
    assert allowed_classes([4], K, restrict=False) == list(range(K))
    image = np.random.default_rng(1).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)

    def model_fn(x: torch.Tensor) -> torch.Tensor:  # class 5 would win everywhere
        logits = torch.zeros(x.shape[0], K, x.shape[2] // 4, x.shape[3] // 4)
        logits[:, 5] = 10.0
        return logits

    probs = predict_probabilities(
        model_fn,
        image,
        [0, 2, 4],
        num_classes=K,
        inference=tiny_config().inference,
        pixel_mean=(0, 0, 0),
        pixel_std=(1, 1, 1),
        device=torch.device("cpu"),
    )
    assert probs.dtype == np.float16 and probs.shape == (3, HEIGHT, WIDTH)
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=2e-3)
    mask = postprocess(image, probs, [0, 2, 4], crf=VOC_POST_CRF)
    assert set(np.unique(mask)) <= {0, 2, 4}
    single = predict_probabilities(
        model_fn,
        image,
        [0],
        num_classes=K,
        inference=tiny_config().inference,
        pixel_mean=(0, 0, 0),
        pixel_std=(1, 1, 1),
        device=torch.device("cpu"),
    )
    assert np.all(postprocess(image, single, [0], crf=VOC_POST_CRF) == 0)


def test_predictor_and_crf_stage_write_a_palette_mask(tmp_path) -> None:
    path = make_checkpoint(str(tmp_path / "model.pt"))
    data = open(path, "rb").read()
    predictor = MaskPredictor(
        checkpoint=data,
        sha256=hashlib.sha256(data).hexdigest(),
        inference=tiny_config().inference,
        use_gpu=False,
        threads=1,
    )
    row = ingest_rows(1)[0]
    meta, image, gt = prepare_row(row, SPEC)
    meta = {**meta, "unit": "u", "row": 0}
    rejected = {"unit": "u", "row": 1, "image_id": "x", "reason": "bad"}
    batch = {
        META: np.asarray([json.dumps(meta), json.dumps(rejected)], dtype=object),
        IMAGE: np.asarray([image, b""], dtype=object),
        GT: np.asarray([gt, b""], dtype=object),
    }
    out = predictor(batch)
    got = json.loads(out[META][0])
    classes = got["prob_classes"]
    assert classes == [0, *sorted(row[schema.LABELS])]
    assert len(out[PROBS][0]) == len(classes) * HEIGHT * WIDTH * 2
    assert json.loads(out[META][1])["reason"] == "bad" and out[PROBS][1] == b""
    output = resolve(str(tmp_path / "out"))
    result = finish_row(
        got, image, gt, out[PROBS][0], output_loc=output, crf=VOC_POST_CRF, num_classes=K
    )
    written = (tmp_path / "out" / "masks" / f"{row[schema.IMAGE_ID]}.png").read_bytes()
    assert result["mask_bytes"] == len(written)
    with Image.open(io.BytesIO(written)) as png:
        assert png.mode == "P" and png.size == (WIDTH, HEIGHT)
        assert png.getpalette()[: 3 * 256] == voc_palette()
    assert set(np.unique(decode_label_map(written))) <= set(classes)
    assert sum(result["pseudo_masks"]["cnt"]) == int((decode_label_map(gt) != 255).sum())
    broken = finish_row(
        got, image, gt, b"\x00" * 7, output_loc=output, crf=VOC_POST_CRF, num_classes=K
    )
    assert "probabilities hold" in broken["reason"]


def test_an_oracle_model_gives_back_its_label_map() -> None:
    """Planes, flips, windows and class ids line up: a per-pixel oracle is reproduced."""
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    labels[5:30, 10:50] = 2
    labels[35:60, 40:75] = 4
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[..., 0] = 40 * labels  # the class is written in the red channel

    def oracle(x: torch.Tensor) -> torch.Tensor:  # B x 3 x h x w -> B x K x h x w
        red = x[:, 0:1]
        return -torch.cat([(red - 40 * c).abs() for c in range(K)], dim=1)

    inference = dataclasses.replace(tiny_config().inference, flip=True)
    probs = predict_probabilities(
        oracle,
        image,
        [0, 2, 4],
        num_classes=K,
        inference=inference,
        pixel_mean=(0, 0, 0),
        pixel_std=(1, 1, 1),
        device=torch.device("cpu"),
    )
    assert np.array_equal(postprocess(image, probs, [0, 2, 4], crf=None), labels)
