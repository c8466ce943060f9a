"""Faults injected into a running pseudo-mask stage: a model actor's process killed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability import fault_tools as ft

pseudo_masks = pytest.importorskip("pipelines.pseudo_masks")
inputs = pytest.importorskip("tests.pipelines.pseudo_masks.inputs")
check_output = pytest.importorskip("tests.pipelines.pseudo_masks.test_stage").check_output

pytestmark = pytest.mark.slow

NUM_IMAGES = 24
ROWS_PER_GROUP = 2  # 12 units
ACTOR = "MapWorker(MapBatches(MaskPredictor))"


def _masks(out: Path) -> list[str]:
    masks = out / "masks"
    return sorted(p.name for p in masks.glob("*.png")) if masks.exists() else []


def test_pseudo_masks_survive_model_actor_killed(
    ray_session: None, tmp_path: Path, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="pseudo-masks: model actor process killed mid-stage",
        injected=(
            f"{NUM_IMAGES} images, one model actor; SIGKILL to the pid of the Ray Data actor "
            f"`ray::{ACTOR}` (found among this session's Ray processes) once 2 masks were "
            "written"
        ),
        checked=(
            "the stage completes (Ray Data restarts the actor and retries its batch); masks "
            "were still missing when the kill landed; inference ran in the killed process and "
            "in a new one; every image exactly once (one mask, one index row); the manifest "
            "lists exactly the data files on disk with their sizes"
        ),
    )
    rows = inputs.ingest_rows(NUM_IMAGES)
    ingest = str(tmp_path / "ingest")
    inputs.write_shard_output(ingest, rows, stage="ingest", rows_per_group=ROWS_PER_GROUP)
    checkpoint = inputs.make_checkpoint(str(tmp_path / "model" / "model.pt"))
    output = tmp_path / "pseudo"
    injector = ft.FaultInjector(
        ready=lambda: len(_masks(output)) >= 2,
        inject=lambda: ft.kill_first_worker(ACTOR),
        snapshot=lambda: _masks(output),
    )
    injector.start()
    lines: list[str] = []
    started = time.monotonic()
    result = pseudo_masks.run_pseudo_masks(
        ingest,
        str(output),
        checkpoint,
        pseudo_masks.PseudoMaskConfig(report_images=2),
        actor_pool_size=1,
        report=lines.append,
    )
    seconds = time.monotonic() - started
    injection = injector.stop()
    assert injection.error is None, injection.error
    assert injector.injected.is_set(), (
        f"no model actor was killed; Ray workers now: {ft.ray_workers('')}"
    )
    reliability.observe(
        f"killed {injection.target} at {injection.at_s:.1f} s with {len(injection.snapshot)} "
        f"of {NUM_IMAGES} masks written"
    )
    assert len(injection.snapshot) < NUM_IMAGES, "the kill came after the stage had finished"
    assert ft.wait_until_gone([injection.pid], timeout_s=10)
    assert result.ok, result.message
    actors = sorted(result.actor_memory_mb or {})
    assert any(a.endswith(f":{injection.pid}") for a in actors), actors
    assert len(actors) >= 2, f"no replacement actor ran inference: {actors}"
    ids = {r["image_id"] for r in rows}
    labels = {r["image_id"]: r["labels"] for r in rows}
    manifest = check_output(str(output), ids, labels)
    reliability.observe(
        f"stage completed in {seconds:.1f} s; inference ran in {len(actors)} actor processes "
        f"(the killed one and its replacement); {manifest.counts['output']} masks, one per "
        "image, all listed with their sizes"
    )
