"""Fully connected CRF (Krähenbühl & Koltun) through pydensecrf: pure numpy in, numpy out.

Three CRFs in WeakCLIP share this code (docs/METHOD.md): the offline seed refinement, the
online CRF of the boundary loss (64 x 64 images, every training step) and the post-processing of
pseudo masks. They differ only in the unary and the pairwise parameters.

pydensecrf's Cython signatures take typed memoryviews, which refuse read-only buffers ("buffer
source array is read-only"); Ray Data and shared-memory arrays are read-only, so every array is
made writable and C-contiguous here, copying only when needed. pydensecrf holds the GIL:
parallelise with processes (`boundary_crf_targets` is a picklable top-level function).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {getattr(image, 'dtype', image)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be H x W x 3 RGB, got shape {image.shape}")
    return np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE", "ALIGNED"])


def crf_inference(
    image: np.ndarray,
    unary: np.ndarray,
    *,
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
) -> np.ndarray:
    """Mean-field inference of a dense CRF with Potts Gaussian + bilateral pairwise terms.

    Args:
        image: H x W x 3 uint8 RGB (read-only or strided arrays are accepted).
        unary: K x N energies (negative log-probabilities), N = H * W, e.g. from
            pydensecrf's `unary_from_softmax` or `unary_from_labels`.
        iterations: mean-field iterations (0 returns the softmax of the negative unary).
        gaussian_sxy, gaussian_compat: smoothness kernel (spatial std in pixels, weight).
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel (spatial std,
            colour std, weight).

    Returns:
        K x H x W float32 marginals Q (each pixel sums to 1).

    Raises:
        ValueError: wrong dtype/shape, non-finite unary, or a negative iteration count.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    if not isinstance(unary, np.ndarray) or unary.ndim != 2 or unary.shape[0] < 1:
        raise ValueError(f"unary must be a K x N array, got {getattr(unary, 'shape', unary)}")
    if unary.shape[1] != height * width:
        raise ValueError(f"unary has {unary.shape[1]} nodes, image has {height} x {width}")
    if not np.all(np.isfinite(unary)):
        raise ValueError("unary holds non-finite energies")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations}")
    num_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.require(unary, np.float32, ["C_CONTIGUOUS", "WRITEABLE", "ALIGNED"]))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat
    )
    q = np.asarray(crf.inference(int(iterations)), dtype=np.float32)
    return q.reshape(num_labels, height, width)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    prob_floor: float = 1e-4,
) -> np.ndarray:
    """Dense CRF with a probability ("softmax") unary: U = -log(max(P, prob_floor)).

    Args:
        image: H x W x 3 uint8 RGB.
        probs: K x H x W class probabilities (or any non-negative scores: a per-pixel scale only
            shifts every label's energy by the same amount, which mean-field ignores, although
            the floor then acts at a different relative level).
        iterations, gaussian_*, bilateral_*: see `crf_inference`.
        prob_floor: probabilities are clamped to [prob_floor, 1] before the log.

    Returns:
        K x H x W float32 marginals Q (each pixel sums to 1).

    Raises:
        ValueError: shapes or dtypes do not match, or probabilities are negative or not finite.
    """
    image = _check_image(image)
    if not isinstance(probs, np.ndarray) or not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be a float numpy array, got {getattr(probs, 'dtype', probs)}")
    if probs.ndim != 3 or probs.shape[0] < 1 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs must be K x H x W with H x W = {image.shape[:2]}, got shape {probs.shape}"
        )
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    if not 0 < prob_floor < 1:
        raise ValueError(f"prob_floor must be in (0, 1), got {prob_floor}")
    unary = unary_from_softmax(probs.astype(np.float32, copy=False), clip=prob_floor)
    return crf_inference(
        image,
        unary,
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
    )


