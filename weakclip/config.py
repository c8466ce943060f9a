"""Configuration of the WeakCLIP model, its losses, inference and training (SPEC §4-§7).

One frozen dataclass per component and a root `WeakCLIPConfig`. Defaults reproduce the paper
(ViT-B/16 at 512 x 512 on VOC); `preset("tiny")` is a few-million-parameter model for tests and
the demo. Every dataclass validates itself in `__post_init__` and raises `ValueError` naming the
offending field. `to_dict`/`from_dict` give a JSON-able form for checkpoints and `--config`
files; `from_dict` refuses fields it does not know.

This module imports nothing heavier than the standard library so that jobs can parse and
validate a configuration before importing torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

PRESETS: tuple[str, ...] = ("vit-b-16", "tiny")
DATASETS: tuple[str, ...] = ("voc", "coco")


def _require(condition: bool, name: str, message: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


def _positive(name: str, value: float) -> None:
    _require(value > 0, name, "must be positive", value)


def _non_negative(name: str, value: float) -> None:
    _require(value >= 0, name, "must be >= 0", value)


def _probability(name: str, value: float) -> None:
    _require(0 <= value < 1, name, "must be in [0, 1)", value)


@dataclass(frozen=True)
class CustomCLIPConfig:
    """A small CLIP built directly from open_clip's `CLIPVisionCfg`/`CLIPTextCfg` (tiny preset)."""

    embed_dim: int = 64  # D: joint image-text embedding width
    vision_width: int = 128  # C: ViT token width
    vision_layers: int = 4  # ViT blocks
    vision_head_width: int = 64  # ViT heads = vision_width // vision_head_width
    patch_size: int = 16  # p: ViT patch size
    image_size: int = 128  # pretraining resolution: sets the stored position-embedding grid
    text_width: int = 64  # text transformer width (and prompt context vector width)
    text_layers: int = 4  # text transformer blocks
    text_heads: int = 2  # text attention heads
    text_context_length: int = 77  # text position embeddings stored in the checkpoint
    quick_gelu: bool = True  # OpenAI CLIP activation

    def __post_init__(self) -> None:
        for name in (
            "embed_dim",
            "vision_width",
            "vision_layers",
            "vision_head_width",
            "patch_size",
            "image_size",
            "text_width",
            "text_layers",
            "text_heads",
            "text_context_length",
        ):
            _positive(name, getattr(self, name))
        _require(
            self.vision_width % self.vision_head_width == 0,
            "vision_head_width",
            f"must divide vision_width={self.vision_width}",
            self.vision_head_width,
        )
        _require(
            self.text_width % self.text_heads == 0,
            "text_heads",
            f"must divide text_width={self.text_width}",
            self.text_heads,
        )
        _require(
            self.image_size % self.patch_size == 0,
            "image_size",
            f"must be a multiple of patch_size={self.patch_size}",
            self.image_size,
        )


@dataclass(frozen=True)
class CLIPConfig:
    """The frozen CLIP backbone and how images enter it."""

    model_name: str = "ViT-B-16-quickgelu"  # open_clip architecture; "custom" uses `custom`
    custom: CustomCLIPConfig | None = None  # architecture when model_name == "custom"
    input_size: int = 512  # training crop side; position embeddings are resized for it at load
    tap_layers: tuple[int, ...] = (4, 6, 8, 12)  # 1-based ViT blocks feeding the adapter
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53)  # ImageNet, 0-255 RGB (mmseg)
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375)  # ImageNet, 0-255 RGB (mmseg)

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "model_name", "must be non-empty", self.model_name)
        _require(
            (self.model_name == "custom") == (self.custom is not None),
            "custom",
            'must be given exactly when model_name == "custom"',
            self.custom,
        )
        _positive("input_size", self.input_size)
        _require(len(self.tap_layers) == 4, "tap_layers", "must name 4 blocks", self.tap_layers)
        _require(
            all(layer >= 1 for layer in self.tap_layers),
            "tap_layers",
            "are 1-based block numbers",
            self.tap_layers,
        )
        _require(
            list(self.tap_layers) == sorted(set(self.tap_layers)),
            "tap_layers",
            "must be strictly increasing",
            self.tap_layers,
        )
        if self.custom is not None:
            _require(
                self.tap_layers[-1] <= self.custom.vision_layers,
                "tap_layers",
                f"must not exceed custom.vision_layers={self.custom.vision_layers}",
                self.tap_layers,
            )
            _require(
                self.input_size % self.custom.patch_size == 0,
                "input_size",
                f"must be a multiple of custom.patch_size={self.custom.patch_size}",
                self.input_size,
            )
        _require(len(self.pixel_mean) == 3, "pixel_mean", "must have 3 values", self.pixel_mean)
        _require(len(self.pixel_std) == 3, "pixel_std", "must have 3 values", self.pixel_std)
        _require(all(s > 0 for s in self.pixel_std), "pixel_std", "must be > 0", self.pixel_std)


