"""medseg.losses: deep-supervision weights and the Dice + cross-entropy loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.losses import DiceCELoss, deep_supervision_weights

K = 3  # classes including background
SHAPE = (16, 16, 16)


def _label(batch: int = 2, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    label = torch.randint(0, K, (batch, 1, *shape), generator=torch.Generator().manual_seed(seed))
    assert set(label.unique().tolist()) == set(range(K))  # every class present (Dice of all classes)
    return label


def _one_hot_logits(label: torch.Tensor, margin: float = 30.0) -> torch.Tensor:
    """Logits that put `margin` on the labelled class: softmax ~ one-hot."""
    return F.one_hot(label[:, 0], K).movedim(-1, 1).float() * margin


def _reference(logits: np.ndarray, label: np.ndarray, smooth: float = 1e-5) -> float:
    """Mean cross-entropy + (1 - mean batch-Dice of the foreground classes), written out in numpy."""
    logits = logits.astype(np.float64)
    label = label[:, 0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(log_p, label[:, None], axis=1)
    cross_entropy = -picked.mean()
    p = np.exp(log_p)
    dices = []
    for c in range(1, logits.shape[1]):
        truth = (label == c).astype(np.float64)
        intersection = (p[:, c] * truth).sum()
        dices.append((2 * intersection + smooth) / (p[:, c].sum() + truth.sum() + smooth))
    return float(cross_entropy + 1 - np.mean(dices))


# --- deep_supervision_weights -------------------------------------------------------------------


def test_deep_supervision_weights_four_outputs():
    weights = deep_supervision_weights(4)
    assert len(weights) == 4
    assert sum(weights) == pytest.approx(1.0)
    assert weights[-1] == 0.0
    assert weights[1] == pytest.approx(weights[0] / 2)
    assert weights[2] == pytest.approx(weights[1] / 2)
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])


@pytest.mark.parametrize("outputs", [2, 3, 5, 6])
def test_deep_supervision_weights_general(outputs):
    weights = deep_supervision_weights(outputs)
    assert len(weights) == outputs
    assert sum(weights) == pytest.approx(1.0)
    assert weights[-1] == 0.0
    for finer, coarser in zip(weights[:-2], weights[1:-1]):
        assert coarser == pytest.approx(finer / 2)


def test_single_output_gets_all_the_weight():
    assert deep_supervision_weights(1) == [1.0]


# --- DiceCELoss ---------------------------------------------------------------------------------


def test_perfect_logits_give_near_zero_loss():
    label = _label()
    logits = _one_hot_logits(label)
    # The two halves separately: CE ~ 0, foreground Dice ~ 1.
    assert F.cross_entropy(logits, label[:, 0]).item() < 1e-6
    loss = DiceCELoss()(logits, label)
    assert loss.ndim == 0
    assert 0.0 <= loss.item() < 1e-4


def test_wrong_logits_give_large_loss():
    label = _label()
    wrong = (label + 1) % K  # every voxel confidently assigned to another class
    loss = DiceCELoss()(_one_hot_logits(wrong), label)
    # CE ~ margin (30) and Dice ~ 0 (so 1 - Dice ~ 1)
    assert loss.item() > 25.0
    assert loss.item() == pytest.approx(_reference(_one_hot_logits(wrong).numpy(), label.numpy()),
                                        rel=1e-4)


def test_matches_a_straightforward_reference():
    label = _label(seed=3)
    logits = torch.randn(2, K, *SHAPE, generator=torch.Generator().manual_seed(4)) * 2
    loss = DiceCELoss()(logits, label)
    assert loss.item() == pytest.approx(_reference(logits.numpy(), label.numpy()), rel=1e-5)


def test_per_sample_dice_averages_each_samples_dice():
    label = _label(seed=6)
    logits = torch.randn(2, K, *SHAPE, generator=torch.Generator().manual_seed(7)) * 2
    per_sample = DiceCELoss(batch_dice=False)(logits, label).item()
    # Cross-entropy is the same mean over all voxels; the Dice term is the mean of the samples' terms.
    ce = F.cross_entropy(logits, label[:, 0]).item()
    dice_terms = [_reference(logits[i:i + 1].numpy(), label[i:i + 1].numpy())
                  - F.cross_entropy(logits[i:i + 1], label[i:i + 1, 0]).item() for i in range(2)]
    assert per_sample == pytest.approx(ce + np.mean(dice_terms), rel=1e-5)


def test_per_sample_dice_counts_a_missed_small_structure():
    # Sample 0: a large structure, found; sample 1: a small one, missed. Over the batch the miss
    # hardly shows; per sample it costs half of that class's Dice.
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :6] = 1
    label[1, 0, :1, :2, :2] = 1
    found = label.clone()
    found[1] = 0
    logits = _one_hot_logits(found)
    batch, per_sample = DiceCELoss()(logits, label).item(), DiceCELoss(batch_dice=False)(logits, label).item()
    assert per_sample - batch > 0.2


def test_uniform_logits():
    # CE = log K; each foreground class's (batch) Dice follows from its voxel count alone.
    label = _label(seed=5)
    logits = torch.zeros(2, K, *SHAPE)
    loss = DiceCELoss()(logits, label).item()
    counts = np.bincount(label.numpy().ravel(), minlength=K)
    n = label.numel()
    dices = [2 * (counts[c] / K) / (n / K + counts[c]) for c in range(1, K)]
    assert loss == pytest.approx(np.log(K) + 1 - np.mean(dices), rel=1e-4)


def test_deep_supervision_list_with_lower_resolution_outputs():
    label = _label()
    full = torch.randn(2, K, *SHAPE, generator=torch.Generator().manual_seed(6))
    half = torch.randn(2, K, 8, 8, 8, generator=torch.Generator().manual_seed(7))
    quarter = torch.randn(2, K, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    loss_fn = DiceCELoss()
    loss = loss_fn([full, half, quarter], label)
    # Nearest-neighbour downsampling by 2 keeps the voxels at even indices.
    label_half = label[:, :, ::2, ::2, ::2]
    w = deep_supervision_weights(3)
    expected = w[0] * loss_fn(full, label) + w[1] * loss_fn(half, label_half)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # The coarsest output has weight 0: changing it changes nothing.
    assert loss_fn([full, half, quarter * 100], label).item() == pytest.approx(loss.item())


def test_lower_resolution_output_that_is_perfect_for_the_nearest_label():
    label = _label()
    label_half = label[:, :, ::2, ::2, ::2]
    outputs = [_one_hot_logits(label), _one_hot_logits(label_half), torch.zeros(2, K, 4, 4, 4)]
    assert DiceCELoss()(outputs, label).item() < 1e-4
    # The same output judged against the other (odd) voxels is wrong for most of them.
    shifted = [_one_hot_logits(label), _one_hot_logits(label[:, :, 1::2, 1::2, 1::2]),
               torch.zeros(2, K, 4, 4, 4)]
    assert DiceCELoss()(shifted, label).item() > 1.0


def test_label_given_as_float_or_uint8():
    label = _label()
    logits = torch.randn(2, K, *SHAPE, generator=torch.Generator().manual_seed(9))
    reference = DiceCELoss()(logits, label)
    torch.testing.assert_close(DiceCELoss()(logits, label.float()), reference)
    torch.testing.assert_close(DiceCELoss()(logits, label.to(torch.uint8)), reference)


def test_gradients_flow_to_every_weighted_output():
    label = _label()
    full = torch.randn(2, K, *SHAPE, requires_grad=True)
    half = torch.randn(2, K, 8, 8, 8, requires_grad=True)
    quarter = torch.randn(2, K, 4, 4, 4, requires_grad=True)
    DiceCELoss()([full, half, quarter], label).backward()
    for grad in (full.grad, half.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
    assert quarter.grad is None or not quarter.grad.any()  # weight 0


def test_gradient_descends():
    label = _label()
    logits = torch.randn(2, K, *SHAPE, generator=torch.Generator().manual_seed(10)).requires_grad_()
    loss_fn = DiceCELoss()
    before = loss_fn(logits, label)
    before.backward()
    with torch.no_grad():
        after = loss_fn(logits - 1.0 * logits.grad / logits.grad.norm(), label)
    assert after < before


def test_float32_result_under_bf16_autocast():
    label = _label()
    base = torch.randn(2, K, *SHAPE, generator=torch.Generator().manual_seed(11))
    logits = base.to(torch.bfloat16).requires_grad_()
    half = torch.randn(2, K, 8, 8, 8).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        single = DiceCELoss()(logits, label)
        listed = DiceCELoss()([logits, half, torch.zeros(2, K, 4, 4, 4, dtype=torch.bfloat16)], label)
    assert single.dtype == torch.float32
    assert listed.dtype == torch.float32
    # Computed in float32 from the bf16 logits: same value as the float32 loss of those logits.
    torch.testing.assert_close(single, DiceCELoss()(logits.detach().float(), label))
    listed.backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.float().abs().sum() > 0
