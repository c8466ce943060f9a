"""`python -m jobs.train`: exit statuses, and a smoke run through `main([...])`."""

from __future__ import annotations

import pytest
import torch

from jobs.train import main
from pipelines.io import manifest as mf
from pipelines.io.storage import resolve
from pipelines.train.export import load_exported_model
from tests.pipelines.train.inputs import make_refine_input


def test_usage_errors_exit_2(tmp_path, capsys) -> None:
    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "tiny"]
    assert main([*base, "--batch-size", "3", "--num-workers", "2"]) == 2
    assert "multiple of num_workers" in capsys.readouterr().err
    assert main([*base, "--iterations", "0"]) == 2
    assert main([*base, "--model", "huge"]) == 2
    assert main([*base, "--profile", "mine"]) == 2
    capsys.readouterr()
    assert main([*base, "--resource-wait-s", "-1"]) == 2
    assert "resource_wait_s" in capsys.readouterr().err


def test_missing_input_exits_1_with_one_line(tmp_path, capsys, ray_session) -> None:
    code = main(["--input", str(tmp_path / "none"), "--output", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete" in err[0]


@pytest.mark.slow
def test_train_job_smoke_and_rerun(tmp_path, capsys, ray_session) -> None:
    make_refine_input(str(tmp_path / "refine"), count=8, val=0)
    config = tmp_path / "fast.json"
    config.write_text('{"clip": {"input_size": 64}, "loss": {"resolution": 16}}')
    argv = [
        "--input", str(tmp_path / "refine"), "--output", str(tmp_path / "train"),
        "--model", "tiny", "--config", str(config), "--iterations", "2", "--batch-size", "2",
        "--num-workers", "2", "--log-every", "1", "--checkpoint-every", "2",
        "--profile", "released",  # every released-code behaviour on (docs/METHOD.md)
    ]  # fmt: skip
    assert main(argv) == 0
    manifest = mf.read_manifest(resolve(str(tmp_path / "train")))
    assert manifest.stage == "train" and manifest.counts["iterations"] == 2
    model_config = manifest.config["model"]
    assert model_config["clip"]["class_embedding_twice"]
    assert not model_config["adapter"]["trainable"]
    assert model_config["loss"]["boundary_image_resize"] == "nearest"
    model = load_exported_model(str(tmp_path / "train" / "model.pt"))
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 7, 16, 16)
    report = tmp_path / "train" / "report"
    assert f"report: {report.as_uri()}/index.html" in capsys.readouterr().out
    assert "Training curves" in (report / "index.html").read_text()
    assert (report / "curves-train.png").stat().st_size > 0
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
