"""`python -m jobs.retrain`: exit statuses, waiting, and one run through `main([...])`."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from jobs.retrain import main
from pipelines.io import manifest as mf
from pipelines.io.storage import resolve
from pipelines.retrain.model import build_model, load_retrained_model, logits
from pipelines.training.tensorboard import segment_name
from tests.pipelines.retrain.inputs import make_inputs


def test_usage_errors_exit_2(tmp_path, capsys) -> None:
    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert main([*base, "--batch-size", "2", "--num-workers", "2"]) == 2
    assert "at least 2 images" in capsys.readouterr().err
    assert main([*base, "--iterations", "0"]) == 2
    assert main([*base, "--architecture", "vgg16"]) == 2


def test_wait_timeout_exits_1_with_one_line(tmp_path, capsys) -> None:
    code = main(
        ["--input", str(tmp_path / "pending"), "--output", str(tmp_path / "out"),
         "--wait-timeout", "0.3"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no _SUCCESS after 0.3 s" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_retrain_job_trains_scores_reruns_and_resumes(tmp_path, capsys, ray_session) -> None:
    inputs = make_inputs(str(tmp_path), train=6, val=3, indexed_val=1, height=64, width=80)
    lost = inputs.train_ids[0]
    os.remove(tmp_path / "pseudo_masks" / "masks" / f"{lost}.png")  # listed, but gone
    weights = tmp_path / "backbone.pt"
    torch.save(build_model("small", 3).backbone.state_dict(), weights)
    argv = [
        "--input", str(tmp_path / "pseudo_masks"), "--output", str(tmp_path / "out"),
        "--iterations", "4", "--batch-size", "4", "--num-workers", "2", "--crop-size", "64",
        "--log-every", "2", "--checkpoint-every", "2", "--wait-timeout", "0",
        "--backbone-weights", str(weights),
    ]  # fmt: skip
    assert main(argv) == 0
    report = tmp_path / "out" / "report"
    assert f"report: {report.as_uri()}/index.html" in capsys.readouterr().out
    assert "retrained model" in (report / "index.html").read_text()
    assert (report / "curves-retrain.png").stat().st_size > 0
    out = resolve(str(tmp_path / "out"))
    manifest = mf.read_manifest(out)
    assert manifest.stage == "retrain"
    files = {f.path for f in manifest.files}
    events = {f for f in files if f.startswith("tensorboard/events.out.tfevents.")}
    assert events == {f"tensorboard/{segment_name(i)}" for i in (2, 4)}  # one per checkpoint
    assert files - events == {"model.pt", "metrics.json", "quarantine/masks.parquet"}
    assert manifest.counts["quarantined"] == 1 and manifest.counts["train_images"] == 6
    assert manifest.inputs[0].manifest_sha256 == inputs.pseudo.sha256
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # The val image that has a pseudo mask was trained on, so it is not scored.
    assert metrics["num_val_images"] == len(inputs.val_ids) == 2
    assert metrics["num_train_images"] == 6 and metrics["quarantined"] == 1
    assert 0.0 <= metrics["miou"] <= 1.0 and 0 < metrics["num_pixels"] < 2 * 64 * 80
    assert set(metrics["per_class_iou"]) == set(manifest.class_names)
    assert [row["iteration"] for row in metrics["history"]] == [2, 4]
    assert metrics["final_loss"] == metrics["history"][-1]["loss"]
    assert manifest.metrics is not None and manifest.metrics["miou"] == metrics["miou"]
    assert metrics["backbone_weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    model, names = load_retrained_model(str(tmp_path / "out" / "model.pt"))
    assert names == list(manifest.class_names)
    with torch.no_grad():
        assert logits(model, torch.randn(1, 3, 64, 80)).shape == (1, 7, 64, 80)

    capsys.readouterr()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main([*argv, "--lr", "0.01"]) == 1
    assert "different run" in capsys.readouterr().err
    longer = [*argv, "--iterations", "6"]  # the last flag wins
    assert main(longer) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*longer, "--resume"]) == 0
    assert "resumed from iteration 4" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [row["iteration"] for row in metrics["history"]] == [2, 4, 6]
    assert mf.read_manifest(out).extra["iterations"] == 6
