"""Shared job options: config merging, exit statuses, redacted errors, local-output refusal."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.cli import (
    UsageError,
    add_common_args,
    build_config,
    exit_status,
    options,
    ray_init,
    run_job,
)
from pipelines.io.storage import resolve


@dataclass(frozen=True)
class CrfConfig:
    iterations: int = 10  # mean-field steps
    sxy: float = 3.0  # smoothness kernel width


@dataclass(frozen=True)
class StageConfig:
    alpha: float = 1.0  # a weight
    name: str = "x"  # a label
    scales: tuple[float, ...] = (1.0,)  # test-time scales
    limit: int | None = None  # optional cap
    crf: CrfConfig = field(default_factory=lambda: CrfConfig(iterations=5))

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def _parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weakclip-test")
    add_common_args(parser, **kw)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--crf-iterations", type=int)
    return parser


def _config(argv: list[str]) -> StageConfig:
    args = _parser().parse_args(["--input", "in", "--output", "out", *argv])
    return build_config(
        StageConfig, args, {"alpha": args.alpha, "crf.iterations": args.crf_iterations}
    )


# --- config ----------------------------------------------------------------------------------


def test_defaults_without_file_or_flags():
    assert _config([]) == StageConfig()


def test_yaml_file_merged_with_flags_flags_win(tmp_path: Path):
    path = tmp_path / "cfg.yaml"
    path.write_text("alpha: 2\nname: fromfile\nscales: [0.5, 1.0]\ncrf: {sxy: 5}\n")
    cfg = _config(["--config", str(path), "--alpha", "7.5", "--crf-iterations", "3"])
    assert cfg == StageConfig(
        alpha=7.5, name="fromfile", scales=(0.5, 1.0), crf=CrfConfig(iterations=3, sxy=5.0)
    )
    assert isinstance(cfg.scales, tuple)
    from_file = _config(["--config", str(path)])
    assert from_file.alpha == 2.0 and isinstance(from_file.alpha, float)
    assert from_file.crf == CrfConfig(iterations=5, sxy=5.0)  # default_factory's value kept


def test_json_file(tmp_path: Path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"name": "j", "limit": None, "crf": {"iterations": 2}}))
    assert _config(["--config", str(path)]) == StageConfig(name="j", crf=CrfConfig(iterations=2))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpha: 1\nbogus: 2\n", "unknown field.*bogus"),
        ("crf: {bogus: 1}\n", "crf.bogus"),
        ("alpha: fast\n", "alpha must be a number"),
        ("name: 3\n", "name must be a string"),
        ("crf: {iterations: true}\n", "crf.iterations must be an integer"),
        ("alpha: -1\n", "alpha must be >= 0"),
        ("- a\n- b\n", "mapping"),
        ("alpha: [unclosed\n", "not valid"),
        ("!!python/object/apply:os.system ['true']\n", "not valid"),
    ],
)
def test_bad_config_files_are_usage_errors(tmp_path: Path, text: str, message: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        _config(["--config", str(path)])


def test_missing_config_file_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match="not found"):
        _config(["--config", str(tmp_path / "nope.yaml")])


def test_override_naming_no_field_is_a_bug():
    args = _parser().parse_args(["--input", "a", "--output", "b"])
    with pytest.raises(TypeError):
        build_config(StageConfig, args, {"alhpa": 1.0})


def test_config_file_from_s3(s3_bucket: str):
    loc = resolve(s3_bucket)
    loc.fs.pipe_file(loc.join("cfg.yaml"), b"name: remote\n")
    assert _config(["--config", f"{s3_bucket}/cfg.yaml"]).name == "remote"


# --- shared options --------------------------------------------------------------------------


def test_job_options_resolve_and_default_resources(tmp_path: Path):
    args = _parser(model=True).parse_args(
        [
            "--input",
            "s3://bucket/in",
            "--output",
            str(tmp_path),
            "--model",
            "tiny",
            "--batch-size",
            "8",
            "--object-store-memory",
            "1.5G",
        ]
    )
    opts = cli.job_options(args)
    assert opts.input is not None and opts.input.uri == "s3://bucket/in"
    assert opts.output.path == str(tmp_path) and opts.output.is_local
    assert opts.model == "tiny"
    assert opts.resources == cli.Resources(
        num_cpus_per_task=0.5,
        actor_pool_size=1,
        batch_size=8,
        object_store_memory=int(1.5 * 1024**3),
    )
    stage_defaults = cli.Resources(num_cpus_per_task=0.25, batch_size=2)
    assert options.resources(args, stage_defaults).num_cpus_per_task == 0.25
    assert options.resources(args, stage_defaults).batch_size == 8


def test_storage_endpoint_flag_reaches_locations():
    args = _parser().parse_args(
        [
            "--input",
            "s3://bucket/in",
            "--output",
            "s3://bucket/out",
            "--storage-endpoint",
            "http://127.0.0.1:1234",
        ]
    )
    opts = cli.job_options(args)
    assert opts.output.options.endpoint_url == "http://127.0.0.1:1234"
    assert opts.input is not None and opts.input.options.endpoint_url == "http://127.0.0.1:1234"


def test_bad_location_is_a_usage_error():
    args = _parser().parse_args(["--input", "gs://x/y", "--output", "out"])
    with pytest.raises(UsageError, match="--input"):
        cli.job_options(args)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1024", 1024),
        ("512M", 512 * 1024**2),
        ("2g", 2 * 1024**3),
        ("1GiB", 1024**3),
        ("3kb", 3072),
    ],
)
def test_parse_size(text: str, value: int):
    assert options.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0"])
def test_parse_size_refuses(text: str):
    with pytest.raises(argparse.ArgumentTypeError):
        options.parse_size(text)


# --- run_job ---------------------------------------------------------------------------------


def _job(behaviour: str):
    def fn(argv: list[str]) -> int | None:
        args = _parser().parse_args(argv)
        _ = build_config(StageConfig, args, {"alpha": args.alpha})
        if behaviour == "fail":
            secret = os.environ["AWS_SECRET_ACCESS_KEY"]
            raise RuntimeError(
                f"upload failed\nusing {secret} and aws_secret_access_key=abc123xyz\nmore"
            )
        if behaviour == "usage":
            raise UsageError("--output s3://b/x is a local path on 3 nodes")
        if behaviour == "three":
            return 3
        return None

    return fn


BASE = ["--input", "in", "--output", "out"]


def test_run_job_success(capsys: pytest.CaptureFixture[str]):
    assert run_job(_job("ok"), BASE) == 0
    assert run_job(_job("three"), BASE) == 3
    assert capsys.readouterr().err == ""


def test_run_job_failure_is_one_redacted_line(capsys: pytest.CaptureFixture[str]):
    assert run_job(_job("fail"), BASE) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: RuntimeError: upload failed")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err and "abc123xyz" not in err


def test_run_job_debug_shows_redacted_traceback(capsys: pytest.CaptureFixture[str]):
    assert run_job(_job("fail"), [*BASE, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err and "abc123xyz" not in err


def test_run_job_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert run_job(_job("ok"), ["--output", "out"]) == 2  # argparse: --input missing
    assert run_job(_job("ok"), [*BASE, "--num-cpus-per-task", "0"]) == 2
    assert run_job(_job("usage"), BASE) == 2
    bad = tmp_path / "cfg.json"
    bad.write_text('{"alpha": 1, "unknown_key": 2}')
    capsys.readouterr()
    assert run_job(_job("ok"), [*BASE, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown_key" in err


def test_run_job_help_exits_0(capsys: pytest.CaptureFixture[str]):
    assert run_job(_job("ok"), ["--help"]) == 0
    assert "--storage-endpoint" in capsys.readouterr().out


def test_ray_wrapped_errors_report_the_cause():
    class FakeRayTaskError(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::task() (pid=1)\nTraceback ...\nValueError: bad")
            self.cause = cause

    FakeRayTaskError.__module__ = "ray.exceptions"
    line = exit_status.describe_error(FakeRayTaskError(ValueError("bad image size")))
    assert line == "ValueError: bad image size"


def test_ray_data_udf_errors_report_the_root_cause():
    """Ray Data's UserCodeException reaches the driver without its cause: read the traceback."""

    class UserCodeException(Exception):
        pass

    class FakeRayTaskError(Exception):
        def __init__(self, text: str, cause: BaseException) -> None:
            super().__init__(text)
            self.cause = cause

    UserCodeException.__module__ = FakeRayTaskError.__module__ = "ray.exceptions"
    text = (
        'ray::MapBatches(f)() (pid=1)\n  File "x.py", line 3, in f\n'
        "pyarrow.lib.ArrowInvalid: input shard s3://b/part-1.parquet is unreadable\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    error = FakeRayTaskError(text, UserCodeException("UDF failed to process a data block."))
    line = exit_status.describe_error(error)
    assert line == "ArrowInvalid: input shard s3://b/part-1.parquet is unreadable"


def test_ray_train_worker_errors_report_the_lowest_rank_cause():
    class WorkerGroupError(Exception):
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors:\n...")
            self.worker_failures = failures

    WorkerGroupError.__module__ = "ray.train.v2.api.exceptions"
    error = WorkerGroupError({1: RuntimeError("rank one"), 0: ValueError("syn_1: bad seed")})
    assert exit_status.describe_error(error) == "ValueError: syn_1: bad seed"


# --- local output on a cluster ---------------------------------------------------------------


def test_local_output_refused_on_multi_node_cluster(tmp_path: Path):
    local = resolve(str(tmp_path))
    with pytest.raises(UsageError, match="3 nodes") as info:
        ray_init.check_local_output(local, allow_local_output=False, node_count=lambda: 3)
    assert "--allow-local-output" in str(info.value)
    ray_init.check_local_output(local, allow_local_output=True, node_count=lambda: 3)
    ray_init.check_local_output(local, allow_local_output=False, node_count=lambda: 1)
    ray_init.check_local_output(
        resolve("s3://bucket/x"), allow_local_output=False, node_count=lambda: 3
    )


def test_init_ray_reuses_session_and_checks_output(ray_session: None, tmp_path: Path):
    parser = _parser()
    local_args = parser.parse_args(["--input", "in", "--output", str(tmp_path)])
    assert ray_init.init_ray(local_args) is False  # the test session's instance, one node
    assert ray_init.alive_node_count() == 1
    with pytest.raises(UsageError, match="2 nodes"):
        ray_init.init_ray(local_args, node_count=lambda: 2)
    s3_args = parser.parse_args(["--input", "in", "--output", "s3://bucket/out"])
    assert ray_init.init_ray(s3_args, node_count=lambda: 2) is False


def test_base_values_sit_under_the_file_and_flags(tmp_path: Path):
    """`base` (a demo's settings) merges field by field under the file, flags over both."""
    path = tmp_path / "cfg.yaml"
    path.write_text("crf: {sxy: 5}\n")
    args = _parser().parse_args(["--input", "a", "--output", "b", "--config", str(path)])
    base = {"name": "demo", "alpha": 3.0, "crf": {"iterations": 2, "sxy": 1.0}}
    cfg = build_config(StageConfig, args, {"alpha": 4.0}, base=base)
    assert cfg == StageConfig(alpha=4.0, name="demo", crf=CrfConfig(iterations=2, sxy=5.0))
    assert base == {"name": "demo", "alpha": 3.0, "crf": {"iterations": 2, "sxy": 1.0}}


def test_unused_shared_options_are_refused():
    args = _parser().parse_args(["--input", "a", "--output", "b", "--batch-size", "4"])
    cli.reject_unused(args, "demo", "actor_pool_size")  # not given: fine
    with pytest.raises(UsageError, match="--batch-size: has no effect on the demo stage"):
        cli.reject_unused(args, "demo", "actor_pool_size", "batch_size")
