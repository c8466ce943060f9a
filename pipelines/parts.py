"""A unit of work split into part tasks: the commit granule is not the task granule.

A unit (`pipelines.units`) commits one shard and one completion record; `run_parts` computes
it as several Ray tasks over row ranges of it (`part(unit, start, stop, **kw)`, `num_cpus`
each) whose results a `finish(unit, *results, **kw)` task (no CPU slot: it concatenates and
writes; Ray runs it where the results are) turns into the unit's outputs and record. The
split is guided self-scheduling: a unit handed out while plenty of rows remain runs as one
part; near the end of the stage the parts shrink to about `remaining rows / (2 x task
slots)`, so the last tasks are short and no core idles long on a last, long unit. Since every
part's rows go back into the unit in order, what a unit writes does not depend on the split
(and a resumed run may split differently).

Only about two tasks per slot are in flight at once, so the object store holds a bounded
number of part results whatever the size of the stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

Record = dict[str, Any]
TASKS_PER_SLOT = 2  # parts in flight per task slot (the next one is queued when one ends)
MAX_PART_ROWS = 256  # a part never holds more: a lost task redoes little, progress moves


def part_bounds(
    rows: int, remaining: int, slots: int, *, max_rows: int = MAX_PART_ROWS
) -> list[tuple[int, int]]:
    """The row ranges `[(start, stop), ...]` of a unit of `rows` rows handed out when
    `remaining` rows (this unit's included) are left to hand out over `slots` task slots:
    parts of about `remaining / (2 x slots)` rows and at most `max_rows`, one part when that
    is `rows` or more."""
    if rows <= 0:
        return [(0, 0)]
    size = max(1, min(max_rows, math.ceil(remaining / (TASKS_PER_SLOT * max(1, slots)))))
    count = math.ceil(rows / min(rows, size))
    edges = [round(i * rows / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def task_slots(num_cpus: float) -> int:
    """How many `num_cpus` tasks the Ray cluster runs at once now (at least 1)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cpus // num_cpus)) if num_cpus > 0 else max(1, int(cpus))


def run_parts(
    units: Sequence[Mapping[str, Any]],
    part: Callable[..., Any],
    finish: Callable[..., Record],
    *,
    num_cpus: float,
    part_kwargs: Mapping[str, Any],
    finish_kwargs: Mapping[str, Any],
    on_part: Callable[[int], Any] | None = None,
) -> Iterator[Record]:
    """Runs every unit (a mapping with `rows`) as part tasks (`part(..., **part_kwargs)`) and
    a finish task (`finish(..., **finish_kwargs)`; module docstring); yields the records the
    finish tasks return, as they come back, and calls `on_part(rows)` as each part ends (for
    progress within a long unit). The first error of a task is raised (Ray's task error, which
    is also an instance of its cause)."""
    if not units:
        return
    import ray

    part_task = ray.remote(part).options(num_cpus=num_cpus)
    finish_task = ray.remote(finish).options(num_cpus=0)
    to_part = {key: ray.put(value) for key, value in part_kwargs.items()}
    to_finish = {key: ray.put(value) for key, value in finish_kwargs.items()}
    remaining = sum(int(u["rows"]) for u in units)
    queue = list(reversed(units))
    pending: dict[Any, int] = {}  # finish ref -> its unit's parts not yet done
    parts: dict[Any, tuple[Any, int]] = {}  # part ref -> (its finish ref, its rows)

    def hand_out() -> None:
        nonlocal remaining
        slots = task_slots(num_cpus)
        while queue and sum(pending.values()) < TASKS_PER_SLOT * slots:
            unit = dict(queue.pop())
            bounds = part_bounds(int(unit["rows"]), remaining, slots)
            remaining -= int(unit["rows"])
            shared = ray.put(unit)  # once, however many parts read it
            refs = [part_task.remote(shared, start, stop, **to_part) for start, stop in bounds]
            finish_ref = finish_task.remote(shared, *refs, **to_finish)
            pending[finish_ref] = len(refs)
            for ref, (start, stop) in zip(refs, bounds, strict=True):
                parts[ref] = (finish_ref, stop - start)

    hand_out()
    while pending:
        done, _ = ray.wait([*parts, *pending], num_returns=1)
        if done[0] in parts:
            finish_ref, rows = parts.pop(done[0])
            pending[finish_ref] -= 1
            if on_part is not None:
                on_part(rows)
            hand_out()
            continue
        del pending[done[0]]
        for ref in [r for r, (f, _) in parts.items() if f == done[0]]:
            _, rows = parts.pop(ref)  # a part that ray.wait had not handed back yet
            if on_part is not None:
                on_part(rows)
        record = ray.get(done[0])
        hand_out()
        yield record
