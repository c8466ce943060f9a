"""A flaky object store: ingest, refine, pseudo masks and evaluate through a loopback proxy
that cuts a tenth of the connections' traffic give the same rows and metrics as a clean run;
with the store gone for good mid-stage, the stage fails without `_SUCCESS`."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.io.manifest import Manifest, read_manifest
from pipelines.io.storage import StorageOptions, resolve
from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks
from pipelines.refine import RefineConfig, run_refine
from pipelines.synthetic.dataset import write_dataset
from tests.flaky_proxy import FlakyProxy
from tests.pipelines.pseudo_masks.inputs import make_checkpoint
from tests.s3server import S3Server

pytestmark = pytest.mark.slow

NUM_IMAGES, HEIGHT, WIDTH = 12, 96, 128
STAGES = ("ingest", "refine", "pseudo_masks", "evaluate")
quiet = dict(report=lambda _: None)


@pytest.fixture
def dataset(s3_bucket: str) -> str:
    data = resolve(f"{s3_bucket}/flaky-data")
    write_dataset(data.fs, data.path, num_images=NUM_IMAGES, seed=7, height=HEIGHT, width=WIDTH)
    return data.uri


def _chain(data: str, root: str, storage: StorageOptions, checkpoint: str) -> dict[str, Any]:
    """Every data stage once through `storage`; the manifests and evaluate's metrics."""
    at = {stage: f"{root}/{stage}" for stage in STAGES}
    ingest = IngestConfig(splits=("train.txt", "val.txt"), rows_per_group=2)
    assert run_ingest(data, at["ingest"], ingest, storage=storage, **quiet).ok
    refine = RefineConfig(rows_per_unit=2)  # many units, many requests
    assert run_refine(at["ingest"], at["refine"], refine, storage=storage, **quiet).ok
    masks = PseudoMaskConfig(scales=(1.0,), flip=False, report_images=0)
    assert run_pseudo_masks(
        at["refine"], at["pseudo_masks"], checkpoint, masks, storage=storage, **quiet
    ).ok
    metrics = run_evaluate(
        at["pseudo_masks"], at["refine"], at["evaluate"], EvaluateConfig(), storage=storage,
        **quiet,
    )  # fmt: skip
    return {"manifests": {s: read_manifest(resolve(at[s])) for s in STAGES}, "metrics": metrics}


def _data_files(manifest: Manifest) -> dict[str, bytes]:
    loc = manifest.location
    return {f.path: loc.fs.cat_file(loc.join(f.path)) for f in manifest.files}


def test_stages_through_a_store_dropping_a_tenth_of_the_traffic(
    ray_session: None,
    s3_server: S3Server,
    s3_bucket: str,
    dataset: str,
    tmp_path: Path,
    reliability,
) -> None:
    reliability.case(
        kind="fault",
        name="ingest, refine, pseudo masks, evaluate: store dropping 10% of the traffic",
        injected=(
            "every stage run against a loopback proxy in front of the S3 server that closes "
            "the connection instead of forwarding, for 10% of the chunks clients send "
            "(requests lost mid-flight, uploads cut halfway); the same chain run directly "
            "against the server"
        ),
        checked=(
            "every stage commits; the same files (every byte) and counts in each stage as "
            "the clean run, the same evaluate metrics (all but the inputs' URIs); "
            "connections were really dropped"
        ),
    )
    checkpoint = make_checkpoint(str(tmp_path / "model.pt"))
    direct = StorageOptions(endpoint_url=s3_server.endpoint_url)
    clean = _chain(dataset, f"{s3_bucket}/clean", direct, checkpoint)
    proxy = FlakyProxy(s3_server.port, drop=0.1, seed=1)
    started = time.monotonic()
    try:
        flaky = _chain(
            dataset, f"{s3_bucket}/flaky", StorageOptions(endpoint_url=proxy.endpoint_url),
            checkpoint,
        )  # fmt: skip
    finally:
        proxy.gone()
    seconds = time.monotonic() - started
    assert proxy.dropped > 0, "no connection was dropped: the fault did not land"
    for stage in STAGES:
        ours, theirs = flaky["manifests"][stage], clean["manifests"][stage]
        assert ours.counts == theirs.counts, stage
        files, expected = _data_files(ours), _data_files(theirs)
        if stage == "evaluate":  # its metrics name the inputs' URIs: compared below
            assert files.pop("metrics.json") and expected.pop("metrics.json")
        assert files == expected, f"{stage}: files differ from the clean run"
    where = ("prediction", "ground_truth")
    assert {k: v for k, v in flaky["metrics"].items() if k not in where} == {
        k: v for k, v in clean["metrics"].items() if k not in where
    }
    reliability.observe(
        f"{proxy.dropped} of {proxy.dropped + proxy.forwarded} client chunks dropped; the "
        f"flaky chain took {seconds:.1f} s; counts and mIoU "
        f"{100 * flaky['metrics']['miou']:.2f} identical to the clean run"
    )


def test_a_store_gone_for_good_fails_the_stage_without_success(
    ray_session: None, s3_server: S3Server, s3_bucket: str, dataset: str, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="refine: object store gone for good mid-stage",
        injected=(
            "refine through the loopback proxy (botocore: 2 attempts per request); the proxy "
            "stops for good once the first unit's completion record is on the server"
        ),
        checked="refine raises a storage error; no `_SUCCESS` and no manifest on the server",
    )
    direct = StorageOptions(endpoint_url=s3_server.endpoint_url)
    ingest = f"{s3_bucket}/gone/ingest"
    config = IngestConfig(splits=("train.txt", "val.txt"), rows_per_group=1)
    assert run_ingest(dataset, ingest, config, storage=direct, **quiet).ok
    proxy = FlakyProxy(s3_server.port, drop=0.0)
    output = resolve(f"{s3_bucket}/gone/refine", direct)
    failure: list[BaseException] = []

    def refine() -> None:
        storage = StorageOptions(endpoint_url=proxy.endpoint_url, max_attempts=2)
        try:
            run_refine(ingest, output.uri, RefineConfig(rows_per_unit=1), storage=storage, **quiet)
        except BaseException as error:  # noqa: BLE001  (what the stage raised is the result)
            failure.append(error)

    started = time.monotonic()
    thread = threading.Thread(target=refine)
    thread.start()
    while not output.fs.glob(output.join("_units") + "/*.json"):
        assert thread.is_alive(), f"refine ended before the fault: {failure}"
        assert time.monotonic() - started < 300, "no unit finished in 300 s"
        time.sleep(0.05)
    proxy.gone()
    gone_at = time.monotonic() - started
    thread.join(timeout=600)
    assert not thread.is_alive(), "refine still running 600 s after the store went away"
    assert failure, "refine finished although its store was gone"
    assert not output.fs.exists(output.join("_SUCCESS"))
    assert not output.fs.exists(output.join("manifest.json"))
    reliability.observe(
        f"store gone at {gone_at:.1f} s; refine failed {time.monotonic() - started - gone_at:.1f} "
        f"s later with {type(failure[0]).__name__}; no _SUCCESS, no manifest"
    )
