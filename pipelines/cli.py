"""The options every job shares (CONTRACTS.md "Options every job shares") and how jobs exit.

A job module is parse → config → pipeline, wrapped by `run_job` for the exit status:

    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="weakclip-refine")
        add_common_args(parser)
        parser.add_argument("--crf-iterations", type=int)       # default None = "not given"
        return parser

    def _main(argv: list[str]) -> int:
        args = build_parser().parse_args(argv)
        config = build_config(RefineConfig, args, {"crf_iterations": args.crf_iterations})
        options = job_options(args)
        init_ray(args)
        run_refine(options, config)
        return 0

    def main(argv: list[str] | None = None) -> int:
        return run_job(_main, argv)

Exit status: 0 success; 1 failure with one line on stderr (credentials redacted; the traceback
too with `--debug` or `WEAKCLIP_DEBUG=1`); 2 usage error (argparse's own, a bad config file,
a config value refused by the config dataclass, a bad location).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from pipelines.io.storage import Location, StorageOptions, read_bytes, redact, resolve

DEBUG_ENV = "WEAKCLIP_DEBUG"
MODEL_PRESETS = ("tiny", "vit-b-16")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_ERROR_CHARS = 1000

_C = TypeVar("_C")


class UsageError(Exception):
    """The command line or config file is wrong: exit status 2."""


@dataclass(frozen=True)
class Resources:
    """Resources a job asks of Ray. The defaults fit a 2-core machine.

    Attributes:
        num_cpus_per_task: CPUs reserved per Ray task/actor; fractional so that every stage of
            a streaming pipeline can hold a slot at once on 2 cores (ENVIRONMENT.md).
        actor_pool_size: actors in each model-holding actor pool.
        batch_size: global batch size across all workers; None means the stage's default.
        object_store_memory: bytes for the object store of a new local Ray instance.
    """

    num_cpus_per_task: float = 0.5
    actor_pool_size: int = 1
    batch_size: int | None = None
    object_store_memory: int | None = None


@dataclass(frozen=True)
class JobOptions:
    """The shared options of a job, parsed and resolved."""

    input: Location | None
    output: Location
    storage: StorageOptions
    resources: Resources
    ray_address: str | None
    overwrite: bool
    allow_local_output: bool
    model: str | None
    debug: bool


def add_common_args(
    parser: argparse.ArgumentParser, *, model: bool = False, input: bool = True
) -> None:
    """Add the shared options. Value options default to None, meaning "not given".

    Args:
        parser: the job's parser.
        model: add `--model tiny|vit-b-16` (jobs that build a model).
        input: add a required `--input` (false for jobs that only write, e.g. data generators).
    """
    group = parser.add_argument_group("shared options")
    if input:
        group.add_argument(
            "--input", required=True, metavar="URI", help="s3://bucket/prefix, file:// or a path"
        )
    group.add_argument(
        "--output", required=True, metavar="URI", help="this stage's output directory"
    )
    group.add_argument(
        "--config", metavar="FILE", help="YAML or JSON with config fields; flags override it"
    )
    if model:
        group.add_argument("--model", choices=MODEL_PRESETS, help="model preset")
    group.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else local)"
    )
    group.add_argument(
        "--storage-endpoint", metavar="URL", help="S3-compatible endpoint ($AWS_ENDPOINT_URL)"
    )
    group.add_argument(
        "--num-cpus-per-task",
        type=_positive_float,
        metavar="N",
        help="CPUs reserved per Ray Data task, fractional allowed (default: the stage's)",
    )
    group.add_argument(
        "--actor-pool-size",
        type=_positive_int,
        metavar="N",
        help="model replicas per actor pool, in stages that have one",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help="global, across all workers"
    )
    group.add_argument(
        "--object-store-memory", type=parse_size, metavar="BYTES", help="e.g. 2G, 512MiB"
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this output's earlier results (later stages must be re-run)",
    )
    group.add_argument(
        "--allow-local-output",
        action="store_true",
        help="allow a local --output on a multi-node cluster (a shared mount on every node)",
    )
    group.add_argument(
        "--debug", action="store_true", help=f"full tracebacks on failure (or {DEBUG_ENV}=1)"
    )


def reject_unused(args: argparse.Namespace, stage: str, *names: str) -> None:
    """Refuse shared options this stage has no use for, rather than silently ignoring them.

    Args:
        args: parsed arguments.
        stage: the stage's name, for the message.
        names: argparse destinations (`"actor_pool_size"`, `"batch_size"`).

    Raises:
        UsageError: one of them was given.
    """
    for name in names:
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: has no effect on the {stage} stage; leave it out")


def storage_options(args: argparse.Namespace) -> StorageOptions:
    """`--storage-endpoint` (else the environment) as `StorageOptions`."""
    try:
        return StorageOptions(endpoint_url=getattr(args, "storage_endpoint", None) or None)
    except ValueError as e:
        raise UsageError(f"--storage-endpoint: {e}") from None


def resources(args: argparse.Namespace, defaults: Resources | None = None) -> Resources:
    """The resource flags given, the stage's `defaults` (else `Resources()`) for the rest."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Resources)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(defaults or Resources(), **given)


