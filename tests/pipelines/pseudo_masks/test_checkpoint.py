"""The pseudo-mask checkpoint: weights_only loading, refusals, digest check (no Ray)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipelines.pseudo_masks.checkpoint import CheckpointRefused, build_model, verify_checkpoint
from tests.pipelines.pseudo_masks.inputs import (
    CLASS_NAMES,
    make_checkpoint,
    make_malicious_checkpoint,
)


def test_export_format_matches_the_train_export() -> None:
    from pipelines.pseudo_masks import checkpoint as pseudo_checkpoint
    from pipelines.train import export

    assert pseudo_checkpoint.EXPORT_FORMAT == export.EXPORT_FORMAT


def test_export_is_verified_and_rebuilt(tmp_path) -> None:
    path = make_checkpoint(str(tmp_path / "model.pt"))
    checkpoint = verify_checkpoint(path)
    data = open(path, "rb").read()
    assert checkpoint.sha256 == hashlib.sha256(data).hexdigest()
    assert checkpoint.class_names == CLASS_NAMES and checkpoint.data == data
    assert "sha256=" in repr(checkpoint) and len(repr(checkpoint)) < 200
    model, config = build_model(checkpoint.data, sha256=checkpoint.sha256)
    assert model.class_names == CLASS_NAMES and config.clip.input_size == 64
    with pytest.raises(CheckpointRefused, match="do not match"):
        build_model(checkpoint.data + b"x", sha256=checkpoint.sha256)


def test_code_running_pickle_is_refused_without_running(tmp_path) -> None:
    sentinel = tmp_path / "pwned"
    path = make_malicious_checkpoint(str(tmp_path / "evil.pt"), str(sentinel))
    with pytest.raises(CheckpointRefused, match="weights_only=True") as info:
        verify_checkpoint(path)
    assert "nothing in the file was executed" in str(info.value)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"state_dict": {}}, "not a WeakCLIP export"),
        ([torch.zeros(2)], "not a WeakCLIP export"),
    ],
)
def test_other_torch_files_are_refused(tmp_path, payload, match) -> None:
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointRefused, match=match):
        verify_checkpoint(str(path))


def test_garbage_and_missing_files_are_refused(tmp_path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointRefused, match="weights_only"):
        verify_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointRefused, match="cannot read"):
        verify_checkpoint(str(tmp_path / "missing.pt"))


def test_a_released_checkpoint_is_verified_and_built_with_its_config(tmp_path) -> None:
    from tests.pipelines.pseudo_masks.inputs import tiny_config
    from weakclip.build import build_weakclip
    from weakclip.released import to_released

    torch.manual_seed(0)
    state = to_released(build_weakclip(tiny_config(), CLASS_NAMES).state_dict())
    path = tmp_path / "released.pth"
    torch.save({"meta": {"CLASSES": list(CLASS_NAMES), "iter": 8000}, "state_dict": state}, path)
    checkpoint = verify_checkpoint(str(path), released_config=tiny_config())
    assert checkpoint.layout == "released" and checkpoint.iteration == 8000
    assert checkpoint.class_names == CLASS_NAMES
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # The released forward is implied: D1, D2, D6 and unchained co-attention layers.
    released = checkpoint.config
    assert released.clip.class_embedding_twice and released.decoder.upsample_by_two
    assert not released.co_attention.chain_layers
    model, config = build_model(
        checkpoint.data, sha256=checkpoint.sha256, released_config=checkpoint.config
    )
    assert config == checkpoint.config and model.image_encoder.class_embedding_twice
    # The paper's architecture (the default) does not fit these tensors: refused, named.
    with pytest.raises(CheckpointRefused, match=r"lacks 'backbone\.transformer\."):
        verify_checkpoint(str(path))
    torch.save({"meta": {}, "state_dict": state}, path)
    with pytest.raises(CheckpointRefused, match="no class names"):
        verify_checkpoint(str(path), released_config=tiny_config())
