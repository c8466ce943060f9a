"""Options of the pseudo-mask stage, and what of them fingerprints an output."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipelines.cli.config import NULL, load_config_file
from pipelines.cli.options import (
    DEVICES,
    JobOptions,
    UsageError,
    add_max_error_fraction,
    add_progress_every,
    comma_list,
    given,
    stage_kwargs,
)
from pipelines.io.storage import StorageOptions
from pipelines.pseudo_masks.checkpoint import VerifiedCheckpoint
from weakclip.config import (
    COCO_POST_CRF,
    VOC_POST_CRF,
    CRFConfig,
    InferenceConfig,
    WeakCLIPConfig,
    check_fields,
    from_dict,
    preset,
    to_dict,
)

_CRF_FIELDS = {f.name: f.name for f in fields(CRFConfig)} | {"iterations": "crf_iterations"}
_INFERENCE_FIELDS = {k: k for k in ("scales", "short_side", "flip", "window", "stride")}


@dataclass(frozen=True)
class PseudoMaskConfig:
    """Options of the pseudo-mask stage (CLI flags and `--config` fields). Inference fields left
    None take the checkpoint's settings; CRF fields left None the paper's values (docs/METHOD.md)
    for the input's class space (COCO's for coco91/coco81, VOC's otherwise)."""

    scales: tuple[float, ...] | None = None  # fractions of short_side, one pass (two with flip)
    short_side: int | None = None  # reference short side the scales apply to
    flip: bool | None = None  # add a mirrored pass per scale
    window: int | None = None  # sliding-window side
    stride: int | None = None  # sliding-window step
    restrict_to_image_classes: bool = True  # only background + the image's labels
    use_crf: bool = True  # CRF post-processing (False: argmax of the probabilities)
    crf_iterations: int | None = None  # mean-field iterations (10)
    gaussian_sxy: float | None = None  # smoothness kernel std (VOC 3, COCO 1)
    gaussian_compat: float | None = None  # smoothness kernel weight (3)
    bilateral_sxy: float | None = None  # appearance kernel spatial std (VOC 83, COCO 67)
    bilateral_srgb: float | None = None  # appearance kernel colour std (VOC 5, COCO 3)
    bilateral_compat: float | None = None  # appearance kernel weight (VOC 3, COCO 4)
    splits: tuple[str, ...] | None = ("train",)  # splits to process; None = all rows
    cam_bg_threshold: float = 0.43  # background of the CAM-argmax baseline (metrics, report)
    report_images: int = 8  # images in report/ (0 = no report)
    max_error_fraction: float = 0.01  # above this share of quarantined rows the job fails

    def __post_init__(self) -> None:
        if self.splits is not None and (
            not self.splits or not all(isinstance(s, str) and s for s in self.splits)
        ):
            raise ValueError("splits: a non-empty list of split names, or null for all rows")
        if not 0 < self.cam_bg_threshold < 1:
            raise ValueError("cam_bg_threshold: must be in (0, 1)")
        check_fields(self, ">= 0", "report_images")
        check_fields(self, "in [0, 1]", "max_error_fraction")
        check_fields(self, ">= 1", "short_side", "window", "stride", "crf_iterations")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride: must be <= window={self.window}, got {self.stride}")
        if self.scales is not None and (not self.scales or min(self.scales) <= 0):
            raise ValueError(f"scales: must be non-empty and positive, got {self.scales}")
        neutral = InferenceConfig(window=max(self.window or 1, self.stride or 1), stride=1)
        self.inference(neutral, "custom")  # CRFConfig checks the CRF fields

    def inference(self, base: InferenceConfig, class_space: str) -> InferenceConfig:
        """The resolved settings: `base` (the checkpoint's) with the given fields over it."""
        published = COCO_POST_CRF if class_space.startswith("coco") else VOC_POST_CRF
        crf = replace(published, **self._given(_CRF_FIELDS))
        restrict = self.restrict_to_image_classes
        return replace(
            base, **self._given(_INFERENCE_FIELDS), restrict_to_image_classes=restrict, crf=crf
        )

    def _given(self, names: dict[str, str]) -> dict[str, Any]:
        """{their field: our value} of `names` ({their field: our field}) given (not None)."""
        return {
            k: getattr(self, ours) for k, ours in names.items() if getattr(self, ours) is not None
        }


