"""PDL and SSL (method.md §7): hand-computed cases, a loop reference, empty cases, skipped classes, valid
tokens and gradient routing (PDL: none to the classifier W; SSL: to W and F)."""

from __future__ import annotations

import math

import pytest
import torch

from cpews.prototype_losses import pdl_loss, prototype_region_masks, ssl_loss


def _one_image(values: list[list[float]]) -> torch.Tensor:
    """(D, N) nested list -> (1, D, 1, N)."""
    return torch.tensor(values)[None, :, None, :]


# ------------------------------------------------------------------------------------------------------------
# Masks (§7.1).
# ------------------------------------------------------------------------------------------------------------


def test_region_masks_normalize_over_valid_tokens_only():
    cams = torch.tensor([10.0, 2.0, 0.5, 0.1])[None, None, None, :]  # (1, 1, 1, 4)
    valid = torch.tensor([False, True, True, True])[None, None, :]
    # max over V = 2: A⁺ = [-, 2/2.0001, .5/2.0001 = .25, .1/2.0001 = .05] -> tokens 1, 2 (token 0 is invalid);
    # normalizing by the invalid 10 instead would have given .2, .05, .01 -> only token 1
    masks = prototype_region_masks(cams, valid, threshold=0.1)
    assert masks.flatten().tolist() == [False, True, True, False]
    all_valid = prototype_region_masks(cams, torch.ones_like(valid), threshold=0.1)
    assert all_valid.flatten().tolist() == [True, True, False, False]


def test_region_masks_empty_when_no_valid_activation():
    cams = torch.tensor([[-1.0, -0.5], [3.0, -2.0]])[None]  # (1, C=2, 2) as (B, C, h=1, w=2)
    cams = cams[:, :, None, :]
    valid = torch.tensor([[True, True]])[:, None, :]
    masks = prototype_region_masks(cams, valid)
    assert masks[0, 0].sum() == 0 and masks[0, 1].flatten().tolist() == [True, False]
    no_valid = prototype_region_masks(cams, torch.zeros_like(valid))
    assert not no_valid.any()


# ------------------------------------------------------------------------------------------------------------
# PDL (§7.2).
# ------------------------------------------------------------------------------------------------------------


def _pdl_case():
    tokens = _one_image([[1.0, 5.0, 0.0], [3.0, 7.0, 0.0]])  # t0 = (1, 3), t1 = (5, 7), t2 = (0, 0); D = 2
    cams = torch.tensor([2.0, 0.1, 50.0])[None, None, None, :]  # t2 is padding: max over V = 2
    valid = torch.tensor([True, True, False])[None, None, :]
    labels = torch.ones(1, 1)
    pos = torch.tensor([[[0.0, 1.0], [2.0, 1.0], [99.0, 99.0]]])  # p̄ = (1, 1); the third row is padding
    neg = torch.tensor([[[1.0, 5.0], [4.0, 7.0], [1.0, 3.0]]])  # the padding row would be the closest
    return tokens, cams, valid, labels, pos, torch.tensor([2]), neg, torch.tensor([2])


def test_pdl_hand_computed():
    tokens, cams, valid, labels, pos, pos_n, neg, neg_n = _pdl_case()
    out = pdl_loss(
        tokens, cams, labels, valid, pos, pos_n, neg, neg_n, region_threshold=0.1, temperature=13.0
    )
    # A⁺ = [2/2.0001, .1/2.0001 = .05] -> M = {t0}; r = (1, 3) / (1 + 1e-5) = (0.99999, 2.99997)
    r = (1 / 1.00001, 3 / 1.00001)
    # δ⁺ = sqrt(((r0 - 1)^2 + (r1 - 1)^2) / 2 + 1e-4) = sqrt(1.99994 + 1e-4) ≈ 1.414228
    delta_pos = math.sqrt(((r[0] - 1) ** 2 + (r[1] - 1) ** 2) / 2 + 1e-4)
    # to (1, 5): sqrt((1e-10 + 4.00012) / 2 + 1e-4) ≈ 1.414270; to (4, 7): ≈ 3.5356 -> closest ≈ 1.414270
    delta_neg = math.sqrt(((r[0] - 1) ** 2 + (r[1] - 5) ** 2) / 2 + 1e-4)
    # ℓ⁺ = 1.414228/13 + 0.1 ≈ 0.208787; s⁻ = exp(-(1.414270/13 + 0.1)) ≈ 0.811566, ℓ⁻ = -log(1 - s⁻) ≈ 1.669006
    expected = (delta_pos / 13 + 0.1) - math.log(1 - math.exp(-(delta_neg / 13 + 0.1)))
    assert expected == pytest.approx(1.877792, abs=1e-6)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert int(out.pairs) == 1
    assert float(out.rms_pos) == pytest.approx(delta_pos, rel=1e-5)
    assert float(out.rms_neg) == pytest.approx(delta_neg, rel=1e-5)


