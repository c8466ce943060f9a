"""Ray Train end to end on CPU (tiny model, 2 workers, gloo) against the loopback S3 server.

One training run carries several checks, because each `fit` costs tens of seconds on 2 cores:
loss falls, checkpoints land on S3, an injected worker failure is recovered through
FailureConfig, model.pt reproduces the checkpointed model, and a resumed run continues from
the saved iteration.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines.io import manifest as mf
from pipelines.io.storage import resolve
from pipelines.train import TrainJobConfig, TrainRefused, export, run_train
from pipelines.train.data import prepare_row
from pipelines.training.augment import denormalize, row_seed
from pipelines.training.data import epochs_needed
from pipelines.training.run import FAIL_ENV, FAIL_MARKER_ENV, latest_checkpoint_iteration
from pipelines.training.tensorboard import segment_name
from tests.pipelines.train.inputs import make_refine_input, refine_rows
from tests.pipelines.training.test_tensorboard import scalars
from weakclip.config import from_dict, preset

FAST = {"clip": {"input_size": 128}, "loss": {"resolution": 32}}


def _model(iterations: int, **train):
    return from_dict(
        {**FAST, "train": {"iterations": iterations, "batch_size": 4, "lr": 1e-3, **train}},
        base=preset("tiny"),
    )


def test_prepare_row_is_deterministic_and_validates() -> None:
    row = refine_rows(1)[0]
    config = _model(10)
    from pipelines.train.data import augment_config_for

    kwargs = dict(
        image_id=row["image_id"],
        image_bytes=row["image"],
        seed_bytes=row["seed"],
        labels=row["labels"],
        height=row["height"],
        width=row["width"],
        num_classes=7,
        augment=augment_config_for(config),
        loss_resolution=32,
    )
    a = prepare_row(rng=np.random.default_rng(row_seed(1, 0, row["image_id"])), **kwargs)
    b = prepare_row(rng=np.random.default_rng(row_seed(1, 0, row["image_id"])), **kwargs)
    c = prepare_row(rng=np.random.default_rng(row_seed(1, 1, row["image_id"])), **kwargs)
    assert a["image"].shape == (3, 128, 128) and a["seed"].shape == (128, 128)
    assert a["crf_image"].shape == (32, 32, 3) and a["crf_image"].dtype == np.uint8
    assert a["class_mask"].tolist() == [i == 0 or i in row["labels"] for i in range(7)]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])  # another epoch, another draw
    with pytest.raises(ValueError, match="outside"):
        prepare_row(rng=np.random.default_rng(0), **{**kwargs, "labels": [9]})
    with pytest.raises(ValueError, match="absent from its labels"):
        other = [c for c in range(1, 7) if c not in row["labels"]][0]
        prepare_row(rng=np.random.default_rng(0), **{**kwargs, "labels": [other]})
    assert epochs_needed(rows=8, batch_size=4, start_iteration=0, iterations=10) == 6
    # D9: the released boundary CRF image point-samples the crop at truncated coordinates.
    rng = row_seed(1, 0, row["image_id"])
    near = prepare_row(rng=np.random.default_rng(rng), **kwargs, crf_resize="nearest")
    crop = denormalize(near["image"], mean=kwargs["augment"].mean, std=kwargs["augment"].std)
    picks = np.arange(32) * 128 // 32  # 0, 4, 8, ...
    np.testing.assert_array_equal(near["crf_image"], crop[picks][:, picks])
    assert not np.array_equal(near["crf_image"], a["crf_image"])  # bilinear averages 4 x 4


@pytest.mark.slow
def test_train_on_s3_recovers_from_failure_and_resumes(
    ray_session, s3_bucket, tmp_path, monkeypatch
) -> None:
    source = f"{s3_bucket}/refine"
    make_refine_input(source, count=18, val=2)
    output = f"{s3_bucket}/train"
    monkeypatch.setenv(FAIL_ENV, "10")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "failed-once"))
    config = TrainJobConfig(
        input=source,
        output=output,
        model=_model(16),
        num_workers=2,
        checkpoint_every=8,
        log_every=2,
        max_failures=1,
    )
    result = run_train(config)
    assert (tmp_path / "failed-once").exists()  # the failure did happen, and was recovered
    assert result.start_iteration == 0 and result.iterations == 16

    out = resolve(output)
    manifest = mf.read_manifest(out)
    assert manifest.stage == "train" and manifest.extra["iterations"] == 16
    files = {f.path for f in manifest.files}
    events = {f for f in files if f.startswith("tensorboard/events.out.tfevents.")}
    # The tensorboard extra is part of the test extra: one segment per checkpoint report (8, 16)
    # at least; the one the failed attempt wrote past 8 is gone (each iteration once, below).
    assert {"tensorboard/" + segment_name(8), "tensorboard/" + segment_name(16)} <= events
    assert files - events == {"model.pt", "metrics.jsonl"}
    assert manifest.class_names[0] == "background" and len(manifest.class_names) == 7
    # Checkpoints are objects on the S3 server.
    checkpoints = out.fs.glob(out.join("checkpoints/run/checkpoint_*/meta.json"))
    assert checkpoints, "no checkpoint on S3"
    assert latest_checkpoint_iteration(out) == 16

    rows = [
        __import__("json").loads(line)
        for line in out.fs.cat_file(out.join("metrics.jsonl")).decode().splitlines()
    ]
    assert [r["iteration"] for r in rows] == list(range(2, 17, 2))  # no gap, no duplicate
    out.fs.get(out.join("tensorboard") + "/", str(tmp_path / "tb"), recursive=True)
    logged = scalars(tmp_path / "tb", "loss/loss")
    assert [step for step, _ in logged] == list(range(2, 17, 2))
    assert [value for _, value in logged] == pytest.approx([r["loss"] for r in rows])
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < first, (first, last)
    assert all(r["crf_wait_s"] >= 0 and r["images_per_s"] > 0 for r in rows)

    # model.pt: weights_only, and the same logits as the last checkpoint's model.
    local = tmp_path / "model.pt"
    out.fs.get_file(out.join("model.pt"), str(local))
    torch.load(local, weights_only=True)
    exported = export.load_exported_model(str(local))
    latest = sorted(checkpoints)[-1].rsplit("/", 1)[0]
    ckpt_dir = tmp_path / "ckpt"
    out.fs.get(latest + "/", str(ckpt_dir), recursive=True)
    from_checkpoint = export.load_checkpoint_model(str(ckpt_dir), clip_weights=None)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(exported(images).logits, from_checkpoint(images).logits)

    # Re-running the same config: nothing to do. More iterations without --resume: refused.
    monkeypatch.delenv(FAIL_ENV)
    assert run_train(config).skipped
    longer = TrainJobConfig(**{**config.__dict__, "model": _model(18)})
    with pytest.raises(TrainRefused, match="--resume"):
        run_train(longer)
    # A changed setting (not iterations) is refused even with --resume.
    changed = TrainJobConfig(**{**config.__dict__, "model": _model(18, lr=5e-4), "resume": True})
    with pytest.raises(mf.StageConflictError, match="config differs"):
        run_train(changed)

    # --resume extends the finished run from its last checkpoint, not from 0.
    messages: list[str] = []
    resumed = run_train(TrainJobConfig(**{**longer.__dict__, "resume": True}), log=messages.append)
    assert "resumed from iteration 16" in messages
    assert resumed.start_iteration == 16 and resumed.iterations == 18
    rows = [
        __import__("json").loads(line)
        for line in out.fs.cat_file(out.join("metrics.jsonl")).decode().splitlines()
    ]
    assert [r["iteration"] for r in rows] == list(range(2, 19, 2))
    assert mf.read_manifest(out).extra["iterations"] == 18
    assert os.environ.get(FAIL_ENV) is None
