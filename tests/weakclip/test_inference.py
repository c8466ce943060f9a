from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakclip.inference import multiscale_probabilities, sliding_window_logits, window_equivalents

K = 5


class PixelLinear:
    """A per-pixel linear model (1 x 1 conv) that counts its calls and windows."""

    def __init__(self, seed: int = 0, *, out_dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(K, 3, 1, 1, generator=generator)
        self.bias = torch.randn(K, generator=generator)
        self.out_dtype = out_dtype
        self.calls = 0
        self.windows = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.windows += images.shape[0]
        return F.conv2d(images, self.weight, self.bias).to(self.out_dtype)


class ColumnDependent(PixelLinear):
    """Per-pixel linear plus a term that grows with the column: not flip-equivariant."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = super().__call__(images)
        width = images.shape[-1]
        ramp = torch.linspace(0.0, 3.0, width)  # W
        class_weights = torch.arange(K, dtype=torch.float32)[:, None, None]  # K x 1 x 1
        return logits + class_weights * ramp


def _image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "height, width, window, stride",
    [
        (40, 56, 16, 10),  # window < image, stride does not divide
        (40, 56, 24, 24),  # no overlap
        (40, 56, 17, 5),  # odd window, many overlaps
        (20, 30, 64, 43),  # window > image in both directions: padded
        (20, 70, 32, 21),  # window > height only
    ],
)
def test_sliding_window_equals_full_image(
    height: int, width: int, window: int, stride: int
) -> None:
    model = PixelLinear()
    image = _image(height, width)
    expected = F.conv2d(image, model.weight, model.bias)
    result = sliding_window_logits(model, image, num_classes=K, window=window, stride=stride)
    assert result.shape == (1, K, height, width) and result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_window_batching_does_not_change_the_result() -> None:
    image = _image(40, 56)
    batched, single = PixelLinear(), PixelLinear()
    full = sliding_window_logits(
        batched, image, num_classes=K, window=16, stride=10, max_windows_per_call=100
    )
    one = sliding_window_logits(
        single, image, num_classes=K, window=16, stride=10, max_windows_per_call=1
    )
    assert batched.calls == 1
    assert (
        single.calls == single.windows == batched.windows == 4 * 5
    )  # starts 0,10,20,24 down; 0,10,20,30,40 across
    torch.testing.assert_close(full, one)


def test_low_resolution_logits_are_upsampled_to_the_window() -> None:
    def quarter_resolution(images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        logits = torch.zeros(batch, K, height // 4, width // 4)
        logits[:, 2] = 1.0
        return logits

    result = sliding_window_logits(
        quarter_resolution, _image(40, 56), num_classes=K, window=16, stride=10
    )
    expected = torch.zeros(1, K, 40, 56)
    expected[:, 2] = 1.0
    torch.testing.assert_close(result, expected)


def test_wrong_model_output_is_rejected() -> None:
    with pytest.raises(ValueError, match="model_fn returned"):
        sliding_window_logits(
            lambda x: torch.zeros(x.shape[0], K + 1, 4, 4),
            _image(8, 8),
            num_classes=K,
            window=8,
            stride=8,
        )


def test_single_scale_without_flip_is_softmax_of_the_model() -> None:
    model = PixelLinear()
    image = _image(24, 36)
    probs = multiscale_probabilities(
        model, image, num_classes=K, scales=(1.0,), short_side=24, flip=False, window=16, stride=10
    )
    expected = F.conv2d(image, model.weight, model.bias).softmax(dim=1)[0]
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_flip_is_mirrored_back() -> None:
    # One window covering the whole image, so the column term is the same in both references.
    model = ColumnDependent()
    image = _image(32, 32)
    probs = multiscale_probabilities(
        model, image, num_classes=K, scales=(1.0,), short_side=32, flip=True, window=32, stride=32
    )
    plain = model(image).softmax(dim=1)[0]
    mirrored = model(image.flip(-1)).softmax(dim=1)[0].flip(-1)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the test model is flip-sensitive
    torch.testing.assert_close(probs, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)


def test_class_mask_zeroes_other_classes_and_probabilities_sum_to_one() -> None:
    model = PixelLinear()
    image = _image(30, 45)
    class_mask = torch.tensor([True, False, True, False, False])
    probs = multiscale_probabilities(
        model,
        image,
        num_classes=K,
        scales=(0.5, 1.0, 1.5),
        short_side=30,
        window=16,
        stride=11,
        class_mask=class_mask,
    )
    assert probs.shape == (K, 30, 45) and probs.dtype == torch.float32
    assert (probs[~class_mask] == 0).all()
    assert (probs[class_mask] > 0).all()
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(30, 45))
    unrestricted = multiscale_probabilities(
        model, image, num_classes=K, scales=(0.5, 1.0, 1.5), short_side=30, window=16, stride=11
    )
    assert (unrestricted[~class_mask] > 0).all()
    torch.testing.assert_close(unrestricted.sum(dim=0), torch.ones(30, 45))


def test_six_scales_with_flip_make_twelve_passes() -> None:
    model = PixelLinear()
    image = _image(30, 40)
    probs = multiscale_probabilities(
        model, image, num_classes=K, short_side=32, window=32, stride=21, max_windows_per_call=64
    )
    assert model.calls == 12
    assert probs.shape == (K, 30, 40)
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(30, 40))
    # A per-pixel model on a constant image gives the same distribution at every scale.
    flat = torch.full((1, 3, 30, 40), 0.3)
    flat_probs = multiscale_probabilities(
        model, flat, num_classes=K, short_side=32, window=32, stride=21
    )
    expected = model(flat[:, :, :1, :1]).softmax(dim=1)[0, :, 0, 0]
    torch.testing.assert_close(flat_probs, expected[:, None, None].expand(K, 30, 40))


def test_low_precision_model_output_accumulates_in_float32() -> None:
    model = PixelLinear(out_dtype=torch.bfloat16)
    probs = multiscale_probabilities(
        model,
        _image(20, 28),
        num_classes=K,
        scales=(1.0, 1.25),
        short_side=20,
        window=16,
        stride=10,
    )
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(20, 28))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"class_mask": torch.zeros(K, dtype=torch.bool)},
        {"class_mask": torch.ones(K + 1, dtype=torch.bool)},
        {"class_mask": torch.ones(K)},
        {"scales": ()},
        {"stride": 0},
        {"stride": 40},
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"num_classes": K, "window": 16, "stride": 10, **kwargs}
    with pytest.raises(ValueError):
        multiscale_probabilities(PixelLinear(), _image(20, 20), **arguments)  # type: ignore[arg-type]


def test_rejects_batched_or_integer_images() -> None:
    with pytest.raises(ValueError):
        sliding_window_logits(
            PixelLinear(), _image(8, 8).repeat(2, 1, 1, 1), num_classes=K, window=8, stride=8
        )
    with pytest.raises(ValueError):
        sliding_window_logits(
            PixelLinear(),
            torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
            num_classes=K,
            window=8,
            stride=8,
        )


def test_an_image_smaller_than_the_window_runs_as_is_without_padding() -> None:
    # D6: mmseg's slide inference cuts the window to the image instead of padding it.
    model = PixelLinear()
    seen: list[tuple[int, int]] = []

    def recording(images: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(images.shape[-2:]))
        return model(images)

    image = _image(20, 70)
    padded = sliding_window_logits(recording, image, num_classes=K, window=32, stride=21)
    assert set(seen) == {(32, 32)}
    seen.clear()
    as_is = sliding_window_logits(
        recording, image, num_classes=K, window=32, stride=21, pad_small=False
    )
    assert set(seen) == {(20, 32)}
    # A per-pixel model gives the same logits either way; the windows differ.
    torch.testing.assert_close(as_is, padded)
    torch.testing.assert_close(as_is, model(image))


@pytest.mark.parametrize("pad_small", [True, False])
def test_window_equivalents_count_the_model_work_of_the_passes(pad_small: bool) -> None:
    seen: list[float] = []

    def model_fn(crops: torch.Tensor) -> torch.Tensor:
        seen.extend([crops.shape[-2] * crops.shape[-1] / 64**2] * crops.shape[0])
        return torch.zeros(crops.shape[0], 3, *crops.shape[-2:])

    kwargs = dict(scales=(0.5, 1.0, 1.6), short_side=64, flip=True, window=64, stride=40)
    image = torch.zeros(1, 3, 50, 90)
    multiscale_probabilities(model_fn, image, num_classes=3, pad_small=pad_small, **kwargs)
    expected = window_equivalents(50, 90, pad_small=pad_small, **kwargs)
    assert sum(seen) == pytest.approx(expected) and len(seen) > 6
