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


def part_bounds(rows: int, remaining: int, slots: int) -> list[tuple[int, int]]:
    """The row ranges `[(start, stop), ...]` of a unit of `rows` rows handed out when
    `remaining` rows (this unit's included) are left to hand out over `slots` task slots:
    parts of about `remaining / (2 x slots)` rows, one part when that is `rows` or more."""
    if rows <= 0:
        return [(0, 0)]
    size = max(1, math.ceil(remaining / (TASKS_PER_SLOT * max(1, slots))))
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
) -> Iterator[Record]:
    """Runs every unit (a mapping with `rows`) as part tasks (`part(..., **part_kwargs)`) and
    a finish task (`finish(..., **finish_kwargs)`; module docstring); yields the records the
    finish tasks return, as they come back. The first error of a task is raised (Ray's task
    error, which is also an instance of its cause)."""
    if not units:
        return
    import ray

    part_task = ray.remote(part).options(num_cpus=num_cpus)
    finish_task = ray.remote(finish).options(num_cpus=0)
    to_part = {key: ray.put(value) for key, value in part_kwargs.items()}
    to_finish = {key: ray.put(value) for key, value in finish_kwargs.items()}
    remaining = sum(int(u["rows"]) for u in units)
    queue = list(reversed(units))
    pending: dict[Any, int] = {}  # finish ref -> its unit's part count

    def hand_out() -> None:
        nonlocal remaining
        slots = task_slots(num_cpus)
        while queue and sum(pending.values()) < TASKS_PER_SLOT * slots:
            unit = dict(queue.pop())
            bounds = part_bounds(int(unit["rows"]), remaining, slots)
            remaining -= int(unit["rows"])
            refs = [part_task.remote(unit, start, stop, **to_part) for start, stop in bounds]
            pending[finish_task.remote(unit, *refs, **to_finish)] = len(refs)

    hand_out()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        del pending[done[0]]
        record = ray.get(done[0])
        hand_out()
        yield record
