"""Training data: the refine shards of the input manifest through Ray Data, augmented on CPUs.

Reads the refine columns `image_id`, `image`, `labels`, `seed` and `split` (plus `height` and
`width` for validation) of the files the input manifest lists, and only those: rows of the
`train` split when any row has a split of "train", else every row. Decoding and augmentation
(`pipelines.training.augment.augment_sample`) run in Ray Data `map_batches` tasks on CPU
workers, never in the training loop. Every row's randomness comes from (seed, epoch, image id), so a
sample does not depend on which worker, task or batch handles it.

Batches handed to the training loop (`TRAIN_COLUMNS`):
- `image`: B x 3 x S x S float32 normalised crops (S = `clip.input_size`);
- `seed`: B x S x S uint8 seed labels, 255 = ignore (padding included);
- `crf_image`: B x s x s x 3 uint8 RGB of the crop at the loss resolution s, for the CRF;
- `class_mask`: B x K bool, background and the image's labels.

Epochs: the dataset is the concatenation of the epochs the run still needs, each with its own
augmentation draws and block order, so a worker's stream never ends early; `epochs_needed`
(`pipelines.training.run`) says how many.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipelines.io import schema
from pipelines.io.codecs import MAX_PIXELS, decode_image, decode_label_map
from pipelines.io.manifest import Manifest
from pipelines.io.storage import Location
from pipelines.training.augment import AugmentConfig, augment_sample, denormalize, row_seed
from pipelines.training.run import epochs_needed

TRAIN_COLUMNS = ("image", "seed", "crf_image", "class_mask")
TRAIN_SPLIT = "train"
READ_COLUMNS = [
    schema.IMAGE_ID,
    schema.IMAGE,
    schema.HEIGHT,
    schema.WIDTH,
    schema.LABELS,
    schema.SEED,
    schema.SPLIT,
]


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
) -> dict[str, np.ndarray]:
    """Decodes, validates and augments one refine row (pure numpy; no Ray).

    Returns:
        `image` 3 x S x S float32, `seed` S x S uint8, `crf_image` s x s x 3 uint8,
        `class_mask` K bool.

    Raises:
        ValueError: undecodable bytes, sizes that disagree with the row, class ids outside
            the class space, or seed labels that are not background, a label, or 255.
    """
    if not 0 < height * width <= MAX_PIXELS:
        raise ValueError(f"{image_id}: bad size {height} x {width}")
    class_ids = np.asarray(list(labels), dtype=np.int64)
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() >= num_classes):
        raise ValueError(f"{image_id}: labels {class_ids.tolist()} outside 1..{num_classes - 1}")
    rgb = decode_image(image_bytes, height, width)
    seed = decode_label_map(seed_bytes, height, width)
    allowed = np.zeros(256, dtype=bool)
    allowed[0] = allowed[schema.IGNORE_INDEX] = True
    allowed[class_ids] = True
    if not allowed[seed].all():
        bad = sorted(set(np.unique(seed).tolist()) - set(np.flatnonzero(allowed).tolist()))
        raise ValueError(f"{image_id}: seed holds class ids {bad} absent from its labels")
    image, crop_seed = augment_sample(rgb, seed, rng=rng, config=augment)
    # The CRF sees the augmented crop as the network does (photometric changes included).
    crf_image = np.asarray(
        Image.fromarray(denormalize(image, mean=augment.mean, std=augment.std)).resize(
            (loss_resolution, loss_resolution), resample=Image.Resampling.BILINEAR
        )
    )
    class_mask = np.zeros(num_classes, dtype=bool)
    class_mask[0] = True
    class_mask[class_ids] = True
    return {"image": image, "seed": crop_seed, "crf_image": crf_image, "class_mask": class_mask}


def augment_batch(
    batch: dict[str, np.ndarray],
    *,
    epoch: int,
    seed: int,
    num_classes: int,
    augment: AugmentConfig,
    loss_resolution: int,
    train_only: bool,
) -> dict[str, np.ndarray]:
    """Ray Data batch wrapper of `prepare_row`: refine columns in, `TRAIN_COLUMNS` out."""
    rows: list[dict[str, np.ndarray]] = []
    for i in range(len(batch[schema.IMAGE_ID])):
        if train_only and batch[schema.SPLIT][i] != TRAIN_SPLIT:
            continue
        image_id = str(batch[schema.IMAGE_ID][i])
        rng = np.random.default_rng(row_seed(seed, epoch, image_id))
        rows.append(
            prepare_row(
                image_id=image_id,
                image_bytes=batch[schema.IMAGE][i],
                seed_bytes=batch[schema.SEED][i],
                labels=batch[schema.LABELS][i],
                height=int(batch[schema.HEIGHT][i]),
                width=int(batch[schema.WIDTH][i]),
                num_classes=num_classes,
                rng=rng,
                augment=augment,
                loss_resolution=loss_resolution,
            )
        )
    size = augment.crop_size
    if not rows:
        return {
            "image": np.zeros((0, 3, size, size), np.float32),
            "seed": np.zeros((0, size, size), np.uint8),
            "crf_image": np.zeros((0, loss_resolution, loss_resolution, 3), np.uint8),
            "class_mask": np.zeros((0, num_classes), bool),
        }
    return {key: np.stack([row[key] for row in rows]) for key in TRAIN_COLUMNS}


def count_training_rows(files: Sequence[Location]) -> tuple[int, bool]:
    """(rows used for training, whether the split column selects them) from Parquet footers.

    Reads only the `split` column, so it is cheap next to the images.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = train = 0
    for loc in files:
        with loc.fs.open(loc.path, "rb") as handle:
            table = pq.read_table(handle, columns=[schema.SPLIT])
        total += table.num_rows
        train += int(pc.sum(pc.equal(table[schema.SPLIT], TRAIN_SPLIT)).as_py() or 0)
    if train > 0:
        return train, True
    return total, False


