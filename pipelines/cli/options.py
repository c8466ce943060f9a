"""The options every job shares (docs/CONTRACTS.md "Options every job shares").

Value options default to None, meaning "not given", so that a `--config` file can set them
and a flag still wins (`pipelines.cli.config.build_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any

from pipelines.io.storage import Location, StorageOptions, resolve

DEBUG_ENV = "WEAKCLIP_DEBUG"
MODEL_PRESETS = ("tiny", "vit-b-16")
CLASSES_METAVAR = "voc|coco91|coco81|FILE"
DEVICES = {"auto": None, "cpu": False, "gpu": True}  # --device → use_gpu (None: when present)


class UsageError(Exception):
    """The command line or config file is wrong: exit status 2."""


@dataclass(frozen=True)
class Resources:
    """Resources a job asks of Ray. The defaults fit a 2-core machine."""

    # CPUs per Ray task/actor; fractional so that every stage of a streaming pipeline can hold
    # a slot at once on 2 cores (docs/ARCHITECTURE.md, "Resources").
    num_cpus_per_task: float = 0.5
    actor_pool_size: int = 1  # actors in each model-holding actor pool
    batch_size: int | None = None  # global, across all workers; None = the stage's default
    object_store_memory: int | None = None  # bytes for the object store of a new local Ray


@dataclass(frozen=True)
class JobOptions:
    """The shared options of a job, parsed and resolved (`output` None only where the job's
    `--output` is optional)."""

    input: Location | None
    output: Location | None
    storage: StorageOptions
    resources: Resources
    overwrite: bool
    model: str | None

    @property
    def uris(self) -> tuple[str, str]:
        """`(input, output)` URIs, for a stage job that has both."""
        assert self.input is not None and self.output is not None
        return self.input.uri, self.output.uri


def add_common_args(
    parser: argparse.ArgumentParser, *, model: bool = False, input: bool = True
) -> None:
    """Add the shared options (value options default to None: "not given"); `model` adds
    `--model`, `input` a required `--input` (false for jobs that only write)."""
    add = parser.add_argument_group("shared options").add_argument
    if input:
        add("--input", required=True, metavar="URI", help="s3://bucket/prefix, file:// or a path")
    add("--output", required=True, metavar="URI", help="this stage's output directory")
    add("--config", metavar="FILE", help="YAML or JSON with config fields; flags override it")
    if model:
        add("--model", choices=MODEL_PRESETS, help="model preset")
    add("--ray-address", metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else local)")
    add("--storage-endpoint", metavar="URL", help="S3-compatible endpoint ($AWS_ENDPOINT_URL)")
    cpus = "CPUs reserved per task of a data stage, fractional allowed (default: the stage's)"
    add("--num-cpus-per-task", type=_positive_float, metavar="N", help=cpus)
    pool = "most model replicas per actor pool (it starts with one and grows), where there is one"
    add("--actor-pool-size", type=_positive_int, metavar="N", help=pool)
    add("--batch-size", type=_positive_int, metavar="N", help="global, across all workers")
    add("--object-store-memory", type=parse_size, metavar="BYTES", help="e.g. 2G, 512MiB")
    overwrite = "replace this output's earlier results (later stages must be re-run)"
    add("--overwrite", action="store_true", help=overwrite)
    local = "allow a local --output on a multi-node cluster (a shared mount on every node)"
    add("--allow-local-output", action="store_true", help=local)
    add("--debug", action="store_true", help=f"full tracebacks on failure (or {DEBUG_ENV}=1)")


def job_parser(
    module: str, doc: str | None, title: str, **common: bool
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A job's parser (`doc` its description) with the shared options (`common` goes to
    `add_common_args`), and its own option group `title`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser, **common)
    return parser, parser.add_argument_group(title)


def add_max_error_fraction(group: argparse._ArgumentGroup) -> None:
    """`--max-error-fraction` of the stages that quarantine rows."""
    help = "fail when more than this share of rows is quarantined (default 0.01)"
    group.add_argument("--max-error-fraction", type=float, metavar="F", help=help)


def add_progress_every(group: argparse._ArgumentGroup, help: str) -> None:
    """`--progress-every N` (checked by `stage_options`)."""
    group.add_argument("--progress-every", type=int, metavar="N", help=help)


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """`{name: args.<name>}`: flags that set config fields of the same name (None: not given)."""
    return {name: getattr(args, name) for name in names}


def comma_list(text: str) -> tuple[str, ...]:
    """The items of a comma-separated flag value, stripped, empty ones left out."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def stage_options(
    args: argparse.Namespace,
    stage: str,
    defaults: Resources | None = None,
    *,
    unused: tuple[str, ...] = ("actor_pool_size", "batch_size"),
) -> JobOptions:
    """`job_options` of a data stage's job, after refusing the shared options it has no use
    for (`unused`) and a `--progress-every` below 1.

    Raises:
        UsageError: one of those, or an unusable location.
    """
    reject_unused(args, stage, *unused)
    check_positive(args, progress_every="must be at least 1")
    return job_options(args, defaults)


