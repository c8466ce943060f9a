"""WeakCLIP's training losses: seeding + boundary (online dense CRF) + 0.4 x auxiliary.

The method and its numbers: docs/METHOD.md. Seed labels are in the model's class space with
background = 0 and 255 = ignore. The boundary loss's CRF target Q is computed outside the graph
(numpy, `weakclip.crf`) from `loss_probabilities(...)`, usually in a process pool while the GPU
works; pass it back here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
BACKGROUND = 0

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(int(s) != s or s < 1 for s in pair):
        raise ValueError(f"size must be a positive int or (h, w), got {size}")
    return int(pair[0]), int(pair[1])


def _check_seeds(seeds: torch.Tensor, num_classes: int, batch: int) -> None:
    if seeds.ndim != 3 or seeds.shape[0] != batch:
        raise ValueError(f"seeds must be B x H x W with B = {batch}, got {tuple(seeds.shape)}")
    if seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be an integer tensor, got {seeds.dtype}")
    invalid = (seeds != IGNORE_INDEX) & ((seeds < 0) | (seeds >= num_classes))
    if bool(invalid.any()):
        raise ValueError(f"seeds hold class ids outside [0, {num_classes}) besides 255")


def resize_logits(logits: torch.Tensor, *, size: Size) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of B x K x h x w logits to B x K x size."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be B x K x h x w, got {tuple(logits.shape)}")
    target = _pair(size)
    if tuple(logits.shape[-2:]) == target:
        return logits
    return F.interpolate(logits, size=target, mode="bilinear", align_corners=False)


def loss_probabilities(logits: torch.Tensor, *, size: Size) -> torch.Tensor:
    """P of the seeding and boundary losses: softmax of the logits resized to `size`.

    Args:
        logits: B x K x h x w decoder logits.
        size: loss resolution (64 at 512 input).

    Returns:
        B x K x size probabilities in float32 (the CRF wants them detached, on the CPU).
    """
    return torch.softmax(resize_logits(logits, size=size).float(), dim=1)


def downsample_seeds(seeds: torch.Tensor, *, size: Size) -> torch.Tensor:
    """Nearest-neighbour downsampling of B x H x W integer seeds to B x size (long)."""
    target = _pair(size)
    if tuple(seeds.shape[-2:]) == target:
        return seeds.long()
    # Class ids and 255 are exact in float32, so the round trip loses nothing.
    small = F.interpolate(seeds[:, None].float(), size=target, mode="nearest")
    return small[:, 0].long()


def seeding_loss(
    logits: torch.Tensor, seeds: torch.Tensor, *, size: Size, log_epsilon: float = 0.0
) -> torch.Tensor:
    """Seeding loss: mean_batch(L_bg) + mean_batch(L_fg) on seed pixels at the loss resolution.

    Per image, L_bg = -sum over background seeds of log P_bg / max(#bg, 1e-4) and
    L_fg = -sum over foreground seeds of log P_seed-class / max(#fg, 1e-4): background and
    foreground are balanced however many pixels each has; an image with no seed of one kind
    contributes 0 for it (and still counts in the batch mean).

    Args:
        logits: B x K x h x w logits (class 0 = background).
        seeds: B x H x W integer labels in [0, K) or 255 (ignore).
        size: loss resolution; logits are resized bilinearly, seeds by nearest neighbour.
        log_epsilon: 0 takes log_softmax; > 0 takes log(softmax + log_epsilon), the released
            code's 1e-7 (`loss.seeding_log_epsilon`), which caps a pixel's loss near 16.

    Returns:
        Scalar loss.
    """
    batch, num_classes = logits.shape[:2]
    _check_seeds(seeds, num_classes, batch)
    resized = resize_logits(logits, size=size).float()
    if log_epsilon > 0:
        log_p = torch.log(torch.softmax(resized, dim=1) + log_epsilon)
    else:
        log_p = torch.log_softmax(resized, dim=1)  # B x K x s x s
    small = downsample_seeds(seeds, size=size)  # B x s x s
    valid = small != IGNORE_INDEX
    background = small == BACKGROUND
    foreground = valid & ~background
    # Ignored pixels index class 0 here, and are masked out just below.
    index = torch.where(valid, small, torch.zeros_like(small))
    log_p_seed = log_p.gather(1, index[:, None])[:, 0]  # B x s x s

    def per_image(mask: torch.Tensor) -> torch.Tensor:
        total = -(log_p_seed * mask).flatten(1).sum(1)
        count = mask.flatten(1).sum(1).to(total.dtype).clamp_min(1e-4)
        return total / count

    return per_image(background).mean() + per_image(foreground).mean()


def boundary_loss(
    probs: torch.Tensor,
    crf_q: torch.Tensor,
    *,
    prob_floor: float = 1e-4,
    ratio_min: float = 0.05,
    ratio_max: float = 20.0,
    clamp_probs: bool = True,
) -> torch.Tensor:
    """Boundary loss: mean over pixels of sum_c Q_c log(clip(Q_c / P_c, ratio_min, ratio_max)).

    Q is the dense-CRF refinement of P (computed without gradient), clamped to prob_floor and
    renormalised; P is clamped to prob_floor. It is a KL(Q || P) whose per-class log-ratio is
    clipped, so gradients flow through P only, and not where the ratio or P is clipped.

    Args:
        probs: B x K x h x w softmax probabilities P (from `loss_probabilities`).
        crf_q: B x K x h x w CRF marginals Q (any device/dtype; detached here).
        prob_floor, ratio_min, ratio_max: the clamps above.
        clamp_probs: False leaves P unclamped (the released code; `loss.clamp_boundary_probs`),
            so gradients also flow where P < prob_floor unless the ratio is clipped.

    Returns:
        Scalar loss; 0 where Q == P (and P >= prob_floor).
    """
    if probs.ndim != 4 or crf_q.shape != probs.shape:
        raise ValueError(
            f"probs and crf_q must both be B x K x h x w, got {tuple(probs.shape)} and "
            f"{tuple(crf_q.shape)}"
        )
    q = crf_q.detach().to(device=probs.device, dtype=torch.float32).clamp_min(prob_floor)
    q = q / q.sum(dim=1, keepdim=True)
    p = probs.float().clamp_min(prob_floor) if clamp_probs else probs.float()
    ratio = (q / p).clamp(ratio_min, ratio_max)
    return (q * torch.log(ratio)).sum(dim=1).mean()


def auxiliary_loss(
    score_map: torch.Tensor,
    seeds: torch.Tensor,
    *,
    tau: float = 0.07,
    over_all_pixels: bool = False,
    size: Size | None = None,
) -> torch.Tensor:
    """Auxiliary loss: cross-entropy of score_map / tau, upsampled to the seeds' size.

    Args:
        score_map: B x K x h x w text-to-pixel cosine similarities.
        seeds: B x H x W integer labels, 255 = ignore.
        tau: temperature.
        over_all_pixels: divide by every pixel, ignored ones included (mmseg 0.19's mean, the
            released code; `loss.aux_over_all_pixels`) instead of the valid ones.
        size: None upsamples to the seeds' H x W (the paper); a size instead downsamples the
            seeds to it by nearest neighbour and upsamples the score map to it
            (`loss.aux_resolution`): the cost is B x K x size, 16x less at 64 for a 256 crop.

    Returns:
        Scalar: the summed cross-entropy over valid pixels divided by their number (or by all
        pixels); 0 (with a graph) when every pixel is ignored.
    """
    batch, num_classes = score_map.shape[:2]
    _check_seeds(seeds, num_classes, batch)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if size is not None:
        seeds = downsample_seeds(seeds, size=size)
    logits = F.interpolate(
        score_map.float() / tau, size=tuple(seeds.shape[-2:]), mode="bilinear", align_corners=False
    )
    total = F.cross_entropy(logits, seeds.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = seeds.numel() if over_all_pixels else (seeds != IGNORE_INDEX).sum().clamp_min(1)
    return total / count


@dataclass(frozen=True)
class WeakCLIPLoss:
    """The total loss (with its graph) and each term as a detached float for logging."""

    total: torch.Tensor
    seeding: float
    boundary: float
    auxiliary: float

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_seeding": self.seeding,
            "loss_boundary": self.boundary,
            "loss_auxiliary": self.auxiliary,
        }


def weakclip_loss(
    *,
    logits: torch.Tensor,
    score_map: torch.Tensor,
    seeds: torch.Tensor,
    crf_q: torch.Tensor | None,
    size: Size,
    aux_weight: float = 0.4,
    boundary_weight: float = 1.0,
    tau: float = 0.07,
    prob_floor: float = 1e-4,
    ratio_min: float = 0.05,
    ratio_max: float = 20.0,
    log_epsilon: float = 0.0,
    clamp_probs: bool = True,
    aux_over_all_pixels: bool = False,
    aux_size: Size | None = None,
) -> WeakCLIPLoss:
    """total = seeding + boundary_weight x boundary + aux_weight x auxiliary.

    Args:
        logits: B x K x h x w decoder logits.
        score_map: B x K x h' x w' text-to-pixel score map.
        seeds: B x H x W seed labels at the input size, 255 = ignore.
        crf_q: B x K x size CRF marginals of `loss_probabilities(logits, size=size)` (detached),
            or None to leave the boundary term out (an ablation; the paper always uses it).
        size: loss resolution of the seeding and boundary terms.
        aux_weight: weight of the auxiliary term (0.4 in the paper).
        boundary_weight: weight of the boundary term (1 in the paper).
        tau, prob_floor, ratio_min, ratio_max, log_epsilon, clamp_probs: see the single
            losses; aux_over_all_pixels, aux_size: `auxiliary_loss`'s over_all_pixels, size.
    """
    seeding = seeding_loss(logits, seeds, size=size, log_epsilon=log_epsilon)
    if crf_q is None:
        boundary = seeding.new_zeros(())
    else:
        probs = loss_probabilities(logits, size=size)
        boundary = boundary_loss(
            probs,
            crf_q,
            prob_floor=prob_floor,
            ratio_min=ratio_min,
            ratio_max=ratio_max,
            clamp_probs=clamp_probs,
        )
    auxiliary = auxiliary_loss(
        score_map, seeds, tau=tau, over_all_pixels=aux_over_all_pixels, size=aux_size
    )
    total = seeding + boundary_weight * boundary + aux_weight * auxiliary
    return WeakCLIPLoss(
        total=total,
        seeding=float(seeding.detach()),
        boundary=float(boundary.detach()),
        auxiliary=float(auxiliary.detach()),
    )
