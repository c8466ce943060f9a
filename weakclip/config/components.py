"""The config dataclasses: one frozen dataclass per component of WeakCLIP and the root
`WeakCLIPConfig`, each validating itself in `__post_init__` (a `ValueError` names the field).

Imports nothing heavier than the standard library (see `weakclip.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _require(condition: bool, name: str, message: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


def _positive(name: str, value: float) -> None:
    _require(value > 0, name, "must be positive", value)


def _non_negative(name: str, value: float) -> None:
    _require(value >= 0, name, "must be >= 0", value)


def _probability(name: str, value: float) -> None:
    _require(0 <= value < 1, name, "must be in [0, 1)", value)


_RULES = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def check_fields(config: object, rule: str, *names: str) -> None:
    """For configs' `__post_init__`: ValueError `"<name> must be <rule>, got <value>"` for the
    first of the fields `names` of `config` that is set (not None) and breaks `rule` (a key of
    `_RULES`: ">= 0", ">= 1", "> 0" or "in [0, 1]")."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            _require(_RULES[rule](value), name, f"must be {rule}", value)


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
    """The CLIP backbone (frozen, as in the paper) and how images enter it."""

    model_name: str = "ViT-B-16-quickgelu"  # open_clip architecture; "custom" uses `custom`
    # Paper: False (both encoders frozen). True trains the image encoder too, an ablation for
    # random weights (docs/METHOD.md, "Training the image encoder").
    train_image_encoder: bool = False
    # D1 (docs/METHOD.md, "The released code"): True adds the class embedding to the class
    # token a second time, as the released ViT does; False (the fix) adds it once, as CLIP.
    class_embedding_twice: bool = False
    # D7: stochastic depth in the frozen ViT while training, rising linearly over the blocks
    # to this rate (the released config's 0.1, which the paper's numbers were trained with).
    drop_path_rate: float = 0.1
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
        _probability("drop_path_rate", self.drop_path_rate)
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
    # D2: True brings each coarser head level up by x2 steps and resizes their sum (the
    # released head; differs on grids that are not multiples of 8); False: exact sizes.
    upsample_by_two: bool = False
    # D8: True keeps PyTorch's default initialisation of the neck and classifier (the released
    # code never calls its init_weights); False: Xavier neck, He blocks, normal(0.01) classifier.
    default_init: bool = False

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


# The online CRF of the boundary loss (docs/METHOD.md).
BOUNDARY_CRF = CRFConfig(
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=80.0,
    bilateral_srgb=13.0,
    bilateral_compat=10.0,
)
# CRF post-processing of the pseudo masks (docs/METHOD.md).
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
    """Seeding + boundary + auxiliary losses (docs/METHOD.md)."""

    tau: float = 0.07  # temperature of the score map in the auxiliary loss
    aux_weight: float = 0.4  # weight of the auxiliary loss
    boundary_weight: float = 1.0  # weight of the boundary loss (paper: 1; tiny preset: 0.1)
    resolution: int = 64  # side the logits are resized to for seeding/boundary (64 at 512)
    boundary_crf: CRFConfig = BOUNDARY_CRF  # online CRF of the boundary loss
    prob_clamp: float = 1e-4  # floor of P (CRF unary) and Q before the log-ratio
    ratio_min: float = 0.05  # lower clip of Q / P
    ratio_max: float = 20.0  # upper clip of Q / P
    # D3: 0 takes log_softmax (the fix); the released seeding loss takes log(softmax + 1e-7).
    seeding_log_epsilon: float = 0.0
    # D4: False leaves P unclamped in the boundary loss's log-ratio (released).
    clamp_boundary_probs: bool = True
    # D5: True averages the auxiliary cross-entropy over every pixel, ignored ones included
    # (mmseg 0.19, the released code and so the paper's numbers); False: valid pixels only.
    aux_over_all_pixels: bool = True
    # The side the auxiliary loss is computed at: None = the seeds' (input) size, as in the
    # paper and the released code; a side (the tiny preset's 64) downsamples the seeds to it.
    aux_resolution: int | None = None
    # D9: the boundary CRF's image at the loss resolution: "bilinear" (rounded, antialiased) or
    # "nearest" (the released point-sampled zoom, truncating coordinates).
    boundary_image_resize: str = "bilinear"

    def __post_init__(self) -> None:
        _positive("tau", self.tau)
        _non_negative("seeding_log_epsilon", self.seeding_log_epsilon)
        _require(
            self.boundary_image_resize in ("bilinear", "nearest"),
            "boundary_image_resize",
            'must be "bilinear" or "nearest"',
            self.boundary_image_resize,
        )
        _non_negative("aux_weight", self.aux_weight)
        _non_negative("boundary_weight", self.boundary_weight)
        _positive("resolution", self.resolution)
        if self.aux_resolution is not None:
            _positive("aux_resolution", self.aux_resolution)
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
    """Multi-scale + flip sliding-window inference and CRF post-processing (docs/METHOD.md)."""

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # fractions of short_side
    short_side: int = 512  # reference short side the scales apply to
    flip: bool = True  # add a horizontally flipped pass per scale
    window: int = 512  # sliding-window crop side
    stride: int = 341  # sliding-window stride
    restrict_to_image_classes: bool = True  # keep only background + image-level classes
    # D6: False runs an image smaller than the window as it is (mmseg's slide inference, the
    # released code and so the paper's numbers); True zero-pads it to the window.
    pad_small_images: bool = False
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
    """Optimisation and augmentation (docs/METHOD.md). The crop side is `CLIPConfig.input_size`."""

    iterations: int = 20_000  # optimizer steps (COCO: 40k)
    batch_size: int = 16  # global batch, whatever the number of workers (COCO: 24)
    lr: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 3e-5  # AdamW weight decay
    warmup_iterations: int = 1_500  # linear warm-up length
    max_warmup_fraction: float = 0.1  # warm-up is capped at this fraction of `iterations`
    min_lr: float = 1e-6  # cosine floor
    lr_schedule: str = "cosine"  # "cosine": warm-up, cosine to min_lr (paper); "constant": lr
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
        schedules = ("cosine", "constant")
        _require(
            self.lr_schedule in schedules,
            "lr_schedule",
            f"must be in {schedules}",
            self.lr_schedule,
        )

    @property
    def effective_warmup_iterations(self) -> int:
        """Warm-up length after the cap for short runs (none under a constant schedule)."""
        cap = int(self.iterations * self.max_warmup_fraction)
        return 0 if self.lr_schedule == "constant" else min(self.warmup_iterations, cap)

    @property
    def effective_min_lr(self) -> float:
        """The learning rate the schedule ends at: `min_lr`, or `lr` under a constant one."""
        return self.lr if self.lr_schedule == "constant" else self.min_lr


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
