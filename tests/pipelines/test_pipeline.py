"""The chain's WeakCLIP schedule per class space (`pipelines.pipeline._weakclip`)."""

from __future__ import annotations

import pytest

from pipelines.pipeline import DEMO_CONFIG, PipelineConfig, _weakclip
from weakclip.config import from_dict


def _demo() -> PipelineConfig:
    return from_dict(dict(DEMO_CONFIG), PipelineConfig)


@pytest.mark.parametrize(("space", "iterations"), [("voc", 450), ("coco91", 600), ("coco81", 600)])
def test_demo_trains_twice_as_long_in_coco_class_spaces(space: str, iterations: int) -> None:
    assert _weakclip(_demo(), space).train.iterations == iterations


def test_coco_iterations_unset_keeps_iterations_and_preset() -> None:
    assert _weakclip(PipelineConfig(iterations=7), "coco91").train.iterations == 7
    assert _weakclip(PipelineConfig(model="tiny"), "coco91").train.iterations == 200


def test_coco_iterations_must_be_positive() -> None:
    with pytest.raises(ValueError, match="coco_iterations"):
        PipelineConfig(coco_iterations=0)