def crf_labels(probs: np.ndarray, class_mask: np.ndarray, *, tolerance: float = 1e-4) -> np.ndarray:
    """The labels the CRF of one image must keep: its own classes and every other class whose
    probability exceeds `tolerance` somewhere.

    With the Potts model pydensecrf uses, the mean-field update of label l reads only label l's
    own unary and its own marginals at other pixels; labels interact only through the per-pixel
    normalisation. A label whose probability is at most the unary floor everywhere has the
    constant energy -log(floor) and receives (almost) no pairwise support, so its marginal stays
    below about floor / (1 - K_dropped * floor) at every pixel: dropping it changes the kept
    labels' marginals by a relative O(K_dropped * floor) (≈ 2e-3 for VOC at floor 1e-4, 9e-3
    for COCO's 91 ids), the same order as the clamping the boundary loss applies to Q anyway.
    The argument holds label by label, so an absent class the model predicts over a coherent
    region is kept (the full CRF keeps it too) while the others are dropped; in the 91-id space
    that is most of the classes, and the CRF's cost is linear in the number of labels.

    Args:
        probs: K x H x W probabilities.
        class_mask: K bool, True for the classes the image has (background included).
        tolerance: the largest probability of a dropped label (the unary floor).

    Returns:
        K bool, True for the labels to keep (a superset of `class_mask`).
    """
    class_mask = np.asarray(class_mask, dtype=bool)
    return class_mask | (probs.reshape(probs.shape[0], -1).max(axis=1) > tolerance)


def boundary_crf_target(
    image: np.ndarray,
    probs: np.ndarray,
    class_mask: np.ndarray | None = None,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 80,
    bilateral_srgb: float = 13,
    bilateral_compat: float = 10,
    prob_floor: float = 1e-4,
    absent_tolerance: float | None = None,
) -> np.ndarray:
    """The boundary-loss CRF target Q for one image (docs/METHOD.md defaults).

    Args:
        image: h x w x 3 uint8 RGB, the training image resized to the loss resolution.
        probs: K x h x w softmax probabilities of the current prediction at that resolution.
        class_mask: K bool, True for background and the image's labels, or None for all
            classes. The CRF runs over these and the absent classes with more than
            `absent_tolerance` probability somewhere (see `crf_labels`); the dropped classes
            get Q = 0 (the loss clamps Q to its floor and renormalises).
        iterations, gaussian_*, bilateral_*, prob_floor: see `dense_crf`.
        absent_tolerance: the largest probability of an absent class the CRF drops; None =
            prob_floor (exact up to O(floor)). Larger values trade exactness for speed (see
            `crf_labels`).

    Returns:
        K x h x w float32 Q, each pixel summing to 1.
    """
    params: dict[str, Any] = {
        "iterations": iterations,
        "gaussian_sxy": gaussian_sxy,
        "gaussian_compat": gaussian_compat,
        "bilateral_sxy": bilateral_sxy,
        "bilateral_srgb": bilateral_srgb,
        "bilateral_compat": bilateral_compat,
        "prob_floor": prob_floor,
    }
    if class_mask is None:
        return dense_crf(image, probs, **params)
    class_mask = np.asarray(class_mask, dtype=bool)
    if class_mask.shape != probs.shape[:1]:
        raise ValueError(f"class_mask shape {class_mask.shape} != ({probs.shape[0]},)")
    if not class_mask.any():
        raise ValueError("class_mask selects no class (background must be present)")
    tolerance = prob_floor if absent_tolerance is None else absent_tolerance
    keep = crf_labels(probs, class_mask, tolerance=tolerance)
    if keep.all():
        return dense_crf(image, probs, **params)
    q = np.zeros(probs.shape, np.float32)
    q[keep] = dense_crf(image, probs[keep], **params)
    return q


def boundary_crf_targets(
    images: np.ndarray,
    probs: np.ndarray,
    class_masks: np.ndarray | None = None,
    **params: float,
) -> np.ndarray:
    """`boundary_crf_target` over a batch; top-level, so a process pool can pickle it.

    Args:
        images: B x h x w x 3 uint8 RGB at the loss resolution.
        probs: B x K x h x w softmax probabilities.
        class_masks: B x K bool (background + labels per image) or None.
        **params: keyword arguments of `boundary_crf_target` (iterations, pairwise, floor).

    Returns:
        B x K x h x w float32 Q.
    """
    if images.ndim != 4 or probs.ndim != 4 or images.shape[0] != probs.shape[0]:
        raise ValueError(
            f"images must be B x h x w x 3 and probs B x K x h x w, got {images.shape} and "
            f"{probs.shape}"
        )
    if class_masks is not None and np.shape(class_masks) != probs.shape[:2]:
        raise ValueError(f"class_masks shape {np.shape(class_masks)} != {probs.shape[:2]}")
    out = np.empty(probs.shape, np.float32)
    for i in range(images.shape[0]):
        mask = None if class_masks is None else class_masks[i]
        out[i] = boundary_crf_target(images[i], probs[i], mask, **params)  # type: ignore[arg-type]
    return out
