"""The S3 secret key never appears in what a run prints, writes or logs.

Runs `jobs.refine` against the loopback S3 server (credentials from the environment, as in
production): one successful run and several failures whose messages name storage locations,
with and without `--debug` tracebacks; then scans stdout/stderr, every object the runs wrote
and every file of the Ray session's log directory for the secret. A credential pasted into a
URI (`s3://KEY:SECRET@bucket/...`, an endpoint URL with userinfo) is refused without echoing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.refine import main as refine_main
from pipelines.io.storage import Location, resolve
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.reliability import hostile
from tests.reliability.hostile_tools import one_error_line, write_ingest_output

pytestmark = pytest.mark.usefixtures("ray_session")

URI_SECRET = "pasted-uri-secret-0123456789"  # a credential a user put into a URI by mistake
_MAX_LOG_BYTES = 64 * 1024 * 1024


def _objects(loc: Location) -> dict[str, bytes]:
    """Every object below `loc` (path -> bytes)."""
    return {path: loc.fs.cat_file(path) for path in loc.fs.find(loc.path)}


def _ray_log_files() -> list[Path]:
    import ray._private.worker as worker

    node = worker._global_node
    assert node is not None, "no Ray session in this process"
    return [p for p in Path(node.get_logs_dir_path()).rglob("*") if p.is_file()]


def _containing(paths: list[Path], needle: bytes) -> list[str]:
    hits = []
    for path in paths:
        try:
            if path.stat().st_size > _MAX_LOG_BYTES:
                continue
            if needle in path.read_bytes():
                hits.append(str(path))
        except OSError:  # a log rotated away meanwhile
            continue
    return hits


def test_secret_never_printed_written_or_logged(s3_bucket: str, capfd, reliability) -> None:
    reliability.case(
        kind="input",
        name="S3 credentials never leak into output, errors, manifests or Ray logs",
        injected=(
            "`jobs.refine` against the loopback S3 server with credentials in the environment: "
            "a successful run (one row quarantined), then failures naming storage locations: "
            "a missing input, an output bucket that does not exist (with a --debug traceback), "
            "an input URI with `KEY:SECRET@`, an endpoint URL with userinfo"
        ),
        checked=(
            "the secret access key is absent from stdout/stderr of every run, from every object "
            "the runs wrote (manifest, run record, shards, quarantine, unit records) and from "
            "every file of the Ray session's log directory; the pasted URI secret is never "
            "echoed; failures exit 1 (storage) or 2 (usage) with one line"
        ),
    )
    secret = S3_SECRET_KEY.encode()
    rows = hostile.good_ingest_rows(3)
    rows.append(hostile.bad_ingest_rows(num_classes=SYNTHETIC_CLASSES.num_classes)[0].row)
    source = resolve(f"{s3_bucket}/ingest")
    write_ingest_output(source, [rows])
    out = resolve(f"{s3_bucket}/refine")
    printed: list[str] = []

    def run(argv: list[str], expected: int) -> str:
        status = refine_main(argv)
        captured = capfd.readouterr()
        printed.append(captured.out + captured.err)
        assert status == expected, captured.err[-2000:]
        return captured.err

    run(["--input", source.uri, "--output", out.uri, "--max-error-fraction", "1"], 0)
    written = _objects(out)
    assert any(path.endswith("_SUCCESS") for path in written)
    assert any("/quarantine/" in path for path in written)
    leaks = sorted(path for path, data in written.items() if secret in data)
    assert not leaks, leaks
    reliability.observe(f"successful run: {len(written)} objects written, none hold the secret")

    failures = {
        "missing input": (
            ["--input", f"{s3_bucket}/no-such-run", "--output", f"{s3_bucket}/x"],
            1,
        ),
        "output bucket missing (--debug)": (
            ["--input", source.uri, "--output", "s3://no-such-bucket-weakclip/x", "--debug"],
            1,
        ),
        "credentials in the input URI": (
            [
                "--input",
                f"s3://{S3_ACCESS_KEY}:{URI_SECRET}@{s3_bucket[5:]}/ingest",
                "--output",
                f"{s3_bucket}/z",
            ],
            2,
        ),
        "credentials in the endpoint URL": (
            [
                "--input",
                source.uri,
                "--output",
                f"{s3_bucket}/z",
                "--storage-endpoint",
                f"http://{S3_ACCESS_KEY}:{URI_SECRET}@127.0.0.1:9",
            ],
            2,
        ),
    }
    for label, (argv, expected) in failures.items():
        err = run(argv, expected)
        line = one_error_line(err)
        assert URI_SECRET not in err, (label, err[-500:])
        if "endpoint URL" in label:
            assert "--storage-endpoint" in line, line
        reliability.observe(f"{label}: exit {expected}, `{line[:200]}`")

    text = "\n".join(printed)
    assert S3_SECRET_KEY not in text
    assert URI_SECRET not in text
    logs = _ray_log_files()
    hits = _containing(logs, secret) + _containing(logs, URI_SECRET.encode())
    assert not hits, hits
    reliability.observe(
        f"{len(printed)} runs, {len(text)} characters printed, {len(logs)} Ray log files "
        f"scanned: the secret appears nowhere"
    )
