"""What every job shares: its options, its config file, Ray, and how it exits.

A job module is parse → config → `run_<stage>` (see `jobs/refine.py`): `job_parser` (the shared
options and the job's group), `stage_options` (the shared options resolved), `build_config`
(`--config FILE` under the flags given), `init_ray`, `result_status`, and `entry_points` for
`main(argv)` and the console script (`run_job`: the exit status). Exit status: 0 success; 1
failure with one line on stderr (credentials redacted; the traceback too with `--debug` or
`WEAKCLIP_DEBUG=1`); 2 usage error (argparse's own, a bad config file, a config value refused by
the config dataclass, a bad location).
"""

from pipelines.cli.config import build_config, load_config_file
from pipelines.cli.exit_status import (
    describe_error,
    entry_points,
    one_line,
    result_status,
    run_job,
    to_stderr,
)
from pipelines.cli.options import (
    CLASSES_METAVAR,
    DEVICES,
    JobOptions,
    Resources,
    UsageError,
    add_common_args,
    add_max_error_fraction,
    add_progress_every,
    check_positive,
    given,
    job_options,
    job_parser,
    parse_size,
    reject_unused,
    resolve_arg,
    resources,
    stage_kwargs,
    stage_options,
    storage_options,
)
from pipelines.cli.ray_init import alive_node_count, check_local_output, init_ray

__all__ = [
    "CLASSES_METAVAR",
    "DEVICES",
    "JobOptions",
    "Resources",
    "UsageError",
    "add_common_args",
    "add_max_error_fraction",
    "add_progress_every",
    "check_positive",
    "entry_points",
    "given",
    "alive_node_count",
    "build_config",
    "check_local_output",
    "describe_error",
    "init_ray",
    "job_options",
    "job_parser",
    "load_config_file",
    "one_line",
    "parse_size",
    "reject_unused",
    "resolve_arg",
    "resources",
    "result_status",
    "run_job",
    "stage_kwargs",
    "stage_options",
    "storage_options",
    "to_stderr",
]
