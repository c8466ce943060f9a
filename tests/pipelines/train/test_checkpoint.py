"""Checkpoint round trips and the self-contained model.pt export (no Ray)."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipelines.train import export
from pipelines.train.loop import freeze_dead_layers
from pipelines.training import checkpoint as ckpt
from pipelines.training.worker import Schedule, lr_at
from weakclip.build import build_weakclip
from weakclip.config import TrainConfig, from_dict, preset, to_dict

NAMES = ["background", "disc", "square"]


def _config(train_image_encoder: bool = False):
    clip = {"input_size": 64, "train_image_encoder": train_image_encoder}
    return from_dict({"clip": clip, "loss": {"resolution": 16}}, base=preset("tiny"))


def _trained_model(config):
    torch.manual_seed(0)
    model = build_weakclip(config, NAMES)
    frozen = ckpt.frozen_parameter_names(model)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    scheduler = Schedule.of(config.train).scheduler(optimizer)
    images = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        optimizer.zero_grad()
        out = model(images)
        (out.logits.square().mean() + out.score_map.mean()).backward()
        optimizer.step()
        scheduler.step()
    return model.eval(), frozen, optimizer, scheduler, images


@pytest.mark.parametrize("train_image_encoder", [False, True], ids=["frozen", "image-trained"])
def test_checkpoint_round_trip_restores_everything(tmp_path, train_image_encoder: bool) -> None:
    config = _config(train_image_encoder)
    model, frozen, optimizer, scheduler, images = _trained_model(config)
    meta = {"config": to_dict(config), "class_names": NAMES, "clip_weights": {}, "signature": {}}
    rows = [{"iteration": 1, "loss": 2.0}, {"iteration": 2, "loss": 1.5}]
    ckpt.save_checkpoint(
        str(tmp_path),
        model=model,
        frozen=frozen,
        optimizer=optimizer,
        scheduler=scheduler,
        iteration=2,
        meta=meta,
        metrics=rows,
        include_clip=True,
    )
    assert ckpt.read_meta(str(tmp_path))["iteration"] == 2
    assert ckpt.read_metrics(str(tmp_path)) == rows
    state = ckpt.read_train_state(str(tmp_path))
    assert not set(state["model"]) & frozen  # CLIP is not in the trainable state
    trained_encoder = {n for n in state["model"] if n.startswith("image_encoder.")}
    assert bool(trained_encoder) == train_image_encoder  # ... but a trained image encoder is
    assert set(ckpt.read_clip_state(str(tmp_path))) == frozen
    # A fresh model from another seed gets back every weight.
    restored = export.load_checkpoint_model(str(tmp_path), clip_weights=None)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).logits, model(images).logits)
    optimizer2 = torch.optim.AdamW(restored.trainable_parameters(), lr=1e-3)
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2 = Schedule.of(config.train).scheduler(optimizer2)
    scheduler2.load_state_dict(state["scheduler"])
    assert scheduler2.last_epoch == 2


def test_checkpoint_without_clip_needs_the_weights_file(tmp_path) -> None:
    config = _config()
    model, frozen, optimizer, scheduler, _ = _trained_model(config)
    ckpt.save_checkpoint(
        str(tmp_path),
        model=model,
        frozen=frozen,
        optimizer=optimizer,
        scheduler=scheduler,
        iteration=2,
        meta={"config": to_dict(config), "class_names": NAMES},
        metrics=[],
        include_clip=False,
    )
    assert ckpt.read_clip_state(str(tmp_path)) is None
    with pytest.raises(ValueError, match="CLIP weights"):
        export.load_checkpoint_model(str(tmp_path), clip_weights=None)


def test_export_loads_with_weights_only_and_reproduces_logits(tmp_path) -> None:
    config = _config()
    model, _, _, _, images = _trained_model(config)
    path = str(tmp_path / "model.pt")
    export.export_model(
        path,
        model=model,
        config=config,
        class_names=NAMES,
        clip_source=None,
        clip_sha256="0" * 64,
        iteration=2,
    )
    payload = torch.load(path, weights_only=True)
    assert payload["class_names"] == NAMES and payload["config"] == to_dict(config)
    assert set(payload["state_dict"]) == set(model.state_dict())
    loaded = export.load_exported_model(path)
    assert loaded.class_names == tuple(NAMES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits)


def test_export_refuses_foreign_files(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "weakclip-export-v1", "x": object()}, handle)
    with pytest.raises(Exception):  # noqa: B017 - torch's unpickler error type varies
        export.load_exported_model(str(path))
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a WeakCLIP export"):
        export.load_exported_model(str(tmp_path / "other.pt"))


def test_lr_schedule_warmup_and_cosine() -> None:
    kwargs = {"lr": 1e-4, "min_lr": 1e-6, "warmup": 10, "total": 100}
    assert lr_at(0, **kwargs) == pytest.approx(1e-5)
    assert lr_at(9, **kwargs) == pytest.approx(1e-4)
    assert lr_at(10, **kwargs) == pytest.approx(1e-4)
    assert lr_at(55, **kwargs) == pytest.approx((1e-4 + 1e-6) / 2)
    assert lr_at(100, **kwargs) == pytest.approx(1e-6)
    values = [lr_at(i, **kwargs) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_a_constant_schedule_keeps_the_peak_rate() -> None:
    train = TrainConfig(iterations=50, lr=1e-3, warmup_iterations=20, lr_schedule="constant")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = Schedule.of(train).scheduler(optimizer)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-3] * 50)


def test_unchained_co_attention_dead_layers_are_frozen() -> None:
    config = from_dict({"co_attention": {"chain_layers": False}}, base=_config())
    model = build_weakclip(config, NAMES)
    frozen = freeze_dead_layers(model, config)
    assert frozen and all(".2." not in name for name in frozen)  # the last layer trains
    out = model(torch.randn(1, 3, 64, 64))
    (out.logits.mean() + out.score_map.mean()).backward()
    # Every parameter still trainable receives a gradient: DDP needs no unused-parameter scan.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert freeze_dead_layers(build_weakclip(_config(), NAMES), _config()) == []
