"""WeakCLIP losses against values computed by hand (docs/METHOD.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weakclip.config import LossConfig
from weakclip.losses import (
    auxiliary_loss,
    boundary_loss,
    downsample_seeds,
    loss_probabilities,
    seeding_loss,
    weakclip_loss,
)


def _logits_from_probs(p: list[list[float]]) -> torch.Tensor:
    """1 x K x 1 x N logits whose softmax is p (K lists of N pixel probabilities)."""
    return torch.log(torch.tensor(p, dtype=torch.float64))[None, :, None, :]


def test_seeding_loss_two_classes_by_hand() -> None:
    # 1 x 2 x 1 x 4 image: per-pixel P_bg = 0.9, 0.6, 0.3, 0.5 (P_fg = 1 - P_bg).
    logits = _logits_from_probs([[0.9, 0.6, 0.3, 0.5], [0.1, 0.4, 0.7, 0.5]])
    seeds = torch.tensor([[[0, 0, 1, 255]]])
    loss = seeding_loss(logits, seeds, size=(1, 4))
    expected_bg = -(math.log(0.9) + math.log(0.6)) / 2
    expected_fg = -math.log(0.7) / 1
    assert loss.item() == pytest.approx(expected_bg + expected_fg, rel=1e-6)


def test_seeding_loss_batch_means_and_empty_kinds() -> None:
    # Image 0 has only background seeds, image 1 only foreground (class 2 of 3).
    p0 = [[0.5, 0.25], [0.25, 0.5], [0.25, 0.25]]
    p1 = [[0.2, 0.2], [0.2, 0.3], [0.6, 0.5]]
    logits = torch.cat([_logits_from_probs(p0), _logits_from_probs(p1)])
    seeds = torch.tensor([[[0, 0]], [[2, 255]]])
    loss = seeding_loss(logits, seeds, size=(1, 2))
    l_bg = [-(math.log(0.5) + math.log(0.25)) / 2, 0.0]
    l_fg = [0.0, -math.log(0.6)]
    assert loss.item() == pytest.approx(sum(l_bg) / 2 + sum(l_fg) / 2, rel=1e-6)


def test_seeding_loss_resizes_and_gives_gradients() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    seeds = torch.randint(0, 3, (2, 32, 32))
    seeds[:, :4] = 255
    loss = seeding_loss(logits, seeds, size=16)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_seeding_loss_rejects_out_of_range_seeds() -> None:
    with pytest.raises(ValueError, match="outside"):
        seeding_loss(torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 3), size=4)
    with pytest.raises(ValueError, match="integer"):
        seeding_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), size=4)


def test_downsample_seeds_is_nearest_and_keeps_ignore() -> None:
    seeds = torch.tensor([[[0, 0, 7, 7], [0, 0, 7, 7], [255, 255, 3, 3], [255, 255, 3, 3]]])
    small = downsample_seeds(seeds, size=2)
    assert small.tolist() == [[[0, 7], [255, 3]]]
    assert small.dtype == torch.long


def test_boundary_loss_zero_when_q_equals_p() -> None:
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 4, 5, 5), dim=1)
    assert boundary_loss(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_boundary_loss_by_hand_with_both_clips() -> None:
    # One pixel, three classes. Ratios Q/P: 0.9/0.01 = 90 (clipped to 20),
    # 0.099/0.5 = 0.198 (kept), 0.001/0.49 ≈ 0.002 (clipped to 0.05).
    q = torch.tensor([0.9, 0.099, 0.001]).view(1, 3, 1, 1)
    p = torch.tensor([0.01, 0.5, 0.49]).view(1, 3, 1, 1)
    expected = 0.9 * math.log(20) + 0.099 * math.log(0.099 / 0.5) + 0.001 * math.log(0.05)
    assert boundary_loss(p, q).item() == pytest.approx(expected, rel=1e-5)


def test_boundary_loss_floors_and_renormalises_q() -> None:
    q = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    p = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    q_floor = torch.tensor([1.0, 1e-4]) / (1 + 1e-4)
    expected = float(q_floor[0] * math.log(q_floor[0] / 0.5) + q_floor[1] * math.log(0.05))
    assert boundary_loss(p, q).item() == pytest.approx(expected, rel=1e-5)


def test_boundary_loss_gradient_reaches_p_only_where_unclipped() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.5, 0.0]]).T.reshape(1, 3, 1, 2)
    logits.requires_grad_(True)
    p = torch.softmax(logits, dim=1)
    q = torch.tensor([[0.2, 0.5, 0.3], [0.98, 0.01, 0.01]]).T.reshape(1, 3, 1, 2)
    q.requires_grad_(True)
    boundary_loss(p, q).backward()
    assert q.grad is None
    assert logits.grad is not None and logits.grad[..., 0].abs().sum() > 0

    # Ratios 900 and 0.002 are clipped (no gradient to those P); 0.099 / 0.499 is not.
    p2 = torch.tensor([0.001, 0.5, 0.499], requires_grad=True)
    q2 = torch.tensor([0.9, 0.001, 0.099])
    boundary_loss(p2.view(1, 3, 1, 1), q2.view(1, 3, 1, 1)).backward()
    assert p2.grad is not None
    assert p2.grad[0].item() == 0 and p2.grad[1].item() == 0 and p2.grad[2].item() != 0


def test_auxiliary_loss_equals_cross_entropy() -> None:
    score = torch.tensor([[[[0.2, -0.1]], [[0.1, 0.3]], [[-0.2, 0.0]]]])  # 1 x 3 x 1 x 2
    seeds = torch.tensor([[[0, 0, 1, 2], [255, 1, 2, 255]]])  # 1 x 2 x 4
    tau = 0.07
    up = F.interpolate(score / tau, size=(2, 4), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, seeds, ignore_index=255)
    assert auxiliary_loss(score, seeds, tau=tau).item() == pytest.approx(expected.item(), 1e-6)


def test_auxiliary_loss_by_hand() -> None:
    # 1 x 2 x 1 x 1 scores, one seed pixel of class 1: CE = -log softmax(score / tau)[1].
    score = torch.tensor([0.3, 0.1]).view(1, 2, 1, 1)
    expected = -math.log(math.exp(0.1 / 0.05) / (math.exp(0.3 / 0.05) + math.exp(0.1 / 0.05)))
    loss = auxiliary_loss(score, torch.tensor([[[1]]]), tau=0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_auxiliary_loss_all_ignored_is_zero_not_nan() -> None:
    score = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = auxiliary_loss(score, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()


def test_weakclip_loss_combines_terms() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    score = torch.randn(2, 3, 4, 4, requires_grad=True)
    seeds = torch.randint(0, 3, (2, 32, 32))
    q = torch.softmax(torch.randn(2, 3, 16, 16), dim=1)
    out = weakclip_loss(logits=logits, score_map=score, seeds=seeds, crf_q=q, size=16)
    p = loss_probabilities(logits, size=16)
    expected = (
        seeding_loss(logits, seeds, size=16)
        + boundary_loss(p, q)
        + 0.4 * auxiliary_loss(score, seeds)
    )
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.total.item() == pytest.approx(
        out.seeding + out.boundary + 0.4 * out.auxiliary, rel=1e-6
    )
    assert out.boundary > 0
    out.total.backward()
    assert logits.grad is not None and score.grad is not None
    assert set(out.as_dict()) == {"loss", "loss_seeding", "loss_boundary", "loss_auxiliary"}

    no_crf = weakclip_loss(logits=logits, score_map=score, seeds=seeds, crf_q=None, size=16)
    assert no_crf.boundary == 0.0
    weighted = weakclip_loss(
        logits=logits, score_map=score, seeds=seeds, crf_q=q, size=16, boundary_weight=0.1
    )
    assert weighted.boundary == pytest.approx(out.boundary)
    assert weighted.total.item() == pytest.approx(
        out.seeding + 0.1 * out.boundary + 0.4 * out.auxiliary, rel=1e-6
    )


def test_seeding_log_epsilon_caps_a_confidently_wrong_pixel() -> None:
    # D3: log(softmax + 1e-7) caps a pixel's loss at -log(1e-7) ~ 16.1; log_softmax does not.
    logits = torch.tensor([[[[-50.0]], [[50.0]]]])  # B=1, K=2, 1 x 1: all mass on class 1
    seeds = torch.zeros(1, 1, 1, dtype=torch.long)  # the seed says background
    plain = seeding_loss(logits, seeds, size=1)
    capped = seeding_loss(logits, seeds, size=1, log_epsilon=1e-7)
    assert plain.item() == pytest.approx(100.0, rel=1e-4)
    assert capped.item() == pytest.approx(-math.log(1e-7), rel=1e-4)


def test_boundary_loss_without_the_probability_clamp() -> None:
    # D4: P = 5e-5 under the floor 1e-4: clamped the class's ratio is 2 and P gets no gradient;
    # unclamped the ratio is 4 and P's gradient is -Q / P.
    p = torch.tensor([5e-5, 1 - 5e-5], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_()
    q = torch.tensor([2e-4, 1 - 2e-4]).view(1, 2, 1, 1)
    clamped = boundary_loss(p, q)
    unclamped = boundary_loss(p, q, clamp_probs=False)
    assert (unclamped - clamped).item() == pytest.approx(2e-4 * math.log(2), rel=1e-3)
    (grad_clamped,) = torch.autograd.grad(clamped, p)
    (grad_unclamped,) = torch.autograd.grad(unclamped, p)
    assert grad_clamped[0, 0].item() == 0.0
    assert grad_unclamped[0, 0].item() == pytest.approx(-2e-4 / 5e-5, rel=1e-3)


def test_auxiliary_loss_over_all_pixels_counts_the_ignored_ones() -> None:
    # D5: half the pixels ignored: mmseg 0.19's mean is half the mean over valid pixels.
    score = torch.randn(1, 3, 4, 4)
    seeds = torch.randint(0, 3, (1, 4, 4))
    seeds[:, :2] = 255
    valid = auxiliary_loss(score, seeds).item()
    every = auxiliary_loss(score, seeds, over_all_pixels=True).item()
    assert every == pytest.approx(valid / 2, rel=1e-6)


def test_auxiliary_loss_at_a_resolution_downsamples_the_seeds() -> None:
    # 4 x 4 seeds in 2 x 2 blocks: nearest downsampling to 2 x 2 keeps one label per block.
    score = torch.randn(1, 3, 2, 2)
    seeds = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])[None]
    small = torch.tensor([[[0, 1], [2, 255]]])
    expected = F.cross_entropy(score / 0.07, small, ignore_index=255)
    loss = auxiliary_loss(score, seeds, tau=0.07, size=2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert auxiliary_loss(score, seeds, tau=0.07, size=4).item() == pytest.approx(
        auxiliary_loss(score, seeds, tau=0.07).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="aux_resolution"):
        LossConfig(aux_resolution=0)
