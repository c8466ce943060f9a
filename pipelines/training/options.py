"""The command-line options both training jobs share (`jobs.train`, `jobs.retrain`)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pipelines.cli import DEVICES, UsageError, add_common_args, given
from pipelines.io.storage import Location, StorageOptions
from pipelines.training.run import RunResult

Flag = tuple[str, dict[str, Any]]
_MICRO_HELP = "per-worker micro-batch; smaller than the worker's share means gradient accumulation"
_CPUS_HELP = "CPUs per training worker"
_WAIT = (
    "how long a start or restart waits for the workers' resources before training fails, "
    "its checkpoints kept (0 = for ever)"
)
_DEVICE_HELP = "gpu when the cluster has GPUs (auto)"


def training_parser(
    job: str,
    description: str,
    checkpoint_every: int,
    extra: Mapping[str, Sequence[Flag]],
    *,
    model: bool = False,
    group: bool = False,
) -> argparse.ArgumentParser:
    """The parser of `jobs.<job>`: the shared options (`pipelines.cli`), then the Ray Train
    flags (in a group "<job> options" whose description keeps its layout, with `group`) and
    the job's own: `extra[flag]` go before `flag`, `extra[""]` last."""
    formatter = argparse.RawDescriptionHelpFormatter if group else argparse.HelpFormatter
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{job}", description=description, formatter_class=formatter
    )
    add_common_args(parser, model=model)
    target = parser.add_argument_group(f"{job} options") if group else parser
    flags: list[Flag] = [
        ("--iterations", {"type": int, "metavar": "N", "help": "optimizer steps in total"}),
        ("--num-workers", {"type": int, "default": 2, "metavar": "W", "help": "Ray Train workers"}),
        ("--micro-batch-size", {"type": int, "metavar": "N", "help": _MICRO_HELP}),
        ("--resume", {"action": "store_true", "help": "continue from the last checkpoint"}),
        ("--checkpoint-every", {"type": int, "default": checkpoint_every, "metavar": "N"}),
        ("--log-every", {"type": int, "default": 50, "metavar": "N"}),
        ("--max-failures", {"type": int, "default": 3, "metavar": "N"}),
        ("--resource-wait-s", {"type": float, "default": 600.0, "metavar": "S", "help": _WAIT}),
        ("--cpus-per-worker", {"type": float, "default": 0.5, "metavar": "N", "help": _CPUS_HELP}),
        ("--device", {"choices": tuple(DEVICES), "default": "auto", "help": _DEVICE_HELP}),
        ("", {}),
    ]
    for name, kwargs in flags:
        for own, own_kwargs in extra.get(name, ()):
            target.add_argument(own, **own_kwargs)
        if name:
            target.add_argument(name, **kwargs)
    return parser


def run_kwargs(args: argparse.Namespace, job: Any) -> dict[str, Any]:
    """`RunOptions` fields from the parsed flags and the shared options (`cli.job_options`)."""
    names = ("num_workers", "micro_batch_size", "resume", "checkpoint_every", "log_every")
    return {
        **given(args, *names, "max_failures", "resource_wait_s", "cpus_per_worker"),
        "overwrite": job.overwrite,
        "use_gpu": DEVICES[args.device],
        "num_cpus_per_task": job.resources.num_cpus_per_task,
    }


def print_result(verb: str, result: RunResult, uri: str) -> int:
    """Prints what a run did (nothing when it was skipped); returns exit status 0."""
    if not result.skipped:
        print(
            f"{verb} {result.iterations - result.start_iteration} iterations "
            f"({result.start_iteration} -> {result.iterations}); wrote {uri}"
        )
    return 0


def print_report(output: Location, storage: StorageOptions) -> None:
    """Writes the stage's report (`pipelines.report.run.write_stage_report`), prints where."""
    from pipelines.report.run import write_stage_report

    print(f"report: {write_stage_report(output, storage=storage)}")


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """A `ValueError` of the options (a config dataclass refusing a value) is a usage error."""
    try:
        yield
    except ValueError as error:
        raise UsageError(f"config: {error}") from None