@dataclass(frozen=True)
class PromptConfig:
    """The learnable text prompt."""

    num_context: int = 8  # learnable context vectors shared by all classes (paper: 8 best)
    context_length: int = 13  # SOT + context + class-name tokens + EOT (3 name tokens at most)

    def __post_init__(self) -> None:
        _non_negative("num_context", self.num_context)
        _require(
            self.context_length >= self.num_context + 3,
            "context_length",
            f"must leave room for SOT, EOT and a name token after {self.num_context} context "
            "vectors",
            self.context_length,
        )


@dataclass(frozen=True)
class AdapterConfig:
    """The pyramid adapter that turns ViT taps into a 1/4..1/32 pyramid."""

    channels: int = 768  # must equal the ViT width
    trainable: bool = True  # paper: trained; False reproduces the released code's issue #2

    def __post_init__(self) -> None:
        _positive("channels", self.channels)


@dataclass(frozen=True)
class CoAttentionConfig:
    """Co-attention matching between the visual tokens and the class text features."""

    width: int = 256  # transformer width after projecting from the embedding width
    heads: int = 4  # attention heads
    layers: int = 3  # decoder layers per direction
    dropout: float = 0.1  # dropout inside the layers
    mlp_ratio: int = 4  # MLP hidden width / width
    temperature_init: float = 0.1  # initial value of the learnable residual scales beta, gamma
    chain_layers: bool = True  # False feeds every layer the original input (released-code bug)

    def __post_init__(self) -> None:
        for name in ("width", "heads", "layers", "mlp_ratio"):
            _positive(name, getattr(self, name))
        _require(
            self.width % self.heads == 0, "heads", f"must divide width={self.width}", self.heads
        )
        _probability("dropout", self.dropout)
        _non_negative("temperature_init", self.temperature_init)


@dataclass(frozen=True)
class DecoderConfig:
    """The text-guided FPN decoder."""

    width: int = 256  # FPN and head width
    head_blocks: tuple[int, ...] = (1, 1, 2, 3)  # Conv-BN-ReLU blocks per level, 1/4..1/32
    dropout: float = 0.1  # Dropout2d before the classifier

    def __post_init__(self) -> None:
        _positive("width", self.width)
        _require(len(self.head_blocks) == 4, "head_blocks", "must have 4 entries", self.head_blocks)
        _require(
            all(n >= 1 for n in self.head_blocks), "head_blocks", "must be >= 1", self.head_blocks
        )
        _probability("dropout", self.dropout)


@dataclass(frozen=True)
class CRFConfig:
    """Dense CRF parameters (pydensecrf: Gaussian and bilateral pairwise terms)."""

    iterations: int = 10  # mean-field iterations
    gaussian_sxy: float = 3.0  # spatial std of the smoothness kernel, pixels
    gaussian_compat: float = 3.0  # weight of the smoothness kernel
    bilateral_sxy: float = 83.0  # spatial std of the appearance kernel, pixels
    bilateral_srgb: float = 5.0  # colour std of the appearance kernel, 0-255
    bilateral_compat: float = 3.0  # weight of the appearance kernel

    def __post_init__(self) -> None:
        _positive("iterations", self.iterations)
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            _positive(name, getattr(self, name))
        for name in ("gaussian_compat", "bilateral_compat"):
            _non_negative(name, getattr(self, name))


