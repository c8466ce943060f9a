"""`python -m jobs.pseudo_masks`: exit statuses, refusals before Ray, and an S3 end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import jobs.pseudo_masks as job
from pipelines.io import manifest as mf
from pipelines.io import schema
from pipelines.io.codecs import voc_palette
from pipelines.io.storage import resolve, write_bytes_atomic
from tests.pipelines.pseudo_masks.inputs import (
    HEIGHT,
    WIDTH,
    ingest_rows,
    make_checkpoint,
    make_malicious_checkpoint,
    write_shard_output,
)


@pytest.fixture
def no_ray(monkeypatch) -> list[str]:
    """Records any attempt of the job to start Ray."""
    calls: list[str] = []
    monkeypatch.setattr("pipelines.cli.init_ray", lambda *a, **k: calls.append("init_ray"))
    monkeypatch.setattr(job, "run_pseudo_masks", lambda *a, **k: calls.append("run_pseudo_masks"))
    return calls


def test_usage_errors_exit_2(tmp_path, capsys, no_ray) -> None:
    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert job.main(base) == 2  # no --checkpoint
    assert job.main([*base, "--checkpoint", "m.pt", "--scales", "1,x"]) == 2
    assert job.main([*base, "--checkpoint", "m.pt", "--splits", ","]) == 2
    config = tmp_path / "c.json"
    config.write_text('{"bilateral_srgb": -1}')
    assert job.main([*base, "--checkpoint", "m.pt", "--config", str(config)]) == 2
    assert "bilateral_srgb" in capsys.readouterr().err
    assert no_ray == []


def test_malicious_checkpoint_is_refused_before_ray(tmp_path, capsys, no_ray) -> None:
    write_shard_output(str(tmp_path / "ingest"), ingest_rows(2), stage="ingest")
    sentinel = tmp_path / "pwned"
    evil = make_malicious_checkpoint(str(tmp_path / "evil.pt"), str(sentinel))
    argv = ["--input", str(tmp_path / "ingest"), "--output", str(tmp_path / "out")]
    code = job.main([*argv, "--checkpoint", evil])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "refused" in err[0] and "weights_only=True" in err[0]
    assert not sentinel.exists()
    assert no_ray == []  # neither Ray nor the stage started
    assert not (tmp_path / "out").exists()


def test_missing_input_exits_1_with_one_line(tmp_path, capsys, no_ray) -> None:
    checkpoint = make_checkpoint(str(tmp_path / "model.pt"))
    argv = ["--input", str(tmp_path / "none"), "--output", str(tmp_path / "out")]
    assert job.main([*argv, "--checkpoint", checkpoint]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete" in err[0]
    assert no_ray == []


@pytest.mark.slow
def test_s3_end_to_end_and_rerun(tmp_path, capsys, s3_bucket, ray_session) -> None:
    rows = ingest_rows(6, val=1)
    write_shard_output(f"{s3_bucket}/ingest", rows, stage="ingest", rows_per_group=2)
    local = make_checkpoint(str(tmp_path / "model.pt"))
    bucket = resolve(s3_bucket)
    write_bytes_atomic(bucket, "train/model.pt", open(local, "rb").read())
    argv = [
        "--input", f"{s3_bucket}/ingest", "--output", f"{s3_bucket}/pseudo",
        "--checkpoint", f"{s3_bucket}/train/model.pt", "--report-images", "2",
    ]  # fmt: skip
    assert job.main(argv) == 0, capsys.readouterr().err
    out = resolve(f"{s3_bucket}/pseudo")
    manifest = mf.read_manifest(out)
    train = {r[schema.IMAGE_ID] for r in rows if r[schema.SPLIT] == "train"}
    sizes = {
        path[len(out.path) + 1 :]: info["size"]
        for path, info in out.fs.find(out.path, detail=True).items()
    }
    listed = {f.path: f.bytes for f in manifest.files}
    data_dirs = ("masks", "shards", "quarantine", "report")
    assert {p: s for p, s in sizes.items() if p.split("/")[0] in data_dirs} == listed
    assert {p[6:-4] for p in listed if p.startswith("masks/")} == train
    assert manifest.counts == {
        "input": 6,
        "selected": 5,
        "skipped": 1,
        "output": 5,
        "quarantined": 0,
    }
    labels = {r[schema.IMAGE_ID]: set(r[schema.LABELS]) for r in rows}
    for image_id in train:
        with out.fs.open(out.join(f"masks/{image_id}.png"), "rb") as f, Image.open(f) as png:
            assert png.mode == "P" and png.size == (WIDTH, HEIGHT)
            assert png.getpalette()[:768] == voc_palette()
            assert set(np.unique(np.array(png)).tolist()) <= {0} | labels[image_id]
    assert json.loads(out.fs.cat_file(out.join("manifest.json")))["metrics"]["pseudo_masks"]
    assert "pseudo_masks: 5 masks" in capsys.readouterr().out
    assert job.main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_released_checkpoint_runs_like_an_export(tmp_path, capsys, ray_session) -> None:
    # The same weights as train's export (with the released forward) and in the released
    # layout (`--released-config` gives the architecture): the same masks, the file's digest.
    import hashlib

    import torch

    from pipelines.train.export import export_model
    from tests.pipelines.pseudo_masks.inputs import CLASS_NAMES, tiny_config
    from weakclip.build import build_weakclip
    from weakclip.config import released_forward, to_dict
    from weakclip.released import to_released

    rows = ingest_rows(3)
    write_shard_output(str(tmp_path / "ingest"), rows, stage="ingest", rows_per_group=2)
    torch.manual_seed(0)
    config = released_forward(tiny_config())
    model = build_weakclip(config, CLASS_NAMES)
    export = str(tmp_path / "model.pt")
    export_model(
        export, model=model, config=config, class_names=CLASS_NAMES, clip_source=None,
        clip_sha256="random", iteration=0,
    )  # fmt: skip
    released = tmp_path / "released.pth"
    meta = {"CLASSES": tuple(CLASS_NAMES), "iter": 8000}
    torch.save({"meta": meta, "state_dict": to_released(model.state_dict())}, released)
    architecture = tmp_path / "architecture.json"
    architecture.write_text(json.dumps(to_dict(tiny_config())))
    argv = ["--input", str(tmp_path / "ingest"), "--report-images", "0"]
    out_export, out_released = tmp_path / "from-export", tmp_path / "from-released"
    assert job.main([*argv, "--output", str(out_export), "--checkpoint", export]) == 0
    code = job.main(
        [*argv, "--output", str(out_released), "--checkpoint", str(released),
         "--released-config", str(architecture)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    checkpoint = json.loads((out_released / "manifest.json").read_text())["checkpoint"]
    assert checkpoint["sha256"] == hashlib.sha256(released.read_bytes()).hexdigest()
    assert checkpoint["layout"] == "released" and checkpoint["iteration"] == 8000
    for row in rows:
        name = f"masks/{row[schema.IMAGE_ID]}.png"
        with Image.open(out_export / name) as a, Image.open(out_released / name) as b:
            np.testing.assert_array_equal(np.array(a), np.array(b))