def stage_config(
    config: PseudoMaskConfig, inference: InferenceConfig, checkpoint: VerifiedCheckpoint
) -> dict[str, Any]:
    """What fingerprints an output: resolved recipe, splits, report size, class names and the
    checkpoint digest, with a released checkpoint's model config (not the error tolerance, so a
    failed run can be resumed with another)."""
    recipe = asdict(inference)
    if not config.use_crf:
        recipe["crf"] = None
    released = checkpoint.layout == "released"
    return {
        **({"released_model": to_dict(checkpoint.config)} if released else {}),
        "inference": recipe,
        "splits": list(config.splits) if config.splits is not None else None,
        "cam_bg_threshold": config.cam_bg_threshold,
        "report_images": config.report_images,
        "class_names": list(checkpoint.class_names),
        "checkpoint_sha256": checkpoint.sha256,
    }


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one scale")
    return values


def add_options(stage: argparse._ArgumentGroup) -> None:
    """The job's own options (`jobs.pseudo_masks`); `config_fields` maps them to the config."""
    add = stage.add_argument
    add("--checkpoint", required=True, metavar="URI", help="train's model.pt or a released .pth")
    released = "a released .pth's architecture: YAML or JSON model fields over vit-b-16 (default)"
    add("--released-config", metavar="FILE", help=released)
    add("--scales", type=_scales, metavar="S,S,...", help="default: the checkpoint preset's")
    add("--no-flip", action="store_true", help="no mirrored passes")
    add("--no-restrict", action="store_true", help="all classes, not just the image's labels")
    add("--no-crf", action="store_true", help="argmax without CRF")
    add("--splits", metavar="S,S|all", help="splits to process (default train; all = every row)")
    add("--report-images", type=int, metavar="N", help="images in report/ (8)")
    add_max_error_fraction(stage)
    add("--cpus-per-actor", type=float, default=1.0, metavar="N", help="CPUs per model replica")
    device = "gpu when present (auto)"
    add("--device", choices=("auto", "cpu", "gpu"), default="auto", help=device)
    add_progress_every(stage, "a progress line every N images (default: one every 10 s)")


def released_model(args: argparse.Namespace, storage: StorageOptions) -> WeakCLIPConfig | None:
    """`--released-config`'s model config over the `vit-b-16` preset (None: not given).

    Raises:
        UsageError: unreadable file, or fields the model config refuses.
    """
    if not args.released_config:
        return None
    values = load_config_file(args.released_config, storage)
    try:
        return from_dict(values, WeakCLIPConfig, base=preset("vit-b-16"))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--released-config: {e}") from None


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the flags set (None: not given; `--splits all` sets `splits` to None)."""
    flags: dict[str, Any] = {
        **given(args, "scales", "report_images", "max_error_fraction"),
        "flip": False if args.no_flip else None,
        "restrict_to_image_classes": False if args.no_restrict else None,
        "use_crf": False if args.no_crf else None,
    }
    if args.splits is not None:
        flags["splits"] = NULL if args.splits == "all" else comma_list(args.splits)
    return flags


def run_options(args: argparse.Namespace, options: JobOptions) -> dict[str, Any]:
    """The keyword arguments of `run_pseudo_masks` that the job's flags give."""
    return {
        "actor_pool_size": options.resources.actor_pool_size,
        "cpus_per_actor": args.cpus_per_actor,
        "batch_size": options.resources.batch_size,
        "use_gpu": DEVICES[args.device],
        "progress_every": args.progress_every,
        **stage_kwargs(options),
    }