def check_positive(args: argparse.Namespace, **messages: str) -> None:
    """Refuse a given option (by destination) that is not positive: `messages[dest]` says why.

    Raises:
        UsageError: `--<dest>: <message>` for the first one.
    """
    for name, message in messages.items():
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')}: {message}")


def reject_unused(args: argparse.Namespace, stage: str, *names: str) -> None:
    """Refuse the shared options (argparse destinations) `stage` has no use for.

    Raises:
        UsageError: one of them was given.
    """
    for name in names:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: has no effect on the {stage} stage; leave it out")


def storage_options(args: argparse.Namespace) -> StorageOptions:
    """`--storage-endpoint` (else the environment) as `StorageOptions`."""
    return StorageOptions(endpoint_url=getattr(args, "storage_endpoint", None) or None)


def resources(args: argparse.Namespace, defaults: Resources | None = None) -> Resources:
    """The resource flags given, the stage's `defaults` (else `Resources()`) for the rest."""
    names = [f.name for f in dataclasses.fields(Resources)]
    flags = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return dataclasses.replace(defaults or Resources(), **flags)


def job_options(args: argparse.Namespace, defaults: Resources | None = None) -> JobOptions:
    """The shared options of parsed `args`, resolved.

    Raises:
        UsageError: an unusable `--input`, `--output` or `--storage-endpoint`.
    """
    storage = storage_options(args)
    try:
        storage = storage.with_env_defaults()
    except ValueError as e:
        source = "--storage-endpoint" if storage.endpoint_url else "AWS_ENDPOINT_URL"
        raise UsageError(f"{source}: {e}") from None
    raw_input = getattr(args, "input", None)
    return JobOptions(
        input=resolve_arg("--input", raw_input, storage) if raw_input is not None else None,
        output=resolve_arg("--output", args.output, storage) if args.output is not None else None,
        storage=storage,
        resources=resources(args, defaults),
        overwrite=bool(getattr(args, "overwrite", False)),
        model=getattr(args, "model", None),
    )


def stage_kwargs(options: JobOptions) -> dict[str, Any]:
    """The keyword arguments every `run_<stage>` of a data stage takes from the shared options."""
    return {
        "storage": options.storage,
        "num_cpus_per_task": options.resources.num_cpus_per_task,
        "overwrite": options.overwrite,
    }


def resolve_arg(flag: str, value: str, storage: StorageOptions) -> Location:
    """`value` of option `flag` as a location; a bad one is a usage error naming the flag."""
    try:
        return resolve(value, storage)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _positive(text: str, kind: type[int] | type[float]) -> Any:
    """`text` as a finite `kind` above 0 (an argparse type through `functools.partial`)."""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0 (finite), got {text}")
    return value


_positive_int = functools.partial(_positive, kind=int)
_positive_float = functools.partial(_positive, kind=float)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from `1073741824`, `512M`, `2G`, `1.5GiB` (K/M/G/T are powers of 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * _SIZE_UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value
