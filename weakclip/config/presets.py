"""Named configurations: the paper's `vit-b-16`, the CPU-sized `tiny`, and per-dataset settings."""

from __future__ import annotations

import dataclasses

from weakclip.config.components import (
    COCO_POST_CRF,
    AdapterConfig,
    CLIPConfig,
    CoAttentionConfig,
    CustomCLIPConfig,
    DecoderConfig,
    InferenceConfig,
    LossConfig,
    TrainConfig,
    WeakCLIPConfig,
)

PRESETS: tuple[str, ...] = ("vit-b-16", "tiny")
DATASETS: tuple[str, ...] = ("voc", "coco")


def preset(name: str) -> WeakCLIPConfig:
    """A named configuration.

    Args:
        name: "vit-b-16" (the paper's model) or "tiny" (a few million parameters, for tests and
            the demo on CPU).

    Returns:
        The configuration.

    Raises:
        ValueError: unknown name.
    """
    if name == "vit-b-16":
        return WeakCLIPConfig()
    if name == "tiny":
        custom = CustomCLIPConfig()
        return WeakCLIPConfig(
            clip=CLIPConfig(
                model_name="custom", custom=custom, input_size=256, tap_layers=(1, 2, 3, 4)
            ),
            adapter=AdapterConfig(channels=custom.vision_width),
            co_attention=CoAttentionConfig(width=64, heads=2),
            decoder=DecoderConfig(width=64),
            # With random CLIP weights the early predictions are poor, and the boundary loss
            # (a KL towards the CRF of the model's own prediction) at the paper's weight 1
            # reinforces their errors: on 45 images at 375 x 500, 100 iterations, the pseudo
            # masks scored 52.0 mIoU against 96.1 at weight 0.1 (docs/METHOD.md, ablation).
            loss=LossConfig(resolution=32, boundary_weight=0.1),
            inference=InferenceConfig(scales=(1.0,), short_side=256, window=256, stride=171),
            train=TrainConfig(iterations=200, batch_size=4, warmup_iterations=20),
        )
    raise ValueError(f"model preset must be one of {PRESETS}, got {name!r}")


def for_dataset(config: WeakCLIPConfig, dataset: str) -> WeakCLIPConfig:
    """The paper's per-dataset settings applied to `config`.

    Args:
        config: a configuration, usually a preset.
        dataset: "voc" (returns `config` unchanged) or "coco" (40k iterations, global batch 24,
            COCO post-processing CRF).

    Returns:
        The adjusted configuration.
    """
    if dataset == "voc":
        return config
    if dataset == "coco":
        return dataclasses.replace(
            config,
            train=dataclasses.replace(config.train, iterations=40_000, batch_size=24),
            inference=dataclasses.replace(config.inference, crf=COCO_POST_CRF),
        )
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
