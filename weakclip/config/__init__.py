"""Configuration of the WeakCLIP model, its losses, inference and training (docs/METHOD.md).

One frozen dataclass per component and a root `WeakCLIPConfig` (`components`). Defaults
reproduce the paper (ViT-B/16 at 512 x 512 on VOC); `preset("tiny")` is a few-million-parameter
model for tests and the demo (`presets`). Every dataclass validates itself in `__post_init__`
and raises `ValueError` naming the offending field. `to_dict`/`from_dict` give a JSON-able form
for checkpoints and `--config` files; `from_dict` refuses fields it does not know (`serialize`).

This package imports nothing heavier than the standard library so that jobs can parse and
validate a configuration before importing torch.
"""

from weakclip.config.components import (
    BOUNDARY_CRF,
    COCO_POST_CRF,
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
    check_fields,
)
from weakclip.config.presets import (
    DATASETS,
    PRESETS,
    PROFILES,
    for_dataset,
    preset,
    profile,
    released,
    released_forward,
)
from weakclip.config.serialize import (
    ConfigT,
    from_dict,
    to_dict,
)

__all__ = [
    "AdapterConfig",
    "BOUNDARY_CRF",
    "CLIPConfig",
    "COCO_POST_CRF",
    "CRFConfig",
    "CoAttentionConfig",
    "ConfigT",
    "CustomCLIPConfig",
    "DATASETS",
    "DecoderConfig",
    "InferenceConfig",
    "LossConfig",
    "PRESETS",
    "PROFILES",
    "PromptConfig",
    "TrainConfig",
    "VOC_POST_CRF",
    "WeakCLIPConfig",
    "check_fields",
    "for_dataset",
    "from_dict",
    "preset",
    "profile",
    "released",
    "released_forward",
    "to_dict",
]
