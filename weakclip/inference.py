"""Sliding-window and multi-scale + flip inference for pseudo masks (docs/METHOD.md).

The model is any callable from a batch of normalised images to class logits at any resolution,
so these functions serve the WeakCLIP segmentor and the retrained network alike. They build no
autograd graph of their own but do not switch it off either: call them under
`torch.inference_mode()` (and, on GPU, `torch.autocast`) in the caller. Everything runs on the
image's device; logits are cast to float32 as they leave the model, so accumulation and softmax
are float32 whatever precision the model computes in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # B x 3 x h x w -> B x K x h' x w'

DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # of short_side


def sliding_window_logits(
    model_fn: ModelFn,
    image: torch.Tensor,
    *,
    num_classes: int,
    window: int = 512,
    stride: int = 341,
    max_windows_per_call: int = 8,
    pad_small: bool = True,
) -> torch.Tensor:
    """Logits of a whole image from overlapping square windows.

    Windows start every `stride` pixels and the last one in each direction is shifted back to
    end at the border (mmseg's `slide_inference` grid), so every pixel is covered. Each
    window's logits are resized bilinearly to the window and overlapping windows are averaged.
    An image smaller than the window is padded bottom/right with 0 — the mean colour after
    normalisation, which is also what training pads crops with — and the result cropped back;
    with `pad_small` False its windows are cut to the image instead (mmseg's slide inference).

    Args:
        model_fn: B x 3 x window x window -> B x K x h' x w' logits at any resolution.
        image: 1 x 3 x H x W normalised image.
        num_classes: K, checked against the model's output.
        window: side of the square window.
        stride: step between windows, 1 <= stride <= window.
        max_windows_per_call: windows batched into one model call (bounds memory).
        pad_small: pad a side shorter than the window (`inference.pad_small_images`).

    Returns:
        1 x K x H x W float32 logits on the image's device.
    """
    _check_image(image)
    _check_positive(
        num_classes=num_classes, window=window, max_windows_per_call=max_windows_per_call
    )
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    height, width = image.shape[-2:]
    win_h, win_w, tops, lefts = _window_grid(
        height, width, window=window, stride=stride, pad_small=pad_small
    )
    pad_bottom, pad_right = max(win_h - height, 0), max(win_w - width, 0)
    if pad_bottom or pad_right:
        image = F.pad(image, (0, pad_right, 0, pad_bottom), value=0.0)
    padded_height, padded_width = image.shape[-2:]
    corners = [(top, left) for top in tops for left in lefts]
    logit_sum = image.new_zeros((num_classes, padded_height, padded_width), dtype=torch.float32)
    count = image.new_zeros((padded_height, padded_width), dtype=torch.float32)
    for first in range(0, len(corners), max_windows_per_call):
        chunk = corners[first : first + max_windows_per_call]
        crops = torch.cat(
            [image[:, :, top : top + win_h, left : left + win_w] for top, left in chunk]
        )
        logits = model_fn(crops)  # B x K x h' x w'
        if logits.ndim != 4 or logits.shape[:2] != (len(chunk), num_classes):
            raise ValueError(
                f"model_fn returned shape {tuple(logits.shape)} for {len(chunk)} windows, "
                f"expected ({len(chunk)}, {num_classes}, h, w)"
            )
        logits = logits.float()
        if logits.shape[-2:] != (win_h, win_w):
            logits = F.interpolate(
                logits, size=(win_h, win_w), mode="bilinear", align_corners=False
            )
        for crop_logits, (top, left) in zip(logits, chunk, strict=True):
            logit_sum[:, top : top + win_h, left : left + win_w] += crop_logits
            count[top : top + win_h, left : left + win_w] += 1
    mean_logits = logit_sum / count  # K x H_pad x W_pad; count >= 1 everywhere by construction
    return mean_logits[None, :, :height, :width]


def multiscale_probabilities(
    model_fn: ModelFn,
    image: torch.Tensor,
    *,
    num_classes: int,
    scales: Sequence[float] = DEFAULT_SCALES,
    short_side: int = 512,
    flip: bool = True,
    window: int = 512,
    stride: int = 341,
    class_mask: torch.Tensor | None = None,
    max_windows_per_call: int = 8,
    pad_small: bool = True,
) -> torch.Tensor:
    """Class probabilities averaged over scales and horizontal flips (6 × 2 = 12 passes).

    Per pass: rescale the image so its short side is `scale · short_side` (bilinear,
    antialiased when shrinking; new side = int(side·f + 0.5)), optionally mirror it, run
    `sliding_window_logits`, softmax over classes, mirror back, and resize the probabilities
    bilinearly to the original H x W. The result is the plain mean of the passes. (mmseg
    resized logits, not probabilities, before the softmax; resizing probabilities keeps each
    pass a proper distribution at every pixel.)

    With `class_mask`, logits of classes outside the mask are set to -inf before the softmax,
    so their probability is exactly 0 at every pixel and the allowed classes share all the
    mass — the restriction to background + image-level classes (docs/METHOD.md).

    Args:
        model_fn: B x 3 x h x w -> B x K x h' x w' logits.
        image: 1 x 3 x H x W normalised image at its original size.
        num_classes: K.
        scales: fractions of `short_side`, one pass (two with flip) each.
        short_side: reference short side, 512 in the paper.
        flip: also predict on the mirrored image.
        window: sliding-window side.
        stride: sliding-window step.
        class_mask: K bool, True for the classes allowed in this image, or None for all.
        max_windows_per_call: windows batched into one model call.
        pad_small: see `sliding_window_logits`.

    Returns:
        K x H x W float32 probabilities on the image's device, summing to 1 over K.
    """
    _check_image(image)
    _check_positive(num_classes=num_classes, short_side=short_side)
    if len(scales) == 0 or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    allowed = None
    if class_mask is not None:
        if class_mask.dtype != torch.bool or class_mask.shape != (num_classes,):
            raise ValueError(
                f"class_mask must be a bool tensor of shape ({num_classes},), "
                f"got {class_mask.dtype} {tuple(class_mask.shape)}"
            )
        if not bool(class_mask.any()):
            raise ValueError("class_mask allows no class")
        allowed = class_mask.to(image.device)[:, None, None]  # K x 1 x 1
    height, width = image.shape[-2:]
    prob_sum = image.new_zeros((num_classes, height, width), dtype=torch.float32)
    passes = 0
    for scale in scales:
        size = _pass_size(height, width, scale=scale, short_side=short_side)
        scaled = _resize(image, size=size)
        for mirrored in (False, True) if flip else (False,):
            net_input = scaled.flip(-1) if mirrored else scaled
            logits = sliding_window_logits(
                model_fn,
                net_input,
                num_classes=num_classes,
                window=window,
                stride=stride,
                max_windows_per_call=max_windows_per_call,
                pad_small=pad_small,
            )[0]  # K x h x w
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = logits.softmax(dim=0)
            if mirrored:
                probs = probs.flip(-1)
            prob_sum += _resize(probs[None], size=(height, width))[0]
            passes += 1
    return prob_sum / passes


def window_equivalents(
    height: int,
    width: int,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    short_side: int = 512,
    flip: bool = True,
    window: int = 512,
    stride: int = 341,
    pad_small: bool = True,
) -> float:
    """The model work `multiscale_probabilities` does on an H x W image, in full windows: the
    sum over its passes and their windows of each window's area / window² (a window cut to a
    small image counts its share). Multiplied by the seconds of one window, the model seconds
    of an image (a cost estimate: attention grows faster than the area)."""
    _check_positive(height=height, width=width, short_side=short_side, window=window)
    total = 0.0
    for scale in scales:
        h, w = _pass_size(height, width, scale=scale, short_side=short_side)
        win_h, win_w, tops, lefts = _window_grid(
            h, w, window=window, stride=stride, pad_small=pad_small
        )
        total += len(tops) * len(lefts) * (win_h * win_w) / window**2
    return total * (2 if flip else 1)


def _pass_size(height: int, width: int, *, scale: float, short_side: int) -> tuple[int, int]:
    """(h, w) of one pass: the image rescaled so that its short side is `scale · short_side`."""
    factor = scale * short_side / min(height, width)
    return _scaled(height, factor), _scaled(width, factor)


def _window_grid(
    height: int, width: int, *, window: int, stride: int, pad_small: bool
) -> tuple[int, int, list[int], list[int]]:
    """(window height, window width, top offsets, left offsets) of the sliding windows over an
    H x W image: square windows over the image padded to the window (`pad_small`), or windows
    cut to a side shorter than the window."""
    win_h, win_w = (window, window) if pad_small else (min(window, height), min(window, width))
    tops = _window_starts(max(height, win_h), window=win_h, stride=stride)
    lefts = _window_starts(max(width, win_w), window=win_w, stride=stride)
    return win_h, win_w, tops, lefts


def _window_starts(length: int, *, window: int, stride: int) -> list[int]:
    """Start offsets along one axis; requires length >= window."""
    num_windows = (length - window + stride - 1) // stride + 1
    return [min(index * stride, length - window) for index in range(num_windows)]


def _scaled(side: int, factor: float) -> int:
    return max(1, int(side * factor + 0.5))


def _resize(tensor: torch.Tensor, *, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a 1 x C x h x w tensor; antialiased when shrinking."""
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    shrinking = size[0] < tensor.shape[-2] or size[1] < tensor.shape[-1]
    return F.interpolate(
        tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"image must be 1 x 3 x H x W, got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a normalised floating-point tensor, got {image.dtype}")
    if min(image.shape[-2:]) == 0:
        raise ValueError("empty image")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