def augment_config_for(model_config: Any) -> AugmentConfig:
    """The augmentation settings a model config asks for (crop = `clip.input_size`)."""
    train = model_config.train
    return AugmentConfig(
        crop_size=model_config.clip.input_size,
        resize_scale=(4 * model_config.clip.input_size, model_config.clip.input_size),
        ratio_range=tuple(train.ratio_range),  # type: ignore[arg-type]
        cat_max_ratio=train.cat_max_ratio,
        flip_prob=train.flip_prob,
        photometric=train.photometric,
        mean=tuple(model_config.clip.pixel_mean),  # type: ignore[arg-type]
        std=tuple(model_config.clip.pixel_std),  # type: ignore[arg-type]
    )


def build_train_dataset(
    files: Sequence[Location],
    *,
    model_config: Any,
    num_classes: int,
    train_only: bool,
    start_epoch: int,
    epochs: int,
    num_cpus_per_task: float,
    rows_per_task: int = 8,
) -> Any:
    """The Ray Dataset of augmented training rows for `epochs` epochs from `start_epoch`.

    Args:
        files: the Parquet shards the input manifest lists.
        model_config: `WeakCLIPConfig` (crop size, loss resolution, augmentation, seed).
        num_classes: K, the class space size of the input manifest.
        train_only: keep only rows of the `train` split.
        start_epoch: first epoch (a resumed run continues the epoch count).
        epochs: how many epochs to chain.
        num_cpus_per_task: CPUs of each read/augment task (fractional on small machines).
        rows_per_task: rows per `map_batches` call.
    """
    import ray.data

    if not files:
        raise ValueError("the input manifest lists no shards")
    filesystem = files[0].pyarrow_fs()
    base = ray.data.read_parquet(
        [f.path for f in files],
        filesystem=filesystem,
        columns=READ_COLUMNS,
        num_cpus=num_cpus_per_task,
    )
    augment = augment_config_for(model_config)
    seed = model_config.train.seed
    parts = []
    for epoch in range(start_epoch, start_epoch + epochs):
        fn = functools.partial(
            augment_batch,
            epoch=epoch,
            seed=seed,
            num_classes=num_classes,
            augment=augment,
            loss_resolution=model_config.loss.resolution,
            train_only=train_only,
        )
        parts.append(
            base.randomize_block_order(seed=seed + epoch).map_batches(
                fn, batch_size=rows_per_task, batch_format="numpy", num_cpus=num_cpus_per_task
            )
        )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def train_dataset(
    source: Manifest, model_config: Any, num_cpus_per_task: float, start_iteration: int
) -> tuple[int, Any]:
    """(training rows, the Ray Data pipeline of the epochs still to run from `start_iteration`).

    Raises:
        ValueError: the refine manifest lists no shards, or no training rows.
    """
    files = [source.location.child(entry.path) for entry in source.entries("shards/")]
    if not files:
        raise ValueError(f"{source.location.uri}: the manifest lists no shards/")
    rows, train_only = count_training_rows(files)
    iterations, batch_size = model_config.train.iterations, model_config.train.batch_size
    epochs = epochs_needed(
        rows=rows, batch_size=batch_size, start_iteration=start_iteration, iterations=iterations
    )
    dataset = build_train_dataset(
        files,
        model_config=model_config,
        num_classes=len(source.class_names),
        train_only=train_only,
        start_epoch=(start_iteration * batch_size) // rows,
        epochs=epochs,
        num_cpus_per_task=num_cpus_per_task,
    )
    return rows, dataset
