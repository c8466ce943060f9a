"""A tampered refine output (what train reads): training stops with one line naming the row."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.train import main as train_main
from pipelines.io import manifest as mf
from pipelines.io import schema
from pipelines.io.storage import resolve
from pipelines.refine.rows import REFINE_SCHEMA
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES
from tests.pipelines.train.inputs import refine_rows
from tests.reliability.hostile_tools import one_error_line


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_train_stops_on_a_forged_seed_row(tmp_path: Path, capfd, reliability) -> None:
    reliability.case(
        kind="input",
        name="train: refine output with a forged seed row",
        injected=(
            "a committed refine output of 4 rows, one of whose seed PNG holds a class id absent "
            "from the row's image-level labels (refine never writes such a row: a tampered or "
            "foreign input); `jobs.train --model tiny --iterations 2 --max-failures 0` (with "
            "the default 3 retries the same error recurs on every attempt)"
        ),
        checked="exit 1 with one stderr line naming the row's image id and the problem; no "
        "model.pt and no _SUCCESS",
    )
    rows = refine_rows(4, height=64, width=80)
    forged = rows[1]
    absent = next(c for c in range(1, SYNTHETIC_CLASSES.num_classes) if c not in forged["labels"])
    seed = np.asarray(Image.open(io.BytesIO(forged[schema.SEED]))).copy()
    seed[:8, :8] = absent
    forged[schema.SEED] = _png(seed)
    source = resolve(str(tmp_path / "refine"))
    stage = mf.StageOutput.open(source, stage="refine", config={"forged": 1}, inputs=[])
    entry = mf.write_parquet(
        source, "shards/part-00000.parquet", pa.Table.from_pylist(rows, schema=REFINE_SCHEMA)
    )
    stage.commit(
        files=[entry],
        counts={"input": 4, "output": 4, "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )
    config = tmp_path / "fast.json"
    config.write_text('{"clip": {"input_size": 64}, "loss": {"resolution": 16}}')
    out = resolve(str(tmp_path / "train"))
    status = train_main(
        ["--input", source.uri, "--output", out.uri, "--model", "tiny", "--config", str(config),
         "--iterations", "2", "--batch-size", "2", "--num-workers", "1", "--max-failures", "0"]
    )  # fmt: skip
    line = one_error_line(capfd.readouterr().err)
    assert status == 1, line
    assert forged[schema.IMAGE_ID] in line and "absent from its labels" in line, line
    assert not out.fs.exists(out.join("model.pt")) and not out.fs.exists(out.join("_SUCCESS"))
    reliability.observe(f"stderr: {line[:300]}")