def _pdl_reference(tokens, cams, labels, valid, pos, pos_n, neg, neg_n, threshold, tau):
    """A per-pair loop straight from the §7.1-§7.2 formulas."""
    plus, minus = [], []
    batch, classes = labels.shape
    for b in range(batch):
        v = valid[b].flatten()
        f = tokens[b].flatten(1)  # (D, N)
        for c in range(classes):
            a = cams[b, c].flatten()
            top = a[v].max() if v.any() else torch.tensor(-1.0)
            if labels[b, c] < 0.5 or top <= 0 or pos_n[c] == 0 or neg_n[c] == 0:
                continue
            mask = v & (torch.relu(a) / (top + 1e-4) > threshold)
            if not mask.any():
                continue
            r = f[:, mask].sum(dim=1) / (mask.sum() + 1e-5)
            delta = lambda u: torch.sqrt(((r - u) ** 2).mean() + 1e-4)  # noqa: E731
            plus.append(delta(pos[c, : pos_n[c]].mean(0)) / tau + 0.1)
            s = max(torch.exp(-(delta(n) / tau + 0.1)) for n in neg[c, : neg_n[c]])
            minus.append(-torch.log(1 - s))
    if not plus:
        return torch.tensor(0.0), 0
    return torch.stack(plus).mean() + torch.stack(minus).mean(), len(plus)


def test_pdl_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    b, c, d, h, w, k = 3, 4, 5, 3, 4, 3
    tokens = torch.randn(b, d, h, w, generator=g)
    cams = torch.randn(b, c, h, w, generator=g)
    cams[2, 1] = -torch.rand(h, w, generator=g)  # a present class with no activation
    labels = torch.ones(b, c)
    labels[0, 2] = 0
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[0], valid[1, :2, 1:], valid[2, 1:, :] = True, True, True
    pos, neg = torch.randn(c, k, d, generator=g), torch.randn(c, k, d, generator=g)
    pos_n, neg_n = torch.tensor([3, 1, 2, 2]), torch.tensor([2, 3, 1, 0])  # class 3: no negatives
    pos[torch.arange(k)[None] >= pos_n[:, None]] = 0
    neg[torch.arange(k)[None] >= neg_n[:, None]] = 0
    out = pdl_loss(tokens, cams, labels, valid, pos, pos_n, neg, neg_n, region_threshold=0.1, temperature=2.0)
    expected, pairs = _pdl_reference(tokens, cams, labels, valid, pos, pos_n, neg, neg_n, 0.1, 2.0)
    # 12 (b, c) minus class 3 (3 pairs), (0, 2) absent and (2, 1) never activated: 7 pairs
    assert pairs == 7 and int(out.pairs) == pairs
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "case", ["no_label", "no_positives", "no_negatives", "no_activation", "only_padding"]
)
def test_pdl_empty_pair_set_gives_zero(case):
    tokens, cams, valid, labels, pos, pos_n, neg, neg_n = _pdl_case()
    tokens.requires_grad_(True)
    if case == "no_label":
        labels = torch.zeros_like(labels)
    elif case == "no_positives":
        pos_n = torch.tensor([0])
    elif case == "no_negatives":
        neg_n = torch.tensor([0])
    elif case == "no_activation":
        cams = -cams.abs()
    else:  # the only activation lies in padded tokens
        cams = torch.tensor([-1.0, -1.0, 50.0])[None, None, None, :]
    out = pdl_loss(tokens, cams, labels, valid, pos, pos_n, neg, neg_n)
    assert float(out.loss.detach()) == 0.0 and int(out.pairs) == 0
    assert math.isnan(float(out.rms_pos))  # undefined without pairs
    out.loss.backward()  # still connected to the tokens, with a zero gradient
    assert torch.equal(tokens.grad, torch.zeros_like(tokens))


