"""Retrain inputs without Ray: the join, mask quarantine, augmentation, config and waiting."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.io import manifest as mf
from pipelines.io.codecs import encode_label_png
from pipelines.io.storage import resolve, write_bytes_atomic
from pipelines.retrain import RetrainConfig, RetrainOptions, data
from pipelines.retrain.stage import micro_batching, plan, read_inputs
from pipelines.training.data import epoch_units
from tests.pipelines.retrain.inputs import make_inputs


def _source(height: int = 4, width: int = 5, split: str | None = "train", gt: bool = True):
    return data.SourceRow(height, width, split, gt, "shards/a.parquet", 0)


def test_plan_rows_join_rules() -> None:
    source = {
        "a": _source(),
        "b": _source(),
        "c": _source(height=9),
        "v1": _source(split="val"),
        "v2": _source(split="val"),
        "v3": _source(split="val", gt=False),
        "t": _source(split=None),
    }
    index = [
        data.IndexRow("a", "masks/a.png", 4, 5),
        data.IndexRow("a", "masks/a.png", 4, 5),  # repeated id
        data.IndexRow("b", "../b.png", 4, 5),  # unsafe path
        data.IndexRow("c", "masks/c.png", 4, 5),  # size differs from the image
        data.IndexRow("x", "masks/x.png", 4, 5),  # not in the source
        data.IndexRow("v1", "masks/v1.png", 4, 5),  # a val image with a pseudo mask
        data.IndexRow("t", "masks/unlisted.png", 4, 5),
    ]
    listed = {"masks/a.png", "masks/b.png", "masks/c.png", "masks/x.png", "masks/v1.png"}
    rows = data.plan_rows(index, source, listed=listed, mask_problems={"v1": "mask missing: x"})
    assert rows.train == {"a": "masks/a.png"}
    reasons = {(i, r.split(":")[0].split(" ")[0]) for i, _, r in rows.quarantined}
    assert reasons == {
        ("a", "image"),
        ("b", "unsafe"),
        ("c", "index"),
        ("x", "image"),
        ("v1", "mask"),
        ("t", "mask"),
    }
    # v1 is in the index (even though its mask is bad): it is never scored; v3 has no GT.
    assert rows.val == {"v2": ("shards/a.parquet", 0)}
    assert rows.index_rows == len(index)


def test_plan_quarantines_bad_masks_in_storage(tmp_path) -> None:
    inputs = make_inputs(str(tmp_path), train=5, val=2, indexed_val=1, height=40, width=48)
    masks = resolve(str(tmp_path / "pseudo_masks"))
    ids = inputs.train_ids
    os.remove(masks.join(f"masks/{ids[0]}.png"))  # listed in the manifest, gone from storage
    with open(masks.join(f"masks/{ids[1]}.png"), "wb") as handle:
        handle.write(b"\x89PNG not really")
    small, bad_ids = np.zeros((8, 8), np.uint8), np.full((40, 48), 9, np.uint8)
    write_bytes_atomic(masks, f"masks/{ids[2]}.png", encode_label_png(small))
    write_bytes_atomic(masks, f"masks/{ids[3]}.png", encode_label_png(bad_ids))
    pseudo, source = read_inputs(masks.uri, storage=None, wait_timeout_s=0)
    messages: list[str] = []
    output = resolve(str(tmp_path / "out"))
    rows, entry = plan(pseudo, source, output, messages.append)
    assert sorted(rows.train) == sorted(ids[4:])
    assert list(rows.val) == inputs.val_ids
    assert entry is not None and entry.rows == 4
    table = pq.read_table(output.join(entry.path)).to_pylist()
    by_id = {row["image_id"]: row["reason"] for row in table}
    assert by_id[ids[0]].startswith("mask missing")
    assert "undecodable" in by_id[ids[1]]
    assert "8x8" in by_id[ids[2]] and "40x48" in by_id[ids[2]]
    assert "[9]" in by_id[ids[3]]
    assert "4 quarantined" in messages[0]


def test_augment_units_read_their_row_group_and_are_deterministic(tmp_path) -> None:
    inputs = make_inputs(str(tmp_path), train=3, val=1, height=40, width=48)
    train = {i: f"masks/{i}.png" for i in inputs.train_ids[:2]}
    groups = [("shards/part-00000.parquet", 0)]
    config = RetrainConfig(seed=1, batch_size=4, iterations=1)
    units = epoch_units(groups, rows=4, start_iteration=0, train=config)
    assert [u["epoch"] for u in units] == [0, 1]
    kwargs = dict(
        source=inputs.source.location,
        masks=inputs.pseudo.location,
        train=train,
        augment=RetrainConfig(crop_size=32).augment(),
        seed=1,
        rows_per_block=8,
    )

    def run(unit: dict, **overrides) -> list[dict[str, np.ndarray]]:
        batch = {k: np.asarray([v], dtype=object) for k, v in unit.items()}
        return list(data.augment_units(batch, **{**kwargs, **overrides}))

    (a,), (b,), (c,) = run(units[0]), run(units[0]), run(units[1])
    assert a["image"].shape == (2, 3, 32, 32) and a["mask"].shape == (2, 32, 32)
    assert a["mask"].dtype == np.uint8 and set(np.unique(a["mask"])) <= {*range(7), 255}
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])  # another epoch, other draws
    assert [len(x["image"]) for x in run(units[0], rows_per_block=1)] == [1, 1]


def test_config_and_batch_validation() -> None:
    with pytest.raises(ValueError, match="architecture"):
        RetrainConfig(architecture="vgg")
    with pytest.raises(ValueError, match="ratio_range"):
        RetrainConfig(ratio_range=(2.0, 1.0))
    assert RetrainConfig(iterations=50, warmup_iterations=100).effective_warmup_iterations == 5
    assert micro_batching(RetrainConfig(batch_size=8), RetrainOptions(num_workers=2)) == (4, 1)
    assert micro_batching(
        RetrainConfig(batch_size=8), RetrainOptions(num_workers=2, micro_batch_size=2)
    ) == (2, 2)
    with pytest.raises(ValueError, match="multiple of num_workers"):
        micro_batching(RetrainConfig(batch_size=3), RetrainOptions(num_workers=2))
    with pytest.raises(ValueError, match="at least 2 images"):
        micro_batching(RetrainConfig(batch_size=2), RetrainOptions(num_workers=2))


def test_read_inputs_waits_then_refuses_what_it_cannot_use(tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no _SUCCESS after 0.5 s"):
        read_inputs(str(tmp_path / "not-yet"), storage=None, wait_timeout_s=0.5)
    assert 0.4 < time.monotonic() - started < 5
    inputs = make_inputs(str(tmp_path / "in"), train=2, val=1, height=32, width=40)
    with pytest.raises(ValueError, match="must be a pseudo_masks output"):
        read_inputs(inputs.source.location.uri, storage=None, wait_timeout_s=0)
    # The images' output was redone after the pseudo masks were made: refused.
    source = inputs.source.location
    out = mf.StageOutput.open(source, stage="ingest", config={"n": 1}, inputs=[], overwrite=True)
    counts = {"input": 0, "output": 0, "quarantined": 0}
    out.commit(files=[], counts=counts, class_names=["bg", "a"], class_space="custom")
    with pytest.raises(ValueError, match="changed since the pseudo masks were made"):
        read_inputs(inputs.pseudo.location.uri, storage=None, wait_timeout_s=0)


def test_a_storage_error_on_a_mask_fails_instead_of_quarantining(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.io import storage

    loc = resolve(str(tmp_path))
    write_bytes_atomic(loc, "masks/a.png", encode_label_png(np.zeros((4, 5), np.uint8)))
    rows = [data.IndexRow("a", "masks/a.png", 4, 5), data.IndexRow("b", "masks/b.png", 4, 5)]
    assert data.check_masks(loc, rows, num_classes=3) == {
        "a": None,
        "b": "mask missing: masks/b.png",
    }
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    def store_down(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(
        loc.fs,
        "cat",
        lambda paths, on_error="raise": dict.fromkeys(paths, ConnectionError("reset")),
    )
    monkeypatch.setattr(loc.fs, "cat_file", store_down)
    with pytest.raises(ConnectionError):  # retried, then the stage fails: never a smaller set
        data.check_masks(loc, rows, num_classes=3)