# The online CRF of the boundary loss (SPEC §5).
BOUNDARY_CRF = CRFConfig(
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=80.0,
    bilateral_srgb=13.0,
    bilateral_compat=10.0,
)
# CRF post-processing of the pseudo masks (SPEC §7).
VOC_POST_CRF = CRFConfig(
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=83.0,
    bilateral_srgb=5.0,
    bilateral_compat=3.0,
)
COCO_POST_CRF = CRFConfig(
    gaussian_sxy=1.0,
    gaussian_compat=3.0,
    bilateral_sxy=67.0,
    bilateral_srgb=3.0,
    bilateral_compat=4.0,
)


@dataclass(frozen=True)
class LossConfig:
    """Seeding + boundary + auxiliary losses (SPEC §5)."""

    tau: float = 0.07  # temperature of the score map in the auxiliary loss
    aux_weight: float = 0.4  # weight of the auxiliary loss
    boundary_weight: float = 1.0  # weight of the boundary loss (paper: 1; tiny preset: 0.1)
    resolution: int = 64  # side the logits are resized to for seeding/boundary (64 at 512)
    boundary_crf: CRFConfig = BOUNDARY_CRF  # online CRF of the boundary loss
    prob_clamp: float = 1e-4  # floor of P (CRF unary) and Q before the log-ratio
    ratio_min: float = 0.05  # lower clip of Q / P
    ratio_max: float = 20.0  # upper clip of Q / P

    def __post_init__(self) -> None:
        _positive("tau", self.tau)
        _non_negative("aux_weight", self.aux_weight)
        _non_negative("boundary_weight", self.boundary_weight)
        _positive("resolution", self.resolution)
        _require(0 < self.prob_clamp < 1, "prob_clamp", "must be in (0, 1)", self.prob_clamp)
        _positive("ratio_min", self.ratio_min)
        _require(
            self.ratio_max > self.ratio_min,
            "ratio_max",
            f"must exceed ratio_min={self.ratio_min}",
            self.ratio_max,
        )


