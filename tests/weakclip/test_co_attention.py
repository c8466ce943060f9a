"""Tests for co-attention matching."""

from __future__ import annotations

import pytest
import torch

from weakclip.co_attention import CoAttentionMatching

EMBED_DIM = 16


def _module(
    *,
    layers: int = 2,
    temperature_init: float = 0.1,
    chain_layers: bool = True,
    dropout: float = 0.0,
) -> CoAttentionMatching:
    return CoAttentionMatching(
        embed_dim=EMBED_DIM,
        width=8,
        heads=2,
        layers=layers,
        dropout=dropout,
        mlp_ratio=2,
        temperature_init=temperature_init,
        chain_layers=chain_layers,
    )


def _inputs(
    batch: int, classes: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(batch, EMBED_DIM),
        torch.randn(batch, EMBED_DIM, height, width),
        torch.randn(classes, EMBED_DIM),
    )


@pytest.mark.parametrize(("classes", "height", "width"), [(3, 3, 3), (21, 2, 5)])
def test_output_shapes(classes: int, height: int, width: int) -> None:
    global_out, dense_out, text_out = _module()(*_inputs(2, classes, height, width))
    assert global_out.shape == (2, EMBED_DIM)
    assert dense_out.shape == (2, EMBED_DIM, height, width)
    assert text_out.shape == (2, classes, EMBED_DIM)


def test_shared_text_equals_per_image_text() -> None:
    module = _module().eval()
    global_embedding, dense, text = _inputs(2, 3, 2, 3)
    shared = module(global_embedding, dense, text)
    per_image = module(global_embedding, dense, text.expand(2, -1, -1))
    for a, b in zip(shared, per_image, strict=True):
        torch.testing.assert_close(a, b)


def test_batch_elements_are_independent() -> None:
    module = _module().eval()
    global_embedding, dense, text = _inputs(2, 3, 2, 3)
    both = module(global_embedding, dense, text)
    first = module(global_embedding[:1], dense[:1], text)
    for a, b in zip(both, first, strict=True):
        torch.testing.assert_close(a[:1], b)


def test_temperatures_start_at_their_initial_value() -> None:
    module = _module(temperature_init=0.25)
    for temperature in (module.text_temperature, module.visual_temperature):
        assert temperature.shape == (EMBED_DIM,)
        assert torch.equal(temperature, torch.full((EMBED_DIM,), 0.25))


def test_zero_temperatures_leave_the_inputs_unchanged() -> None:
    global_embedding, dense, text = _inputs(2, 4, 3, 2)
    global_out, dense_out, text_out = _module(temperature_init=0.0)(global_embedding, dense, text)
    torch.testing.assert_close(global_out, global_embedding)
    torch.testing.assert_close(dense_out, dense)
    torch.testing.assert_close(text_out, text.expand(2, -1, -1))


def test_outputs_move_with_nonzero_temperatures() -> None:
    global_embedding, dense, text = _inputs(2, 4, 3, 2)
    global_out, dense_out, text_out = _module()(global_embedding, dense, text)
    assert not torch.allclose(global_out, global_embedding)
    assert not torch.allclose(dense_out, dense)
    assert not torch.allclose(text_out, text.expand(2, -1, -1))


def _same_weights(chained: CoAttentionMatching, unchained: CoAttentionMatching) -> None:
    unchained.load_state_dict(chained.state_dict())


@pytest.mark.parametrize("layers", [2, 3])
def test_unchained_layers_differ_from_chained(layers: int) -> None:
    chained = _module(layers=layers).eval()
    unchained = _module(layers=layers, chain_layers=False).eval()
    _same_weights(chained, unchained)
    inputs = _inputs(2, 3, 2, 2)
    for a, b in zip(chained(*inputs), unchained(*inputs), strict=True):
        assert not torch.allclose(a, b)


def test_chaining_is_irrelevant_for_one_layer() -> None:
    chained = _module(layers=1).eval()
    unchained = _module(layers=1, chain_layers=False).eval()
    _same_weights(chained, unchained)
    inputs = _inputs(2, 3, 2, 2)
    for a, b in zip(chained(*inputs), unchained(*inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_unchained_stack_is_its_last_layer_alone() -> None:
    # The released loop `for layer in layers: delta = layer(x, memory)` keeps only the last
    # layer's output on the original input: a one-layer model holding the last layer's weights.
    unchained = _module(layers=3, chain_layers=False).eval()
    single = _module(layers=1).eval()
    state = {
        key.replace("_layers.2.", "_layers.0."): value
        for key, value in unchained.state_dict().items()
        if "_layers.0." not in key and "_layers.1." not in key
    }
    single.load_state_dict(state)
    inputs = _inputs(2, 3, 2, 2)
    for a, b in zip(unchained(*inputs), single(*inputs), strict=True):
        torch.testing.assert_close(a, b)


def _loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum((out * torch.randn_like(out)).sum() for out in outputs)


def test_every_parameter_gets_a_gradient() -> None:
    module = _module(layers=2, dropout=0.1).train()
    global_embedding, dense, text = _inputs(2, 3, 2, 3)
    text.requires_grad_(True)
    _loss(module(global_embedding, dense, text)).backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_unchained_dead_layers_get_no_gradient() -> None:
    module = _module(layers=3, chain_layers=False)
    _loss(module(*_inputs(2, 3, 2, 3))).backward()
    for name, parameter in module.named_parameters():
        dead = "_layers.0." in name or "_layers.1." in name
        assert (parameter.grad is None) == dead, name


@pytest.mark.parametrize(
    ("global_shape", "dense_shape", "text_shape"),
    [
        ((2, EMBED_DIM), (2, EMBED_DIM + 1, 2, 2), (3, EMBED_DIM)),
        ((1, EMBED_DIM), (2, EMBED_DIM, 2, 2), (3, EMBED_DIM)),
        ((2, EMBED_DIM), (2, EMBED_DIM, 2, 2), (3, 3, EMBED_DIM)),
        ((2, EMBED_DIM), (2, EMBED_DIM, 2, 2), (3, EMBED_DIM - 1)),
    ],
    ids=["dense-width", "global-batch", "text-batch", "text-width"],
)
def test_rejects_mismatched_shapes(
    global_shape: tuple[int, ...], dense_shape: tuple[int, ...], text_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError):
        _module()(torch.randn(global_shape), torch.randn(dense_shape), torch.randn(text_shape))


def test_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        CoAttentionMatching(
            embed_dim=EMBED_DIM,
            width=10,
            heads=4,
            layers=1,
            dropout=0.0,
            mlp_ratio=2,
            temperature_init=0.1,
        )