def job_options(args: argparse.Namespace, defaults: Resources | None = None) -> JobOptions:
    """Resolve the shared options of parsed `args`.

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
        input=_resolve_arg("--input", raw_input, storage) if raw_input is not None else None,
        output=_resolve_arg("--output", args.output, storage),
        storage=storage,
        resources=resources(args, defaults),
        ray_address=getattr(args, "ray_address", None),
        overwrite=bool(getattr(args, "overwrite", False)),
        allow_local_output=bool(getattr(args, "allow_local_output", False)),
        model=getattr(args, "model", None),
        debug=bool(getattr(args, "debug", False)),
    )


# ---------------------------------------------------------------------------------------------
# Config: file first, explicit flags over it.


def build_config(
    config_type: type[_C],
    args: argparse.Namespace,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> _C:
    """Build a config dataclass from `--config FILE` and the flags actually given.

    Args:
        config_type: the stage's (frozen) config dataclass; nested dataclass fields are filled
            from nested mappings.
        args: parsed arguments (`args.config` may be None).
        overrides: field → flag value; None values mean "flag not given" and are skipped.
            A dotted key (`"crf.iterations"`) sets a field of a nested config.
        base: field values under the file's (e.g. a demo's smaller settings); nested mappings
            merge field by field.

    Raises:
        UsageError: unreadable file, unknown keys, wrong value types, or a value the config
            dataclass refuses (its ValueError).
        TypeError: an override names a field the dataclass does not have (a bug in the job).
    """
    values: dict[str, Any] = _merged({}, base or {})
    config_path = getattr(args, "config", None)
    if config_path:
        values = _merged(values, load_config_file(config_path, storage_options(args)))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if not _has_field(config_type, key.split(".")):
            raise TypeError(f"{config_type.__name__} has no field {key!r}")
        _set_dotted(values, key.split("."), value)
    try:
        return _from_mapping(config_type, values, "")
    except UsageError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"config: {e}") from None


def _merged(values: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with `over` on top; mappings under the same key merge recursively."""
    out = dict(values)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(dict(out[key]), value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def load_config_file(path: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """Read a YAML or JSON config file (local or in object storage) into a mapping.

    `.json` files are parsed as JSON, anything else as YAML (safe loader: no Python tags).
    """
    try:
        data = read_bytes(resolve(path, storage), max_bytes=MAX_CONFIG_BYTES)
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path}: {redact(str(e))}") from None
    try:
        text = data.decode("utf-8")
        parsed = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--config {path}: not valid YAML/JSON: {first}") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise UsageError(f"--config {path}: must hold a mapping of config fields")
    return parsed


def _from_mapping(config_type: type[_C], values: Mapping[str, Any], where: str) -> _C:
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_type) if f.init}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise UsageError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)} for "
            f"{config_type.__name__}; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(config_type)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, Mapping):
            base = _default_as_dict(fields[name])
            value = _from_mapping(nested, {**base, **value}, f"{where}{name}.")
        else:
            value = _coerce(value, hint, f"{where}{name}")
        kwargs[name] = value
    return config_type(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Lists → tuples for tuple fields; refuse plainly wrong scalar types."""
    options = _union_members(hint)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise UsageError(f"config field {name} must not be null")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is tuple and isinstance(value, list | tuple):
            return tuple(value)
        if origin is list and isinstance(value, list | tuple):
            return list(value)
    simple = [o for o in options if o in (int, float, str, bool)]
    if simple and len(simple) == len([o for o in options if o is not type(None)]):
        ok = any(
            (o is bool and isinstance(value, bool))
            or (o is int and isinstance(value, int) and not isinstance(value, bool))
            or (o is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (o is str and isinstance(value, str))
            for o in simple
        )
        if not ok:
            wanted = " or ".join(o.__name__ for o in simple)
            raise UsageError(f"config field {name} must be {wanted}, got {value!r}")
        if float in simple and int not in simple and isinstance(value, int):
            return float(value)
    return value


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _dataclass_in(hint: Any) -> type | None:
    for option in _union_members(hint):
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None


def _default_as_dict(f: dataclasses.Field[Any]) -> dict[str, Any]:
    if f.default is not dataclasses.MISSING and dataclasses.is_dataclass(f.default):
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return {}
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return {}
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}


def _has_field(config_type: type, path: list[str]) -> bool:
    current: Any = config_type
    for part in path:
        if current is None or not dataclasses.is_dataclass(current):
            return False
        names = {f.name for f in dataclasses.fields(current)}
        if part not in names:
            return False
        current = _dataclass_in(typing.get_type_hints(current)[part])
    return True


def _set_dotted(values: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = values.get(part)
        if not isinstance(child, dict):
            child = {}
            values[part] = child
        values = child
    values[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Ray


def alive_node_count() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def init_ray(args: argparse.Namespace, *, node_count: Callable[[], int] = alive_node_count) -> bool:
    """Connect to Ray, then refuse a node-local `--output` on a multi-node cluster.

    Order: an instance already initialised in this process (tests, chained stages); else
    `--ray-address`; else `$RAY_ADDRESS` (set by `ray job submit`); else a new local instance
    using every core, without the dashboard. Workers of a new local instance inherit this
    process's environment (AWS credentials included); workers of an existing cluster use
    their own AWS credential chain, while the endpoint travels inside each `Location`.

    Returns:
        True when this call started or connected Ray, False when it was already initialised.

    Raises:
        UsageError: `--object-store-memory` with an existing cluster, or a local output on a
            multi-node cluster without `--allow-local-output`.
    """
    import ray

    started = False
    if not ray.is_initialized():
        address = getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS")
        object_store = getattr(args, "object_store_memory", None)
        if address:
            if object_store is not None:
                raise UsageError(
                    "--object-store-memory applies to a new local Ray instance, "
                    "not to an existing cluster"
                )
            ray.init(address=address)
        else:
            ray.init(address="local", object_store_memory=object_store, include_dashboard=False)
        started = True
    if not sys.stdout.isatty():
        # Logs (ray job submit, CI): the stages print their own progress lines; Ray Data's
        # bars would add one redraw line per operator every few seconds from every worker.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    output = getattr(args, "output", None)
    if output is not None:
        check_local_output(
            _resolve_arg("--output", output, storage_options(args)),
            allow_local_output=bool(getattr(args, "allow_local_output", False)),
            node_count=node_count,
        )
    return started


def check_local_output(
    output: Location, *, allow_local_output: bool, node_count: Callable[[], int]
) -> None:
    """Refuse a `file://`/plain-path output when the cluster has more than one node."""
    if not output.is_local or allow_local_output:
        return
    nodes = node_count()
    if nodes > 1:
        raise UsageError(
            f"--output {output.uri} is a local path, but the Ray cluster has {nodes} nodes: "
            "workers on other nodes would write to their own disks and the output would be "
            "scattered. Use object storage (s3://bucket/prefix), or pass --allow-local-output "
            "if that path is a shared filesystem mounted on every node"
        )


# ---------------------------------------------------------------------------------------------
# Exit status


def run_job(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a job's `fn(argv)` and turn its outcome into the contract's exit status.

    0: `fn` returned None or 0 (or its own status). 1: any exception, reported as one
    redacted line `error: ...` on stderr. 2: usage errors (argparse, `UsageError`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = fn(args)
    except SystemExit as e:  # argparse: 2 on errors (message already printed), 0 on --help
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(f"error: {one_line(str(e.code))}", file=sys.stderr)
        return 1
    except UsageError as e:
        _report(e, debug)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the job boundary: every failure becomes exit 1
        _report(e, debug)
        return 1
    return 0 if result is None else int(result)


def one_line(text: str) -> str:
    """Collapse a message to one redacted line of at most `MAX_ERROR_CHARS`."""
    line = " ".join(redact(text).split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message`, looking through Ray's task-error wrappers."""
    chain = _ray_chain(error)
    error = chain[-1]
    if type(error).__name__ == "UserCodeException" and error.__cause__ is None:
        # Ray Data wraps a UDF's exception; the wrapper reaches the driver without its cause,
        # whose type and message survive only in the remote traceback text.
        for wrapper in reversed(chain):
            root = _root_exception_line(str(wrapper))
            if root is not None:
                return one_line(root)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, UsageError):
        return one_line(lines[0] if lines else "usage error")
    message = lines[0] if lines else ""
    return one_line(f"{type(error).__name__}: {message}" if message else type(error).__name__)


