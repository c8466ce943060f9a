"""Worst, best and sampled images kept while scoring, bounded and merge-order independent."""

from __future__ import annotations

import math
import random

from pipelines.evaluate.ranking import RankedImages, sample_key


def _entry(i: int, miou: float) -> list:
    return [miou, f"img{i:03d}", "train", f"shards/p{i // 10}.parquet", 0, i % 10, f"m/{i}.png", -1]


def test_lists_are_bounded_and_independent_of_the_order_of_scoring() -> None:
    entries = [_entry(i, (i * 37 % 100) / 100) for i in range(100)]
    entries.append(_entry(100, math.nan))  # nothing to score: in the sample only
    one = RankedImages(count=5)
    for e in entries:
        one.add(e)
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    parts = [RankedImages(count=5) for _ in range(3)]
    for index, e in enumerate(shuffled):
        parts[index % 3].add(e)
    merged = RankedImages(count=5)
    for part in parts:
        merged.add_record(part.record())
    assert merged.record() == one.record()
    worst = [e[0] for e in one.lists["worst"]]
    best = [e[0] for e in one.lists["best"]]
    assert worst == [0.0, 0.01, 0.02, 0.03, 0.04] and best == [0.99, 0.98, 0.97, 0.96, 0.95]
    expected = sorted((e[1] for e in entries), key=sample_key)[:5]
    assert [e[1] for e in one.lists["sample"]] == expected


def test_metrics_name_where_each_image_lies() -> None:
    ranked = RankedImages(count=2)
    ranked.add(_entry(7, math.nan))
    ranked.add(_entry(3, 0.5))
    metrics = ranked.metrics()
    assert metrics["worst"] == [
        {
            "image_id": "img003",
            "split": "train",
            "miou": 0.5,
            "gt": {"path": "shards/p0.parquet", "row_group": 0, "row": 3},
            "prediction": {"path": "m/3.png", "row_group": -1},
        }
    ]
    assert {e["image_id"] for e in metrics["sample"]} == {"img003", "img007"}
    assert any(e["miou"] is None for e in metrics["sample"])
