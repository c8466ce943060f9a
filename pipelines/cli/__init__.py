"""What every job shares: its options, its config file, Ray, and how it exits.

A job module is parse → config → `run_<stage>` (see `jobs/refine.py`): `job_parser` (the shared
options and the job's group), `stage_options` (the shared options resolved), `build_config`
(`--config FILE` under the flags given), `init_ray`, `result_status`, and `entry_points` for
`main(argv)` and the console script (`run_job`: the exit status). Exit status: 0 success; 1
failure with one line on stderr (credentials redacted; the traceback too with `--debug` or
`WEAKCLIP_DEBUG=1`); 2 usage error (argparse's own, a bad config file, a config value refused by
the config dataclass, a bad location).
"""

from pipelines.cli.config import build_config as build_config
from pipelines.cli.config import load_config_file as load_config_file
from pipelines.cli.exit_status import entry_points as entry_points
from pipelines.cli.exit_status import result_status as result_status
from pipelines.cli.exit_status import run_job as run_job
from pipelines.cli.exit_status import to_stderr as to_stderr
from pipelines.cli.options import CLASSES_METAVAR as CLASSES_METAVAR
from pipelines.cli.options import DEVICES as DEVICES
from pipelines.cli.options import Resources as Resources
from pipelines.cli.options import UsageError as UsageError
from pipelines.cli.options import add_common_args as add_common_args
from pipelines.cli.options import add_max_error_fraction as add_max_error_fraction
from pipelines.cli.options import add_progress_every as add_progress_every
from pipelines.cli.options import check_positive as check_positive
from pipelines.cli.options import given as given
from pipelines.cli.options import job_options as job_options
from pipelines.cli.options import job_parser as job_parser
from pipelines.cli.options import reject_unused as reject_unused
from pipelines.cli.options import stage_kwargs as stage_kwargs
from pipelines.cli.options import stage_options as stage_options
from pipelines.cli.options import storage_options as storage_options
from pipelines.cli.ray_init import init_ray as init_ray
