"""`pipelines.parts`: a unit computed as part tasks and written by one finish task."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines import parts as p


def _covers(bounds: list[tuple[int, int]], rows: int) -> bool:
    edges = [b for pair in bounds for b in pair]
    return edges[0] == 0 and edges[-1] == rows and all(a < b for a, b in bounds)


def test_a_unit_is_one_part_while_many_rows_remain() -> None:
    assert p.part_bounds(16, 10_000, 2) == [(0, 16)]
    assert p.part_bounds(16, 64, 2) == [(0, 16)]  # 64 / (2 x 2) = 16 rows a part


def test_parts_shrink_towards_the_end_and_cover_the_unit() -> None:
    tail = p.part_bounds(16, 16, 2)  # the last unit: parts of 16 / 4 = 4 rows
    assert tail == [(0, 4), (4, 8), (8, 12), (12, 16)]
    middle = p.part_bounds(16, 40, 2)  # 40 / 4 = 10 rows: two parts of 8
    assert middle == [(0, 8), (8, 16)]
    for rows, remaining, slots in [(7, 7, 8), (300, 301, 3), (1, 1, 64), (5, 3, 1)]:
        bounds = p.part_bounds(rows, remaining, slots)
        assert _covers(bounds, rows), (rows, remaining, slots, bounds)
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1  # balanced
    assert p.part_bounds(0, 0, 2) == [(0, 0)]  # an empty unit still gets its finish


def _part(unit: dict[str, Any], start: int, stop: int, *, fail: str) -> list[int]:
    if unit["name"] == fail:
        raise ValueError(f"bad unit {unit['name']}")
    return list(range(unit["first"] + start, unit["first"] + stop))


def _kwargs(fail: str) -> dict[str, Any]:
    return {"part_kwargs": {"fail": fail}, "finish_kwargs": {}}


def _finish(unit: dict[str, Any], *parts: list[int]) -> dict[str, Any]:
    return {"unit": unit["name"], "rows": [r for part in parts for r in part], "parts": len(parts)}


def test_every_row_reaches_its_unit_once_in_order(ray_session: None) -> None:
    units = [{"name": f"u{i}", "first": 100 * i, "rows": 9} for i in range(5)]
    records = list(p.run_parts(units, _part, _finish, num_cpus=1, **_kwargs("")))
    assert sorted(r["unit"] for r in records) == [u["name"] for u in units]
    for record in records:
        first = 100 * int(record["unit"][1:])
        assert record["rows"] == list(range(first, first + 9))
    last = {r["unit"]: r["parts"] for r in records}["u4"]
    assert last > 1  # the tail was split (45 rows over the session's slots)


def test_a_failing_part_fails_the_run_with_its_error(ray_session: None) -> None:
    units = [{"name": f"u{i}", "first": 0, "rows": 3} for i in range(3)]
    with pytest.raises(ValueError, match="bad unit u1"):
        list(p.run_parts(units, _part, _finish, num_cpus=1, **_kwargs("u1")))
    assert list(p.run_parts([], _part, _finish, num_cpus=1, **_kwargs(""))) == []


def test_a_part_never_holds_more_than_its_cap() -> None:
    bounds = p.part_bounds(1000, 100_000, 2)  # 100k / 4 would be 25k rows a part
    assert _covers(bounds, 1000) and max(b - a for a, b in bounds) <= p.MAX_PART_ROWS
    assert p.part_bounds(10, 100_000, 2, max_rows=4) == [(0, 3), (3, 7), (7, 10)]


def test_each_part_is_reported_as_it_ends(ray_session: None) -> None:
    units = [{"name": f"u{i}", "first": 100 * i, "rows": 9} for i in range(3)]
    seen: list[int] = []
    records = list(
        p.run_parts(units, _part, _finish, num_cpus=1, on_part=seen.append, **_kwargs(""))
    )
    assert sum(seen) == 27 and len(seen) == sum(r["parts"] for r in records) >= 3