def _random_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, c, d, h, w, k = 2, 3, 6, 4, 4, 3
    weight = torch.randn(c, d, generator=g).requires_grad_(True)
    tokens = torch.randn(b, d, h, w, generator=g).requires_grad_(True)
    cams = torch.einsum("cd,bdhw->bchw", weight, tokens)  # A = W * F
    labels = torch.ones(b, c)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, :, 3] = False
    counts = torch.full((c,), k)
    return weight, tokens, cams, labels, valid, counts, k, g


def test_pdl_gradient_reaches_tokens_not_the_classifier():
    weight, tokens, cams, labels, valid, counts, k, g = _random_batch()
    pos = torch.randn(3, k, 6, generator=g)
    neg = torch.randn(3, k, 6, generator=g)
    out = pdl_loss(tokens, cams, labels, valid, pos, counts, neg, counts)
    assert int(out.pairs) > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert weight.grad is None or not weight.grad.any()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# SSL (§7.3).
# ------------------------------------------------------------------------------------------------------------


def _ssl_case():
    tokens = _one_image([[0.0, 8.0, 10.0, 9.0]])  # D = 1; the last token is padding
    cams = torch.tensor([1.0, 3.0, 4.0, 100.0])[None, None, None, :].requires_grad_(True)
    valid = torch.tensor([True, True, True, False])[None, None, :]
    pos, neg_ss = torch.tensor([[[0.0], [0.0]]]), torch.tensor([[[10.0], [0.0]]])  # one valid row each
    return tokens, cams, valid, torch.ones(1, 1), pos, torch.tensor([1]), neg_ss, torch.tensor([1])


def test_ssl_hand_computed():
    tokens, cams, valid, labels, pos, pos_n, neg_ss, neg_ss_n = _ssl_case()
    out = ssl_loss(tokens, cams, labels, valid, pos, pos_n, neg_ss, neg_ss_n, region_threshold=0.1)
    # Â = [1, 3, 4] / (4 + 1e-3) = [.25, .75, .99975] (the padded 100 is not the max); all > .1
    # d⁺ = [0, 64, 100], d⁻ = [100, 4, 0] -> d⁺ > d⁻ for tokens 1 and 2: L = (3 + 4) / 2 = 3.5
    assert float(out.loss.detach()) == pytest.approx(3.5)
    assert int(out.tokens_suppressed) == 2
    out.loss.backward()
    assert cams.grad.flatten().tolist() == [0.0, 0.5, 0.5, 0.0]
    # θ_r = 0.8 keeps only token 2 (Â = .99975): L = 4
    high = ssl_loss(tokens, cams, labels, valid, pos, pos_n, neg_ss, neg_ss_n, region_threshold=0.8)
    assert float(high.loss.detach()) == pytest.approx(4.0) and int(high.tokens_suppressed) == 1


@pytest.mark.parametrize(
    "case", ["no_label", "no_positives", "no_filtered_negatives", "all_closer_to_positives"]
)
def test_ssl_skips_classes_and_empty_selection(case):
    tokens, cams, valid, labels, pos, pos_n, neg_ss, neg_ss_n = _ssl_case()
    if case == "no_label":
        labels = torch.zeros_like(labels)
    elif case == "no_positives":
        pos_n = torch.tensor([0])
    elif case == "no_filtered_negatives":
        neg_ss_n = torch.tensor([0])
    else:
        neg_ss = torch.tensor([[[100.0], [0.0]]])
    out = ssl_loss(tokens, cams, labels, valid, pos, pos_n, neg_ss, neg_ss_n)
    assert float(out.loss.detach()) == 0.0 and int(out.tokens_suppressed) == 0
    out.loss.backward()
    assert not cams.grad.any()


def test_ssl_gradient_reaches_the_classifier_and_tokens():
    weight, tokens, cams, labels, valid, counts, k, g = _random_batch()
    # negatives at the mean token, positives far away: every activated valid token is a false positive
    centre = tokens.detach().mean(dim=(0, 2, 3))
    pos = centre + 100.0 + torch.zeros(3, k, 6)
    neg_ss = centre + torch.zeros(3, k, 6)
    out = ssl_loss(tokens, cams, labels, valid, pos, counts, neg_ss, counts)
    assert int(out.tokens_suppressed) > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    # padded tokens (image 1, column 3) get no gradient through A
    assert not tokens.grad[1, :, :, 3].any()
