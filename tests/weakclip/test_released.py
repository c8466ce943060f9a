"""The released checkpoint layout: the authors' own tiny checkpoint reproduced, both ways."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from weakclip.build import build_released, build_weakclip, read_released_checkpoint
from weakclip.config import (
    AdapterConfig,
    CLIPConfig,
    CoAttentionConfig,
    CustomCLIPConfig,
    DecoderConfig,
    WeakCLIPConfig,
    preset,
    released,
    released_forward,
)
from weakclip.released import from_released, is_released_checkpoint, to_released

# Written by the released code itself (its README: ../shared/fixtures/released-tiny/README.md).
FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "released-tiny"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "checkpoint.pth").is_file(),
    reason=f"the released-code fixture is not beside the clone ({FIXTURE})",
)
VOC = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()


def fixture_config() -> WeakCLIPConfig:
    """The fixture's architecture (its README's table)."""
    custom = CustomCLIPConfig(
        embed_dim=16,
        vision_width=64,
        vision_layers=4,
        vision_head_width=32,
        image_size=224,
        text_width=16,
        text_layers=2,
        text_heads=2,
        text_context_length=13,
    )
    return WeakCLIPConfig(
        clip=CLIPConfig(
            model_name="custom", custom=custom, input_size=128, tap_layers=(1, 2, 3, 4)
        ),
        adapter=AdapterConfig(channels=64),
        co_attention=CoAttentionConfig(width=32, heads=4, layers=3),
        decoder=DecoderConfig(width=32),
    )


def relative(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@needs_fixture
def test_the_released_forward_is_reproduced() -> None:
    payload = read_released_checkpoint(FIXTURE / "checkpoint.pth")
    model = build_released(payload, fixture_config())
    assert model.class_names == tuple(VOC)  # from meta CLASSES
    images = torch.from_numpy(np.load(FIXTURE / "inputs.npy", allow_pickle=False))
    with torch.no_grad():
        out = model(images)
    logits = np.load(FIXTURE / "logits.npy", allow_pickle=False)
    score_map = np.load(FIXTURE / "score_map.npy", allow_pickle=False)
    assert relative(out.logits.numpy(), logits) <= 1e-5
    assert relative(out.score_map.numpy(), score_map) <= 1e-5
    # Without the released class-embedding quirk (D1) the outputs move well past that.
    plain = build_weakclip(released_forward(fixture_config()), VOC)
    plain.image_encoder.class_embedding_twice = False
    plain.load_state_dict(from_released(payload["state_dict"]))
    with torch.no_grad():
        moved = plain.eval()(images).logits.numpy()
    assert relative(moved, logits) > 1e-4


@needs_fixture
def test_released_names_round_trip_exactly() -> None:
    state = read_released_checkpoint(FIXTURE / "checkpoint.pth")["state_dict"]
    back = to_released(from_released(state))
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_our_model_round_trips_through_the_released_layout() -> None:
    torch.manual_seed(0)
    config = released_forward(preset("tiny"))
    ours = build_weakclip(config, VOC).eval()
    buffer = io.BytesIO()
    torch.save(
        {"meta": {"CLASSES": VOC, "iter": 3}, "state_dict": to_released(ours.state_dict())}, buffer
    )
    payload = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert is_released_checkpoint(payload)
    again = build_released(payload, preset("tiny"))
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(ours(images).logits, again(images).logits)


def test_a_tensor_the_architecture_lacks_is_named() -> None:
    model = build_weakclip(preset("tiny"), VOC)
    state = to_released(model.state_dict())
    state["decode_head.scale_heads.9.0.conv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"decode_head\.scale_heads\.9\.0\.conv\.weight"):
        build_released({"meta": {"CLASSES": VOC}, "state_dict": state}, preset("tiny"))
    state = to_released(model.state_dict())
    state["decode_head.conv_seg.weight"] = torch.zeros(21, 7, 1, 1)
    with pytest.raises(ValueError, match=r"'decode_head\.conv_seg\.weight' has shape \(21, 7"):
        build_released({"meta": {"CLASSES": VOC}, "state_dict": state}, preset("tiny"))
    del state["decode_head.scale_heads.0.0.bn.running_mean"]
    with pytest.raises(ValueError, match="lacks 'decode_head.scale_heads.0.0.bn.running_mean'"):
        build_released({"meta": {"CLASSES": VOC}, "state_dict": state}, preset("tiny"))
    state = {"backbone.conv1.weight": torch.zeros(1), "decode_head.conv_seg.weight": torch.zeros(1)}
    state["mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no mapping for tensor 'mystery.weight'"):
        from_released(state)


class _Exploit:
    """Unpickles as `open(path, "w")`: loading it with plain pickle creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (open, (self.path, "w"))


def test_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path, sentinel = tmp_path / "evil.pth", tmp_path / "ran"
    path.write_bytes(pickle.dumps({"meta": {}, "state_dict": _Exploit(sentinel)}, protocol=2))
    with pytest.raises(ValueError, match="cannot read released checkpoint"):
        read_released_checkpoint(path)
    assert not sentinel.exists()
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match="not a released WeakCLIP checkpoint"):
        read_released_checkpoint(foreign)


def test_the_released_profile_turns_every_flag_on() -> None:
    config = released(preset("vit-b-16"))
    assert config.clip.class_embedding_twice and config.decoder.upsample_by_two
    assert not config.co_attention.chain_layers and not config.adapter.trainable
    assert config.decoder.default_init and not config.inference.pad_small_images
    assert config.clip.drop_path_rate == 0.1
    loss = config.loss
    assert loss.seeding_log_epsilon == 1e-7 and not loss.clamp_boundary_probs
    assert loss.aux_over_all_pixels and loss.boundary_image_resize == "nearest"
    # The paper's architecture is untouched: the same parameters.
    count = lambda c: sum(p.numel() for p in build_weakclip(c, VOC).parameters())  # noqa: E731
    assert count(config) == count(preset("vit-b-16"))