@dataclass(frozen=True)
class InferenceConfig:
    """Multi-scale + flip sliding-window inference and CRF post-processing (SPEC §7)."""

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # fractions of short_side
    short_side: int = 512  # reference short side the scales apply to
    flip: bool = True  # add a horizontally flipped pass per scale
    window: int = 512  # sliding-window crop side
    stride: int = 341  # sliding-window stride
    restrict_to_image_classes: bool = True  # keep only background + image-level classes
    crf: CRFConfig = VOC_POST_CRF  # post-processing CRF (COCO_POST_CRF for COCO)

    def __post_init__(self) -> None:
        _require(len(self.scales) > 0, "scales", "must not be empty", self.scales)
        _require(all(s > 0 for s in self.scales), "scales", "must be positive", self.scales)
        _positive("short_side", self.short_side)
        _positive("window", self.window)
        _require(
            0 < self.stride <= self.window,
            "stride",
            f"must be in (0, window={self.window}]",
            self.stride,
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation (SPEC §6). The crop side is `CLIPConfig.input_size`."""

    iterations: int = 20_000  # optimizer steps (COCO: 40k)
    batch_size: int = 16  # global batch, whatever the number of workers (COCO: 24)
    lr: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 3e-5  # AdamW weight decay
    warmup_iterations: int = 1_500  # linear warm-up length
    max_warmup_fraction: float = 0.1  # warm-up is capped at this fraction of `iterations`
    min_lr: float = 1e-6  # cosine floor
    seed: int = 504  # global random seed
    ratio_range: tuple[float, ...] = (0.5, 2.0)  # random resize of the short side
    cat_max_ratio: float = 0.75  # a crop may be at most this fraction one class
    flip_prob: float = 0.5  # horizontal flip probability
    photometric: bool = True  # mmseg PhotoMetricDistortion

    def __post_init__(self) -> None:
        _positive("iterations", self.iterations)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("warmup_iterations", self.warmup_iterations)
        _require(
            0 <= self.max_warmup_fraction <= 1,
            "max_warmup_fraction",
            "must be in [0, 1]",
            self.max_warmup_fraction,
        )
        _require(
            0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}]", self.min_lr
        )
        _non_negative("seed", self.seed)
        _require(
            len(self.ratio_range) == 2 and 0 < self.ratio_range[0] <= self.ratio_range[1],
            "ratio_range",
            "must be (low, high) with 0 < low <= high",
            self.ratio_range,
        )
        _require(
            0 < self.cat_max_ratio <= 1, "cat_max_ratio", "must be in (0, 1]", self.cat_max_ratio
        )
        _require(0 <= self.flip_prob <= 1, "flip_prob", "must be in [0, 1]", self.flip_prob)

    @property
    def effective_warmup_iterations(self) -> int:
        """Warm-up length after the cap for short runs."""
        cap = int(self.iterations * self.max_warmup_fraction)
        return min(self.warmup_iterations, cap)


@dataclass(frozen=True)
class WeakCLIPConfig:
    """Everything needed to build, train and run WeakCLIP."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)  # frozen backbone
    prompt: PromptConfig = field(default_factory=PromptConfig)  # learnable text prompt
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # pyramid adapter
    co_attention: CoAttentionConfig = field(default_factory=CoAttentionConfig)  # matching
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # text-guided decoder
    loss: LossConfig = field(default_factory=LossConfig)  # training losses
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # pseudo masks
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and augmentation

    def __post_init__(self) -> None:
        custom = self.clip.custom
        if custom is not None:
            _require(
                self.adapter.channels == custom.vision_width,
                "adapter.channels",
                f"must equal the ViT width clip.custom.vision_width={custom.vision_width}",
                self.adapter.channels,
            )
            _require(
                self.prompt.context_length <= custom.text_context_length,
                "prompt.context_length",
                f"must not exceed clip.custom.text_context_length={custom.text_context_length}",
                self.prompt.context_length,
            )


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


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able nested dict of a config dataclass (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a config dataclass instance, got {type(config).__name__}")
    return {f.name: _to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


ConfigT = TypeVar("ConfigT")


def from_dict(
    data: Mapping[str, Any],
    cls: type[ConfigT] = WeakCLIPConfig,  # type: ignore[assignment]
    *,
    base: ConfigT | None = None,
) -> ConfigT:
    """Rebuilds a config dataclass from `to_dict` output or a (partial) `--config` file.

    Fields missing from `data` keep their value in `base` (default: the dataclass defaults), so
    a file may name only what it changes. Values are type-checked.

    Args:
        data: nested mapping of field names to values.
        cls: the dataclass to build.
        base: values for the fields `data` leaves out.

    Returns:
        A validated instance of `cls`.

    Raises:
        ValueError: an unknown field, a value of the wrong type, or a value that fails
            validation; the message names the field by its dotted path.
    """
    return _from_dict(data, cls, base, prefix="")


def _from_dict(data: Any, cls: type[ConfigT], base: ConfigT | None, *, prefix: str) -> ConfigT:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(prefix + str(u) for u in unknown)} in {where}; "
            f"known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        current = getattr(base, name) if base is not None else None
        kwargs[name] = _convert(value, hints[name], current, path=prefix + name)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
        return cls(**kwargs)
    except ValueError as error:
        # Validation messages start with the field name: prefixing gives its dotted path.
        raise ValueError(f"{prefix}{error}") from None


def _convert(value: Any, hint: Any, current: Any, *, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if len(options) == len(typing.get_args(hint)):
                raise ValueError(f"{path} must not be null")
            return None
        (hint,) = options
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        base = current if current is not None else None
        return _from_dict(value, hint, base, prefix=path + ".")  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list, got {type(value).__name__}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_convert(v, item_hint, None, path=f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported field type {hint!r}")