def _report(error: BaseException, debug: bool) -> None:
    if debug:
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="")
    hint = (
        "" if debug or isinstance(error, UsageError) else f" (--debug or {DEBUG_ENV}=1 for details)"
    )
    print(f"error: {describe_error(error)}{hint}", file=sys.stderr)


_CHAIN_MARKERS = (
    "The above exception was the direct cause of the following exception",
    "During handling of the above exception, another exception occurred",
)
_EXCEPTION_LINE = re.compile(r"^(?:[a-z_]\w*\.)*([A-Z]\w*): (\S.*)$")  # [module.]Type: msg


def _root_exception_line(traceback_text: str) -> str | None:
    """`Type: message` of the first exception of a printed chain (the root cause), if any."""
    cuts = [traceback_text.find(m) for m in _CHAIN_MARKERS if m in traceback_text]
    if not cuts:
        return None
    for line in reversed(traceback_text[: min(cuts)].splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return None


def _unwrap_ray(error: BaseException) -> BaseException:
    """Ray wraps task failures (RayTaskError, UserCodeException); report the cause."""
    return _ray_chain(error)[-1]


def _ray_chain(error: BaseException) -> list[BaseException]:
    """`error` and the causes inside Ray's wrappers, outermost first: task errors (`cause`),
    Ray Train's worker-group errors (the lowest rank's failure) and controller errors."""
    chain = [error]
    while type(error).__module__.startswith("ray.") and len(chain) <= 10:
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            cause = failures[min(failures)]
        else:
            cause = (
                getattr(error, "cause", None)
                or getattr(error, "controller_failure", None)
                or error.__cause__
            )
        if not isinstance(cause, BaseException):
            break
        error = cause
        chain.append(error)
    return chain


def _resolve_arg(flag: str, value: str, storage: StorageOptions) -> Location:
    try:
        return resolve(value, storage)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


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
