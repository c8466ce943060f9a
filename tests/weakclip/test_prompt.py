"""The prompt text encoder: shapes, gradients, parity with open_clip, no silent truncation."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from torch import nn

from weakclip.build import build_clip
from weakclip.config import preset
from weakclip.prompt import PromptTextEncoder, class_name_tokens, prompt_name

VOC_NAMES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return build_clip(preset("tiny").clip).eval()


@pytest.mark.parametrize("names", [VOC_NAMES[:3], VOC_NAMES])
def test_shapes(names: list[str]) -> None:
    clip = tiny_clip()
    encoder = PromptTextEncoder(clip=clip, class_names=names, num_context=8, context_length=13)
    features = encoder()
    assert features.shape == (len(names), clip.text_projection.shape[1])
    assert encoder.class_names == tuple(names) and encoder.num_classes == len(names)
    assert encoder.context.shape == (8, clip.token_embedding.embedding_dim)
    assert encoder.positional_embedding.shape[0] == 13


def test_context_is_truncated_normal_with_unit_std() -> None:
    clip = tiny_clip()
    torch.manual_seed(1)
    encoder = PromptTextEncoder(clip=clip, class_names=["cat"], num_context=64, context_length=77)
    values = encoder.context.detach().flatten()
    assert values.abs().max() <= 2.0
    assert 0.8 < values.std().item() < 0.95  # std of N(0, 1) cut at +-2 is 0.88


def test_gradient_reaches_only_the_context() -> None:
    encoder = PromptTextEncoder(
        clip=tiny_clip(), class_names=VOC_NAMES[:4], num_context=8, context_length=13
    )
    encoder.train()
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable == ["context"]
    encoder().pow(2).sum().backward()
    assert encoder.context.grad is not None and encoder.context.grad.abs().sum() > 0
    for name, parameter in encoder.named_parameters():
        if name != "context":
            assert parameter.grad is None, name


def test_parity_with_open_clip_without_context() -> None:
    clip = tiny_clip()
    with torch.no_grad():
        expected = clip.encode_text(open_clip.tokenize(VOC_NAMES))
    encoder = PromptTextEncoder(
        clip=clip, class_names=VOC_NAMES, num_context=0, context_length=clip.context_length
    )
    with torch.no_grad():
        actual = encoder()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_context_sits_between_start_token_and_class_name() -> None:
    # Context vectors equal to the embeddings of "a photo of" must reproduce the plain prompt.
    clip = tiny_clip()
    names = ["cat", "dining table"]
    with torch.no_grad():
        expected = clip.encode_text(open_clip.tokenize([f"a photo of {n}" for n in names]))
    prefix = class_name_tokens("a photo of")
    encoder = PromptTextEncoder(
        clip=clip, class_names=names, num_context=len(prefix), context_length=clip.context_length
    )
    with torch.no_grad():
        encoder.context.copy_(clip.token_embedding.weight[prefix])
        actual = encoder()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_every_voc_name_fits_the_paper_prompt() -> None:
    assert max(len(class_name_tokens(name)) for name in VOC_NAMES) <= 3
    PromptTextEncoder(clip=tiny_clip(), class_names=VOC_NAMES, num_context=8, context_length=13)


def test_every_coco91_name_fits_unused_ids_included() -> None:
    from pipelines.io.class_spaces import COCO91

    names = COCO91.class_names
    assert len(names) == 91 and "unused_12" in names
    encoder = PromptTextEncoder(
        clip=tiny_clip(), class_names=names, num_context=8, context_length=13
    )
    assert encoder.class_names == tuple(names)  # the names themselves are kept
    assert encoder().shape[0] == 91
    # Placeholder ids are prompted by the word "unused"; a real name is prompted as itself.
    assert prompt_name("unused_12") == "unused" and prompt_name("person") == "person"
    assert prompt_name("unused_bag") == "unused_bag"


def test_too_long_name_is_an_error_not_a_truncation() -> None:
    name = "extraordinarily long class name"
    count = len(class_name_tokens(name))
    assert count > 3
    with pytest.raises(ValueError, match=rf"{name!r} is {count} BPE tokens"):
        PromptTextEncoder(
            clip=tiny_clip(), class_names=["background", name], num_context=8, context_length=13
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_names": []}, "class_names"),
        ({"class_names": ["  "]}, "empty name"),
        ({"num_context": -1}, "num_context"),
        ({"context_length": 10}, "context_length"),
        ({"context_length": 78}, "context_length"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"class_names": ["cat"], "num_context": 8, "context_length": 13, **kwargs}
    with pytest.raises(ValueError, match=message):
        PromptTextEncoder(clip=tiny_clip(), **arguments)


def test_frozen_modules_stay_in_eval_mode() -> None:
    encoder = PromptTextEncoder(
        clip=tiny_clip(), class_names=["cat"], num_context=8, context_length=13
    )
    parent = nn.ModuleDict({"text": encoder})
    parent.train()
    assert encoder.training
    assert not encoder.transformer.training and not encoder.ln_final.training
