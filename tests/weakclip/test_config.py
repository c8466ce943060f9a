"""Config validation, presets and the dict/JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from weakclip.config import (
    COCO_POST_CRF,
    PRESETS,
    VOC_POST_CRF,
    AdapterConfig,
    CLIPConfig,
    CoAttentionConfig,
    CRFConfig,
    CustomCLIPConfig,
    DecoderConfig,
    InferenceConfig,
    LossConfig,
    PromptConfig,
    TrainConfig,
    WeakCLIPConfig,
    for_dataset,
    from_dict,
    preset,
    to_dict,
)


def test_defaults_reproduce_the_paper() -> None:
    config = preset("vit-b-16")
    assert config == WeakCLIPConfig()
    assert config.clip.model_name == "ViT-B-16-quickgelu"
    assert config.clip.input_size == 512
    assert config.clip.tap_layers == (4, 6, 8, 12)
    assert (config.prompt.num_context, config.prompt.context_length) == (8, 13)
    assert (config.adapter.channels, config.adapter.trainable) == (768, True)
    co = config.co_attention
    assert (co.width, co.heads, co.layers, co.dropout, co.mlp_ratio) == (256, 4, 3, 0.1, 4)
    assert (co.temperature_init, co.chain_layers) == (0.1, True)
    assert config.decoder == DecoderConfig(width=256, head_blocks=(1, 1, 2, 3), dropout=0.1)
    loss = config.loss
    assert (loss.tau, loss.aux_weight, loss.resolution) == (0.07, 0.4, 64)
    assert loss.boundary_weight == 1.0  # the paper's total: seeding + boundary + 0.4 aux
    assert loss.boundary_crf == CRFConfig(10, 3.0, 3.0, 80.0, 13.0, 10.0)
    assert (loss.prob_clamp, loss.ratio_min, loss.ratio_max) == (1e-4, 0.05, 20.0)
    inference = config.inference
    assert inference.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert (inference.flip, inference.window, inference.stride) == (True, 512, 341)
    assert inference.restrict_to_image_classes
    assert inference.crf == VOC_POST_CRF == CRFConfig(10, 3.0, 3.0, 83.0, 5.0, 3.0)
    assert COCO_POST_CRF == CRFConfig(10, 1.0, 3.0, 67.0, 3.0, 4.0)
    train = config.train
    assert (train.lr, train.weight_decay, train.warmup_iterations, train.min_lr) == (
        1e-4,
        3e-5,
        1500,
        1e-6,
    )
    assert (train.iterations, train.batch_size, train.seed) == (20_000, 16, 504)


def test_tiny_preset_is_small_and_consistent() -> None:
    config = preset("tiny")
    custom = config.clip.custom
    assert custom is not None and config.clip.model_name == "custom"
    assert config.adapter.channels == custom.vision_width
    assert config.clip.input_size == config.inference.window == 256
    assert config.clip.tap_layers == (1, 2, 3, 4)
    assert config.inference.scales == (1.0,) and config.inference.flip
    assert config.co_attention.width == config.decoder.width == 64
    # The deviations from the paper's losses (docs/METHOD.md): the boundary weight, for random
    # CLIP weights, the auxiliary mean over valid pixels (D5) its numbers were measured with,
    # and the auxiliary loss at 64 x 64 (its cost at 91 classes).
    assert config.loss.boundary_weight == 0.1 and not config.loss.aux_over_all_pixels
    assert config.loss.aux_resolution == 64
    paper = dataclasses.replace(
        config.loss, boundary_weight=1.0, aux_over_all_pixels=True, aux_resolution=None
    )
    assert paper == LossConfig(resolution=32)
    assert config.clip.drop_path_rate == 0.0  # D7 off, as the tiny numbers were measured
    assert config.train.ratio_range == (1.0, 1.0)  # no random rescale for random features


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="vit-b-16"):
        preset("vit-l-14")


@pytest.mark.parametrize("name", PRESETS)
def test_json_round_trip(name: str) -> None:
    config = preset(name)
    text = json.dumps(to_dict(config))
    assert from_dict(json.loads(text)) == config


def test_partial_dict_keeps_base_values() -> None:
    base = preset("tiny")
    config = from_dict({"train": {"iterations": 7}, "inference": {"flip": False}}, base=base)
    assert config.train.iterations == 7 and not config.inference.flip
    assert config.clip == base.clip and config.train.batch_size == base.train.batch_size
    assert from_dict({}) == WeakCLIPConfig()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"batchsize": 3}, "batchsize"),
        ({"train": {"iterationz": 3}}, "train.iterationz"),
        ({"clip": {"custom": {"depth": 3}}}, "clip.custom.depth"),
    ],
)
def test_unknown_field_is_refused(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"unknown field.*{field}"):
        from_dict(data, base=preset("tiny"))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train": {"iterations": "10"}}, "train.iterations"),
        ({"train": {"iterations": True}}, "train.iterations"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"inference": {"flip": 1}}, "inference.flip"),
        ({"clip": {"tap_layers": 4}}, "clip.tap_layers"),
        ({"clip": {"model_name": None}}, "clip.model_name"),
        ({"loss": []}, "loss"),
    ],
)
def test_wrong_types_are_refused(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        from_dict(data)


def test_ints_are_accepted_for_floats() -> None:
    config = from_dict({"train": {"lr": 1}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: CLIPConfig(input_size=0), "input_size"),
        (lambda: CLIPConfig(tap_layers=(4, 6, 8)), "tap_layers"),
        (lambda: CLIPConfig(tap_layers=(0, 6, 8, 12)), "tap_layers"),
        (lambda: CLIPConfig(tap_layers=(6, 4, 8, 12)), "tap_layers"),
        (lambda: CLIPConfig(model_name="custom"), "custom"),
        (lambda: CLIPConfig(custom=CustomCLIPConfig()), "custom"),
        (
            lambda: CLIPConfig(
                model_name="custom", custom=CustomCLIPConfig(), tap_layers=(1, 2, 3, 5)
            ),
            "tap_layers",
        ),
        (
            lambda: CLIPConfig(
                model_name="custom",
                custom=CustomCLIPConfig(),
                input_size=250,
                tap_layers=(1, 2, 3, 4),
            ),
            "input_size",
        ),
        (lambda: CLIPConfig(pixel_std=(1.0, 0.0, 1.0)), "pixel_std"),
        (lambda: CustomCLIPConfig(vision_head_width=48), "vision_head_width"),
        (lambda: CustomCLIPConfig(text_heads=3), "text_heads"),
        (lambda: PromptConfig(num_context=-1), "num_context"),
        (lambda: PromptConfig(num_context=8, context_length=10), "context_length"),
        (lambda: AdapterConfig(channels=0), "channels"),
        (lambda: CoAttentionConfig(heads=3), "heads"),
        (lambda: CoAttentionConfig(dropout=1.0), "dropout"),
        (lambda: CoAttentionConfig(layers=0), "layers"),
        (lambda: DecoderConfig(head_blocks=(1, 1, 2)), "head_blocks"),
        (lambda: DecoderConfig(head_blocks=(1, 0, 2, 3)), "head_blocks"),
        (lambda: CRFConfig(iterations=0), "iterations"),
        (lambda: CRFConfig(bilateral_srgb=0.0), "bilateral_srgb"),
        (lambda: LossConfig(tau=0.0), "tau"),
        (lambda: LossConfig(ratio_min=20.0, ratio_max=0.05), "ratio_max"),
        (lambda: LossConfig(prob_clamp=1.0), "prob_clamp"),
        (lambda: LossConfig(boundary_weight=-0.1), "boundary_weight"),
        (lambda: InferenceConfig(scales=()), "scales"),
        (lambda: InferenceConfig(scales=(1.0, -0.5)), "scales"),
        (lambda: InferenceConfig(stride=600), "stride"),
        (lambda: TrainConfig(iterations=0), "iterations"),
        (lambda: TrainConfig(min_lr=1.0), "min_lr"),
        (lambda: TrainConfig(ratio_range=(2.0, 0.5)), "ratio_range"),
        (lambda: TrainConfig(cat_max_ratio=0.0), "cat_max_ratio"),
        (lambda: TrainConfig(lr_schedule="step"), "lr_schedule"),
        (
            lambda: dataclasses.replace(preset("tiny"), adapter=AdapterConfig(channels=768)),
            "adapter.channels",
        ),
        (
            lambda: dataclasses.replace(
                preset("tiny"), prompt=PromptConfig(num_context=80, context_length=90)
            ),
            "prompt.context_length",
        ),
    ],
)
def test_bad_values_name_the_field(factory, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="^" + re.escape(field) + " "):
        factory()


def test_nested_validation_error_names_the_dotted_path() -> None:
    with pytest.raises(ValueError, match=r"^train\.iterations must be positive"):
        from_dict({"train": {"iterations": 0}})


def test_configs_are_frozen() -> None:
    config = preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.iterations = 3  # type: ignore[misc]


def test_warmup_is_capped_for_short_runs() -> None:
    assert TrainConfig().effective_warmup_iterations == 1500
    assert TrainConfig(iterations=100).effective_warmup_iterations == 10


def test_a_constant_schedule_has_no_warmup_and_no_decay() -> None:
    constant = TrainConfig(iterations=100, lr=1e-3, lr_schedule="constant")
    assert (constant.effective_warmup_iterations, constant.effective_min_lr) == (0, 1e-3)
    assert TrainConfig().effective_min_lr == TrainConfig().min_lr == 1e-6


def test_coco_settings() -> None:
    coco = for_dataset(preset("vit-b-16"), "coco")
    assert (coco.train.iterations, coco.train.batch_size) == (40_000, 24)
    assert coco.inference.crf == COCO_POST_CRF
    assert for_dataset(preset("tiny"), "voc") == preset("tiny")
    with pytest.raises(ValueError, match="dataset"):
        for_dataset(preset("tiny"), "ade20k")


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, weakclip.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@dataclasses.dataclass(frozen=True)
class _Inner:
    a: int = 1
    b: float = 2.0


@dataclasses.dataclass(frozen=True)
class _Stage:
    ratio: tuple[float, float] = (0.5, 2.0)
    splits: tuple[str, ...] | None = ("train",)
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(a=5))


def test_from_dict_loads_any_config_dataclass() -> None:
    """The pipelines' stage configs load through the same `from_dict`: fixed-length tuples,
    optional fields and a nested `default_factory` value as the base of a partial mapping."""
    config = from_dict({"ratio": [1, 3], "splits": None, "inner": {"b": 4}}, _Stage)
    assert config == _Stage(ratio=(1.0, 3.0), splits=None, inner=_Inner(a=5, b=4.0))
    with pytest.raises(ValueError, match=re.escape("ratio must hold 2 values")):
        from_dict({"ratio": [1, 2, 3]}, _Stage)
    with pytest.raises(ValueError, match=re.escape("splits[0] must be a string")):
        from_dict({"splits": [3]}, _Stage)
