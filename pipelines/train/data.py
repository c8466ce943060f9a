"""Training data: the refine shards of the input manifest, augmented on CPUs in Ray Data tasks.

The design is `pipelines.training.data` (one task per (epoch, row group) unit). Rows are those
of the `train` split when any row has a split of "train", else every row; each is decoded,
checked and augmented (`prepare_row`, whose outputs `TRAIN_COLUMNS` batches stack, B x ...).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipelines.io import schema
from pipelines.io.codecs import MAX_PIXELS, decode_label_map, decode_rgb
from pipelines.io.manifest import Manifest
from pipelines.io.storage import Location
from pipelines.training import data as shared
from pipelines.training.augment import AugmentConfig, augment_sample, denormalize, row_seed

TRAIN_COLUMNS = ("image", "seed", "crf_image", "class_mask")
TRAIN_SPLIT = "train"
ROWS_PER_BLOCK = 8  # rows per prepared block
READ_COLUMNS = (*shared.IMAGE_COLUMNS, schema.LABELS, schema.SEED, schema.SPLIT)


def prepare_row(
    *,
    image_id: str,
    image_bytes: bytes,
    seed_bytes: bytes,
    labels: Sequence[int],
    height: int,
    width: int,
    num_classes: int,
    rng: np.random.Generator,
    augment: AugmentConfig,
    loss_resolution: int,
    crf_resize: str = "bilinear",
) -> dict[str, np.ndarray]:
    """Decodes, validates and augments one refine row (pure numpy; no Ray): `image` 3 x S x S
    float32 normalised crop (S = `clip.input_size`), `seed` S x S uint8 seed labels (255 =
    ignore), `crf_image` s x s x 3 uint8 RGB at the loss resolution s for the CRF, `class_mask`
    K bool (background and the image's labels). `crf_resize` is `loss.boundary_image_resize`.

    Raises:
        ValueError: undecodable bytes, sizes that disagree with the row, class ids outside
            the class space, or seed labels that are not background, a label, or 255.
    """
    if not 0 < height * width <= MAX_PIXELS:
        raise ValueError(f"{image_id}: bad size {height} x {width}")
    class_ids = np.asarray(list(labels), dtype=np.int64)
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() >= num_classes):
        raise ValueError(f"{image_id}: labels {class_ids.tolist()} outside 1..{num_classes - 1}")
    rgb = decode_rgb(image_bytes, height, width)
    seed = decode_label_map(seed_bytes, "seed", (height, width))
    allowed = np.zeros(256, dtype=bool)
    allowed[0] = allowed[schema.IGNORE_INDEX] = True
    allowed[class_ids] = True
    if not allowed[seed].all():
        bad = sorted(set(np.unique(seed).tolist()) - set(np.flatnonzero(allowed).tolist()))
        raise ValueError(f"{image_id}: seed holds class ids {bad} absent from its labels")
    image, crop_seed = augment_sample(rgb, seed, rng=rng, config=augment)
    # The CRF sees the augmented crop as the network does (photometric changes included).
    rgb_crop = denormalize(image, mean=augment.mean, std=augment.std)  # S x S x 3 uint8
    if crf_resize == "nearest":  # the released point-sampled zoom: truncated coordinates
        picks = np.arange(loss_resolution) * rgb_crop.shape[0] // loss_resolution
        crf_image = np.ascontiguousarray(rgb_crop[picks][:, picks])
    else:
        side = (loss_resolution, loss_resolution)
        crf_image = np.asarray(Image.fromarray(rgb_crop).resize(side, Image.Resampling.BILINEAR))
    class_mask = np.zeros(num_classes, dtype=bool)
    class_mask[0] = True
    class_mask[class_ids] = True
    return {"image": image, "seed": crop_seed, "crf_image": crf_image, "class_mask": class_mask}


def augment_config_for(model_config: Any) -> AugmentConfig:
    """The augmentation settings a model config asks for (crop = `clip.input_size`)."""
    clip = model_config.clip
    return AugmentConfig.of(
        model_config.train,
        crop_size=clip.input_size,
        short_side=clip.input_size,
        mean=tuple(clip.pixel_mean),
        std=tuple(clip.pixel_std),
    )


def augment_units(
    batch: dict[str, np.ndarray],
    *,
    source: Location,
    model_config: Any,
    num_classes: int,
    train_only: bool,
    rows_per_block: int,
) -> Any:
    """Ray Data batch function: work units in, `TRAIN_COLUMNS` blocks of prepared rows out."""
    augment, seed = augment_config_for(model_config), model_config.train.seed
    for epoch, rows in shared.unit_blocks(
        batch,
        source=source,
        columns=READ_COLUMNS,
        keep=lambda row: not train_only or row[schema.SPLIT] == TRAIN_SPLIT,
        seed=seed,
        rows_per_block=rows_per_block,
    ):
        prepared = [
            prepare_row(
                image_id=str(row[schema.IMAGE_ID]),
                image_bytes=row[schema.IMAGE],
                seed_bytes=row[schema.SEED],
                labels=row[schema.LABELS],
                height=int(row[schema.HEIGHT]),
                width=int(row[schema.WIDTH]),
                num_classes=num_classes,
                rng=np.random.default_rng(row_seed(seed, epoch, str(row[schema.IMAGE_ID]))),
                augment=augment,
                loss_resolution=model_config.loss.resolution,
                crf_resize=model_config.loss.boundary_image_resize,
            )
            for row in rows
        ]
        yield shared.stack(prepared, TRAIN_COLUMNS)


def train_dataset(
    source: Manifest, model_config: Any, start_iteration: int, *, num_cpus_per_task: float
) -> tuple[int, Any]:
    """(training rows, the Ray Dataset of the epochs still to run from `start_iteration`).

    Raises:
        ValueError: the refine manifest lists no shards, or no training rows.
    """
    counts: dict[tuple[str, int], tuple[int, int]] = {}  # (shard, group) -> rows, train rows
    for path, group, table in shared.read_row_groups(source, [schema.SPLIT]):
        splits = table[schema.SPLIT].to_pylist()
        counts[(path, group)] = (len(splits), splits.count(TRAIN_SPLIT))
    train_only = any(train for _, train in counts.values())
    per_group = {key: n[1] if train_only else n[0] for key, n in counts.items()}
    rows = sum(per_group.values())
    groups = [key for key, n in per_group.items() if n]
    train = model_config.train
    units = shared.epoch_units(groups, rows=rows, start_iteration=start_iteration, train=train)
    fn = functools.partial(
        augment_units,
        source=source.location,
        model_config=model_config,
        num_classes=len(source.class_names),
        train_only=train_only,
        rows_per_block=ROWS_PER_BLOCK,
    )
    return rows, shared.unit_dataset(units, fn, num_cpus_per_task=num_cpus_per_task)
