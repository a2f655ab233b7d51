"""Tests for losses.py.

Expected values are derived by hand in the comments (logs of simple fractions,
log1p(exp(-x)) = -log sigmoid(x)), not recomputed with the code under test.
Part B is checked against the Part A functions, which are themselves pinned
to hand values here.
"""

import inspect
import math
import os

import pytest
import torch

import losses
from losses import (
    LOSSES,
    TRL_OPTIONS,
    LossSpec,
    beta_dpo_loss,
    get_loss,
    preference_loss,
    sft_loss,
    tdpo_loss,
    update_gap_stats,
    validate_loss_args,
)
from logps import completion_logps, completion_token_kl, get_batch_logps, tdpo_get_batch_logps

D = torch.float64
LN2 = math.log(2.0)



def compute(spec, fields, *args, **kwargs):
    """spec.compute on a losses.BatchLogps made from {field: tensor} ('public.<field>': LD-DPO's)."""
    public = {k[len("public."):]: v for k, v in fields.items() if k.startswith("public.")}
    logps = losses.BatchLogps(**{k: v for k, v in fields.items() if not k.startswith("public.")},
                              public=losses.BatchLogps(**public) if public else None)
    return spec.compute(logps, *args, **kwargs)

def t(*xs, dtype=D, **kw):
    return torch.tensor(xs, dtype=dtype, **kw)


def softplus_neg(x):
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def close(a, b, tol=1e-12):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# get_batch_logps
# ---------------------------------------------------------------------------

def _positional_logits():
    """B=3, T=4, V=4. Position 0: p = (1,2,3,4)/10; position 1: (4,3,2,1)/10;
    position 2: uniform 1/4; position 3 (dropped by the shift): all mass on token 0."""
    p0 = [0.1, 0.2, 0.3, 0.4]
    p1 = [0.4, 0.3, 0.2, 0.1]
    p2 = [0.25] * 4
    last = [1000.0, 0.0, 0.0, 0.0]
    row = torch.stack([torch.tensor(p, dtype=D).log() for p in (p0, p1, p2)] + [torch.tensor(last, dtype=D)])
    return row.expand(3, 4, 4).clone()


def test_get_batch_logps_hand_values():
    logits = _positional_logits()
    labels = torch.tensor([
        [1, 0, 3, 2],            # first label never scored; p = 0.1 * 0.1 * 0.25
        [-100, -100, 1, -100],   # only position 1 predicts token 1: p = 0.3
        [-100, -100, -100, -100],
    ])
    s = get_batch_logps(logits, labels)
    assert close(s, [math.log(0.0025), math.log(0.3), 0.0])
    m = get_batch_logps(logits, labels, average_log_prob=True)
    assert close(m, [math.log(0.0025) / 3, math.log(0.3), 0.0])
    assert torch.isfinite(m).all()  # all-masked row: 0, not 0/0


def test_get_batch_logps_shape_mismatch():
    with pytest.raises(ValueError):
        get_batch_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_sft_loss():
    losses, chosen_rewards, rejected_rewards = sft_loss(t(-2.0, -0.5))
    assert close(losses, [2.0, 0.5]) and chosen_rewards is None and rejected_rewards is None


# ---------------------------------------------------------------------------
# preference_loss
# ---------------------------------------------------------------------------

LN3 = math.log(3.0)


def _pref_inputs(requires_grad=False):
    # pair 0: pi_c - pi_r = 4, ref_c - ref_r = 4 - 2 ln 3  =>  h = 2 ln 3
    # pair 1: policy == reference  =>  h = 0
    pc = t(-1.0, -2.0, requires_grad=requires_grad)
    pr = t(-5.0, -3.0, requires_grad=requires_grad)
    rc = t(-2.0, -2.0, requires_grad=requires_grad)
    rr = t(-6.0 + 2 * LN3, -3.0, requires_grad=requires_grad)
    return pc, pr, rc, rr


def test_dpo_hand_values():
    pc, pr, rc, rr = _pref_inputs()
    losses, cr, rjr = preference_loss(pc, pr, rc, rr, beta=0.5)
    # beta h = ln 3: sigmoid = 3/4, loss = ln(4/3); h = 0: ln 2
    assert close(losses, [math.log(4 / 3), LN2])
    # rewards 0.5 * (pi - ref): chosen (1, 0), rejected (1 - 2 ln 3, 0)
    assert close(cr, [0.5, 0.0])
    assert close(rjr, [0.5 - LN3, 0.0])


def test_cdpo_hand_values():
    pc, pr, rc, rr = _pref_inputs()
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.25)
    # -(3/4) ln(3/4) - (1/4) ln(1/4); at h = 0 both terms are ln 2
    assert close(losses, [0.75 * math.log(4 / 3) + 0.25 * math.log(4), LN2])


def test_ipo_hand_values():
    # h = 3 and h = 0 with beta = 1/4: target 1/(2 beta) = 2 -> (3-2)^2 = 1, (0-2)^2 = 4
    pc, pr = t(-1.0, -2.0), t(-4.0, -2.0)
    rc, rr = t(-2.0, -2.0), t(-2.0, -2.0)
    losses, cr, rjr = preference_loss(pc, pr, rc, rr, beta=0.25, ipo=True, label_smoothing=0.3)
    assert close(losses, [1.0, 4.0])
    assert close(cr, [0.25, 0.0]) and close(rjr, [-0.5, 0.0])


def test_reference_free_drops_reference_from_h_only():
    pc, pr, rc, rr = _pref_inputs()
    losses, cr, rjr = preference_loss(pc, pr, rc, rr, beta=0.5, reference_free=True)
    # h = pi_c - pi_r = (4, 1): beta h = (2, 0.5)
    assert close(losses, [softplus_neg(2.0), softplus_neg(0.5)])
    assert close(cr, [0.5, 0.0])  # rewards still against the reference


def test_preference_loss_gradient_hand_value():
    pc, pr, rc, rr = _pref_inputs(requires_grad=True)
    losses, cr, _ = preference_loss(pc, pr, rc, rr, beta=0.5)
    assert not cr.requires_grad
    g = torch.autograd.grad(losses[0], (pc, pr))
    # d/dpi_c of -logsig(beta h) = -beta sigmoid(-beta h) = -0.5 * 1/4
    assert close(g[0], [-0.125, 0.0]) and close(g[1], [0.125, 0.0])


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.2), dict(ipo=True), dict(reference_free=True)])
def test_preference_loss_gradcheck(kw):
    torch.manual_seed(0)
    xs = [torch.randn(3, dtype=D, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: preference_loss(*a, beta=0.3, **kw)[0], xs)


# ---------------------------------------------------------------------------
# TDPO
# ---------------------------------------------------------------------------

def _tdpo_hand_logits():
    """B=1, T=3, V=2. Policy: pos0 (1/2, 1/2), pos1 (3/4, 1/4). Reference: pos0 (3/4, 1/4), pos1 (1/2, 1/2).
    Position 2 is dropped by the shift (garbage values)."""
    pol = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [50.0, -50.0]]], dtype=D)
    ref = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [-50.0, 50.0]]], dtype=D)
    labels = torch.tensor([[1, 0, 1]])  # pos0 predicts token 0, pos1 predicts token 1
    return pol, ref, labels


def test_tdpo_get_batch_logps_hand_values():
    pol, ref, labels = _tdpo_hand_logits()
    margin, kl, logps = tdpo_get_batch_logps(pol, ref, labels)
    # margin: ln(1/2) - ln(3/4) + ln(1/4) - ln(1/2) = ln(1/3)
    # logps:  ln(1/2) + ln(1/4) = ln(1/8)
    # KL pos0 = 3/4 ln(3/2) + 1/4 ln(1/2); KL pos1 = 1/2 ln(2/3) + 1/2 ln 2
    kl_hand = 0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.5 * math.log(2 / 3) + 0.5 * LN2
    assert close(margin, [math.log(1 / 3)])
    assert close(logps, [math.log(1 / 8)])
    assert close(kl, [kl_hand])
    m2, kl2, lp2 = tdpo_get_batch_logps(pol, ref, labels, average_log_prob=True)
    assert close(m2, [math.log(1 / 3) / 2]) and close(kl2, [kl_hand / 2]) and close(lp2, [math.log(1 / 8) / 2])


def test_tdpo_get_batch_logps_masking_and_empty_row():
    pol, ref, labels = _tdpo_hand_logits()
    pol, ref = pol.expand(2, 3, 2).clone(), ref.expand(2, 3, 2).clone()
    labels = torch.tensor([[1, -100, 1], [-100, -100, -100]])
    for avg in (False, True):
        margin, kl, logps = tdpo_get_batch_logps(pol, ref, labels, average_log_prob=avg)
        # row 0: only pos1 counts: margin ln(1/2), KL 1/2 ln(2/3) + 1/2 ln 2, logp ln(1/4)
        assert close(margin, [math.log(0.5), 0.0])
        assert close(kl, [0.5 * math.log(2 / 3) + 0.5 * LN2, 0.0])
        assert close(logps, [math.log(0.25), 0.0])


def test_tdpo_kl_finite_when_reference_prob_underflows():
    # float32 reference (1, e^-1000): the second probability underflows to exactly 0
    pol = torch.zeros(1, 2, 2)
    ref = torch.tensor([[[0.0, -1000.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 0]])
    # (the TDPO repository's p_ref * (log(p_ref) - log pi) gives 0 * -inf = NaN here)
    _, kl, _ = tdpo_get_batch_logps(pol, ref, labels)
    # KL((1, 0) || (1/2, 1/2)) = ln 2
    assert torch.isfinite(kl).all()
    assert abs(kl.item() - LN2) < 1e-6


def _tdpo_loss_inputs():
    # Delta = 2 - 0 = 2, KL_c = 0.5, KL_r = 1.5
    return [t(2.0, requires_grad=True), t(0.0, requires_grad=True),
            t(0.5, requires_grad=True), t(1.5, requires_grad=True)]


def test_tdpo1_hand_values_and_gradients():
    cm, rm, ckl, rkl = _tdpo_loss_inputs()
    losses, cr, rjr = tdpo_loss(cm, rm, ckl, rkl, beta=0.5, if_tdpo2=False)
    # z = 2 - (1.5 - 0.5) = 1, beta z = 0.5
    assert close(losses, [softplus_neg(0.5)])
    assert close(cr, [1.25]) and close(rjr, [0.75])  # 0.5 (2 + 0.5), 0.5 (0 + 1.5)
    g = torch.autograd.grad(losses.sum(), (cm, rm, ckl, rkl))
    s = sig(-0.5)
    assert close(torch.cat(g), [-0.5 * s, 0.5 * s, -0.5 * s, 0.5 * s])


def test_tdpo2_hand_values_and_zero_grad_through_chosen_kl():
    cm, rm, ckl, rkl = _tdpo_loss_inputs()
    losses, cr, rjr = tdpo_loss(cm, rm, ckl, rkl, beta=0.5, alpha=0.5, if_tdpo2=True)
    # z = 2 - 0.5 (1.5 - 0.5) = 1.5, beta z = 0.75
    assert close(losses, [softplus_neg(0.75)])
    assert close(cr, [1.25]) and close(rjr, [0.75])
    g = torch.autograd.grad(losses.sum(), (cm, rm, ckl, rkl), allow_unused=True, materialize_grads=True)
    s = sig(-0.75)
    # chosen KL is stop-gradient; rejected KL: alpha beta sigmoid(-beta z)
    assert close(torch.cat(g), [-0.5 * s, 0.5 * s, 0.0, 0.25 * s])
    assert g[2].item() == 0.0


def test_tdpo1_gradcheck():
    torch.manual_seed(1)
    xs = [torch.randn(3, dtype=D, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: tdpo_loss(*a, beta=0.4, alpha=0.7, if_tdpo2=False)[0], xs)


def test_tdpo2_gradcheck_except_stopped_chosen_kl():
    # the chosen KL is deliberately stop-gradient, so finite differences disagree there: hold it fixed
    torch.manual_seed(1)
    cm, rm, rkl = [torch.randn(3, dtype=D, requires_grad=True) for _ in range(3)]
    ckl = torch.rand(3, dtype=D)
    assert torch.autograd.gradcheck(
        lambda a, b, d: tdpo_loss(a, b, ckl, d, beta=0.4, alpha=0.7, if_tdpo2=True)[0], (cm, rm, rkl))


# ---------------------------------------------------------------------------
# beta-DPO
# ---------------------------------------------------------------------------

def _beta_inputs(gaps, requires_grad=False):
    """References at 0, rejected policy at -1: gaps (and h) equal pi_c + 1 - ... -> choose pi_c = gap - 1."""
    g = torch.as_tensor(gaps, dtype=D)
    pc = (g - 1.0).clone().requires_grad_(requires_grad)
    pr = torch.full_like(g, -1.0).requires_grad_(requires_grad)
    zero = torch.zeros_like(g)
    return pc, pr, zero, zero.clone()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _beta_dpo(*args, **kwargs):
    """beta_dpo_loss unpacked as (losses, mask, chosen_rewards, rejected_rewards, beta_used)."""
    losses, cr, rjr, extras = beta_dpo_loss(*args, **kwargs)
    assert extras["mask_count"].item() == extras["weights"].sum().item()
    return losses, extras["weights"], cr, rjr, extras["beta_used"]


def test_beta_dpo_hand_values_keep_all():
    # gaps (1, 2, 3, 6); keep all; mean 3; beta_used = 0.1 (1 + 0.5 (3 - 1)) = 0.2
    pc, pr, rc, rr = _beta_inputs([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    losses, mask, cr, rjr, beta_used = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.5, mode_weight=0.0,
                                                      gap_mean=1.0, gap_std=2.0, generator=gen())
    assert close(beta_used, 0.2)
    assert close(mask, [1.0] * 4)
    assert close(losses, [softplus_neg(0.2 * x) for x in (1.0, 2.0, 3.0, 6.0)])
    # rewards with the base beta: 0.1 (gap - 1) and 0.1 * (-1)
    assert close(cr, [0.0, 0.1, 0.2, 0.5]) and close(rjr, [-0.1] * 4)
    assert not beta_used.requires_grad and not cr.requires_grad
    # no gradient through beta_used: d loss_0 / d pi_c0 = -0.2 sigmoid(-0.2)
    g = torch.autograd.grad(losses[0], pc)[0]
    assert close(g, [-0.2 * sig(-0.2), 0.0, 0.0, 0.0])


def test_beta_dpo_beta_clamped():
    pc, pr, rc, rr = _beta_inputs([1.0, 2.0, 3.0, 6.0])
    # 0.1 (1 - 10 (3 - 1)) < 0 -> 1e-3
    *_, beta_used = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=-10.0, mode_weight=0.0,
                                  gap_mean=1.0, gap_std=2.0, generator=gen())
    assert close(beta_used, 1e-3)


def test_beta_dpo_reference_free_uses_reference_in_gaps_only():
    g = torch.tensor([1.0, 3.0], dtype=D)
    pc, pr = g.clone(), torch.zeros(2, dtype=D)
    rc, rr = torch.full((2,), 1.0, dtype=D), torch.zeros(2, dtype=D)
    # gaps (0, 2): mean 1; beta_used = 0.1 (1 + 1 (1 - 0)) = 0.2; h = pi_c - pi_r = (1, 3)
    losses, mask, *_, beta_used = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=1.0, mode_weight=0.0,
                                               gap_mean=0.0, gap_std=1.0, reference_free=True,
                                               generator=gen())
    assert close(beta_used, 0.2)
    assert close(losses, [softplus_neg(0.2), softplus_neg(0.6)])


def test_beta_dpo_selection_matches_reference_sampler():
    # the beta-DPO repo draws torch.multinomial(exp(-0.5 z^2), int(B (1 - mode_weight)));
    # with the same generator seed the kept set must be the same
    torch.manual_seed(3)
    gaps = torch.randn(16) * 2
    m, s = 0.3, 1.5
    for seed in range(5):
        ref_idx = torch.multinomial(torch.exp(-0.5 * ((gaps - m) / s) ** 2), 12, replacement=False,
                                    generator=gen(seed))
        pc, pr = gaps.clone(), torch.zeros(16)
        _, mask, *_, beta_used = _beta_dpo(pc, pr, torch.zeros(16), torch.zeros(16), beta=0.1, a=0.6,
                                               mode_weight=0.25, gap_mean=m, gap_std=s, generator=gen(seed))
        assert int(mask.sum()) == 12
        assert set(mask.nonzero().flatten().tolist()) == set(ref_idx.tolist())
        expected = 0.1 * (1 + 0.6 * (gaps[ref_idx].double().mean().item() - m))
        assert abs(beta_used.item() - expected) < 1e-6


def test_beta_dpo_prefers_gaps_near_running_mean():
    # weights (1, e^-0.00005, ~0, ~0): two kept must be the first two, whatever the seed
    pc, pr, rc, rr = _beta_inputs([0.0, 0.01, 50.0, 100.0])
    for seed in range(5):
        _, mask, *_ = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.6, mode_weight=0.5,
                                    gap_mean=0.0, gap_std=1.0, generator=gen(seed))
        assert mask.tolist() == [1.0, 1.0, 0.0, 0.0]


def _assert_finite(out):
    for x in out:
        assert torch.isfinite(x).all()


def test_beta_dpo_fewer_nonzero_weights_than_kept():
    # only gap 0 has a representable weight (others e^-1250...); 3 of 4 kept:
    # the fallback fills by weight order (50, then 100), never the farthest (200)
    pc, pr, rc, rr = _beta_inputs([0.0, 50.0, 100.0, 200.0])
    for seed in range(5):
        out = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.01, mode_weight=0.25,
                            gap_mean=0.0, gap_std=1.0, generator=gen(seed))
        _assert_finite(out)
        assert out[1].tolist() == [1.0, 1.0, 1.0, 0.0]
        # beta_used = 0.1 (1 + 0.01 * 50)
        assert close(out[4], 0.15)


def test_beta_dpo_all_weights_underflow():
    # every Gaussian weight underflows to 0 (the reference sampler's multinomial raises here)
    gaps = [100.0, 200.0, 300.0, 400.0]
    pc, pr, rc, rr = _beta_inputs(gaps)
    out = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.001, mode_weight=0.25,
                        gap_mean=0.0, gap_std=1.0, generator=gen())
    _assert_finite(out)
    assert out[1].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert close(out[4], 0.1 * (1 + 0.001 * 200.0))


def test_beta_dpo_zero_std_policy_equals_reference():
    # first step: policy == reference, gaps 0, stats 0 -> 0/0 in the repo; here uniform weights
    x = torch.randn(8, dtype=D)
    losses, mask, cr, rjr, beta_used = _beta_dpo(x, x - 1, x, x - 1, beta=0.1, a=0.6, mode_weight=0.2,
                                                     gap_mean=0.0, gap_std=0.0, generator=gen())
    assert int(mask.sum()) == int(8 * 0.8) == 6
    assert close(beta_used, 0.1)
    assert close(losses, [LN2] * 8)
    assert close(cr, [0.0] * 8)


@pytest.mark.parametrize("std", [float("nan"), float("inf"), -1.0])
def test_beta_dpo_unusable_std_falls_back_to_uniform(std):
    pc, pr, rc, rr = _beta_inputs([0.5, 1.0, 2.0, 4.0, 8.0])
    out = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.6, mode_weight=0.4,
                        gap_mean=0.0, gap_std=std, generator=gen())
    _assert_finite(out)
    assert int(out[1].sum()) == 3  # int(5 * 0.6)


def test_beta_dpo_single_pair_keeps_one():
    # int(1 * 0.8) = 0 pairs in the repo (multinomial of 0 samples raises); here 1
    pc, pr, rc, rr = _beta_inputs([2.0])
    out = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.6, mode_weight=0.2,
                        gap_mean=0.0, gap_std=0.0, generator=gen())
    _assert_finite(out)
    assert out[1].tolist() == [1.0]
    # mean kept gap 2: beta_used = 0.1 (1 + 0.6 * 2) = 0.22
    assert close(out[4], 0.22)
    assert close(out[0], [softplus_neg(0.44)])


def test_beta_dpo_keep_count_rounds_down_like_reference():
    pc, pr, rc, rr = _beta_inputs(torch.linspace(0, 1, 10).tolist())
    _, mask, *_ = _beta_dpo(pc, pr, rc, rr, beta=0.1, a=0.0, mode_weight=0.75,
                                gap_mean=0.5, gap_std=1.0, generator=gen())
    assert int(mask.sum()) == 2  # int(10 * 0.25)


def test_beta_dpo_gradcheck_fixed_mask():
    # mode_weight 0 keeps every pair and a = 0 keeps beta_used = beta: the loss is a smooth function
    torch.manual_seed(2)
    xs = [torch.randn(4, dtype=D, requires_grad=True) for _ in range(4)]

    def f(*a):
        return _beta_dpo(*a, beta=0.3, a=0.0, mode_weight=0.0, gap_mean=0.1, gap_std=1.0,
                             generator=gen())[0]
    assert torch.autograd.gradcheck(f, xs)


# ---------------------------------------------------------------------------
# update_gap_stats
# ---------------------------------------------------------------------------

def test_update_gap_stats_numbers():
    # gaps 1..4: mean 2.5, unbiased std sqrt(5/3)
    m, s = update_gap_stats(0.0, 0.0, t(1.0, 2.0, 3.0, 4.0))
    assert isinstance(m, float) and isinstance(s, float)
    assert math.isclose(m, 0.25) and math.isclose(s, 0.1 * math.sqrt(5 / 3))
    m, s = update_gap_stats(1.0, 2.0, t(1.0, 2.0, 3.0, 4.0), gamma=0.5)
    assert math.isclose(m, 0.5 + 1.25) and math.isclose(s, 1.0 + 0.5 * math.sqrt(5 / 3))


def test_update_gap_stats_edge_cases():
    assert update_gap_stats(0.0, 0.0, t(5.0)) == pytest.approx((0.5, 0.0))  # single gap: std 0
    assert update_gap_stats(1.0, 2.0, t(7.0, 9.0), gamma=1.0) == (1.0, 2.0)
    assert update_gap_stats(1.0, 2.0, t()) == (1.0, 2.0)
    # NaN left out: gaps (1, 3): mean 2, std sqrt 2
    m, s = update_gap_stats(0.0, 0.0, t(1.0, float("nan"), 3.0))
    assert math.isclose(m, 0.2) and math.isclose(s, 0.1 * math.sqrt(2))


# ---------------------------------------------------------------------------
# Part B: completion_logps / completion_token_kl
# ---------------------------------------------------------------------------

def _part_b_case(seed=0, B=3, T=7, H=5, V=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, dtype=D, generator=g)
    weight = torch.randn(V, H, dtype=D, generator=g)
    bias = torch.randn(V, dtype=D, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100      # prompt
    labels[0, -1] = -100      # padding
    labels[1, 2] = -100       # hole in the middle
    if B > 2:
        labels[2, 1:] = -100  # nothing scored
    return hidden, weight, bias, labels


def _leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


@pytest.mark.parametrize("avg", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("use_bias", [True, False])
def test_completion_logps_matches_full_logits(avg, chunk, use_bias):
    hidden, weight, bias, labels = _part_b_case()
    h1, w1, b1 = _leaves(hidden, weight, bias)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    out = completion_logps(h1, w1, labels, b1 if use_bias else None, avg, chunk_size=chunk)
    logits = h2 @ w2.T + (b2 if use_bias else 0)
    ref = get_batch_logps(logits, labels, avg)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert out[2].item() == 0.0
    coef = torch.tensor([0.7, -1.3, 2.0], dtype=D)
    wrt1 = [h1, w1] + ([b1] if use_bias else [])
    wrt2 = [h2, w2] + ([b2] if use_bias else [])
    g1 = torch.autograd.grad((out * coef).sum(), wrt1)
    g2 = torch.autograd.grad((ref * coef).sum(), wrt2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [7, 1024])
@pytest.mark.parametrize("use_bias", [True, False])
def test_completion_logps_kept_rows_span_several_cpu_blocks(chunk, use_bias, monkeypatch):
    # blocks of 2 rows on CPU: with chunk 7 the first 6 of the 14 scored rows are kept, in one
    # buffer written by 3 forward blocks and taken in one piece by backward, and the other 8
    # rows are recomputed block by block; with chunk 1024 all 14 are kept (7 forward blocks)
    import logps
    hidden, weight, bias, labels = _part_b_case(B=3, T=7, V=11)
    labels[2, :] = torch.arange(7) % 11  # scored rows: 3 + 5 + 6 = 14
    monkeypatch.setattr(logps, "CPU_BLOCK_ELEMENTS", 2 * 11)
    h1, w1, b1 = _leaves(hidden, weight, bias)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    out = completion_logps(h1, w1, labels, b1 if use_bias else None, chunk_size=chunk)
    ref = get_batch_logps(h2 @ w2.T + (b2 if use_bias else 0), labels, False)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    coef = torch.tensor([0.7, -1.3, 2.0], dtype=D)
    wrt1 = [h1, w1] + ([b1] if use_bias else [])
    wrt2 = [h2, w2] + ([b2] if use_bias else [])
    for a, b in zip(torch.autograd.grad((out * coef).sum(), wrt1),
                    torch.autograd.grad((ref * coef).sum(), wrt2)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_completion_logps_half_precision_weights_keep_block_sized_casts(monkeypatch):
    # bfloat16 weights: log-probs in float32 from bfloat16 logits; backward casts the kept rows
    # block by block and gives the gradients of the same computation done with full logits
    import logps
    hidden, weight, _, labels = _part_b_case(B=3, T=7, V=11)
    labels[2, :] = torch.arange(7) % 11
    monkeypatch.setattr(logps, "CPU_BLOCK_ELEMENTS", 2 * 11)
    h1, w1 = (x.to(torch.bfloat16).requires_grad_(True) for x in (hidden, weight))
    h2, w2 = (x.to(torch.bfloat16).requires_grad_(True) for x in (hidden, weight))
    out = completion_logps(h1, w1, labels, chunk_size=7)
    ref = get_batch_logps((h2 @ w2.T).float(), labels, False)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.sum(), [h1, w1]), torch.autograd.grad(ref.sum(), [h2, w2])):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("avg", [False, True])
@pytest.mark.parametrize("chunk,vchunk", [(1, 1), (4, 3), (5, 11), (1024, 8192)])
def test_completion_token_kl_matches_full_logits(avg, chunk, vchunk):
    hidden, weight, bias, labels = _part_b_case()
    ref_hidden, ref_weight, ref_bias, _ = _part_b_case(seed=1)
    h1, w1, b1 = _leaves(hidden, weight, bias)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    outs = completion_token_kl(h1, ref_hidden, w1, ref_weight, labels, b1, ref_bias, avg,
                               chunk_size=chunk, vocab_chunk_size=vchunk)
    refs = tdpo_get_batch_logps(h2 @ w2.T + b2, ref_hidden @ ref_weight.T + ref_bias, labels, avg)
    for o, r in zip(outs, refs):
        assert torch.allclose(o, r, rtol=1e-10, atol=1e-12)
        assert o[2].item() == 0.0
    coefs = [torch.tensor(c, dtype=D) for c in ([0.7, -1.3, 2.0], [1.1, 0.4, -0.5], [-0.9, 0.3, 1.7])]
    f1 = sum((o * c).sum() for o, c in zip(outs, coefs))
    f2 = sum((r * c).sum() for r, c in zip(refs, coefs))
    for a, b in zip(torch.autograd.grad(f1, (h1, w1, b1)), torch.autograd.grad(f2, (h2, w2, b2))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_completion_token_kl_reference_is_constant():
    hidden, weight, bias, labels = _part_b_case(B=2)
    rh, rw = _leaves(hidden * 0.5, weight * 2)
    h, w = _leaves(hidden, weight)
    margin, kl, logps = completion_token_kl(h, rh, w, rw, labels)
    (margin.sum() + kl.sum()).backward()
    assert rh.grad is None and rw.grad is None
    assert h.grad is not None and w.grad is not None


def test_completion_token_kl_policy_equals_reference():
    hidden, weight, bias, labels = _part_b_case()
    margin, kl, logps = completion_token_kl(hidden, hidden, weight, weight, labels, bias, bias,
                                            chunk_size=2, vocab_chunk_size=4)
    assert torch.equal(kl, torch.zeros_like(kl)) and torch.equal(margin, torch.zeros_like(margin))
    assert torch.allclose(logps, get_batch_logps(hidden @ weight.T + bias, labels), rtol=1e-10)


def test_completion_token_kl_underflowing_reference_prob():
    # H = 1: reference logits (0, -1000) in float32, policy logits (0, 0): KL = ln 2 per scored position
    labels = torch.tensor([[0, 0, 1]])
    out = completion_token_kl(torch.ones(1, 3, 1), torch.ones(1, 3, 1),
                              torch.zeros(2, 1, requires_grad=True), torch.tensor([[0.0], [-1000.0]]),
                              labels, vocab_chunk_size=1)
    margin, kl, logps = out
    assert torch.isfinite(kl).all() and abs(kl.item() - 2 * LN2) < 1e-5
    # margin: ln(1/2) - ln 1 at pos0, ln(1/2) - (-1000) at pos1
    assert abs(margin.item() - (2 * math.log(0.5) + 1000.0)) < 1e-3
    (kl + margin).sum().backward()


def test_completion_functions_all_masked_batch():
    hidden, weight, bias, _ = _part_b_case(B=2)
    labels = torch.full((2, 7), -100)
    h, w = _leaves(hidden, weight)
    out = completion_logps(h, w, labels, average_log_prob=True)
    assert torch.equal(out, torch.zeros(2, dtype=D))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    outs = completion_token_kl(hidden, hidden, weight, weight, labels, average_log_prob=True)
    assert all(torch.equal(o, torch.zeros(2, dtype=D)) for o in outs)


def test_completion_logps_gradcheck():
    hidden, weight, bias, labels = _part_b_case(B=2, T=4, H=3, V=5)
    xs = _leaves(hidden, weight, bias)
    assert torch.autograd.gradcheck(
        lambda h, w, b: completion_logps(h, w, labels, b, chunk_size=2), xs)
    assert torch.autograd.gradcheck(
        lambda h, w, b: completion_logps(h, w, labels, b, average_log_prob=True, chunk_size=3), xs)


def test_completion_token_kl_gradcheck():
    hidden, weight, bias, labels = _part_b_case(B=2, T=4, H=3, V=5)
    rh, rw, rb, _ = _part_b_case(seed=4, B=2, T=4, H=3, V=5)
    xs = _leaves(hidden, weight, bias)
    assert torch.autograd.gradcheck(
        lambda h, w, b: completion_token_kl(h, rh, w, rw, labels, b, rb, chunk_size=2, vocab_chunk_size=2), xs)


def test_completion_float32_close_to_full_logits():
    hidden, weight, bias, labels = _part_b_case()
    hidden, weight = hidden.float(), weight.float()
    out = completion_logps(hidden, weight, labels, chunk_size=2)
    assert out.dtype == torch.float32
    assert torch.allclose(out, get_batch_logps(hidden @ weight.T, labels), rtol=1e-5, atol=1e-5)


def _max_saved_numel(fn):
    """Largest tensor autograd saves while `fn` builds its graph."""
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, max(sizes)


def test_large_vocab_saves_no_logits_block():
    # B=2, T=64, V=50000: full logits would be 2*64*50000 = 6.4M numbers; only inputs are kept
    B, T, H, V = 2, 64, 8, 50000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :10] = -100
    out, biggest = _max_saved_numel(lambda: completion_logps(hidden, weight, labels, chunk_size=16))
    assert biggest <= V * H
    out.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()

    ref_hidden = torch.randn(B, T, H, generator=g)
    outs, biggest = _max_saved_numel(lambda: completion_token_kl(
        hidden, ref_hidden, weight, weight.detach() * 0.9, labels, chunk_size=16, vocab_chunk_size=8192))
    assert biggest <= V * H
    sum(o.sum() for o in outs).backward()
    assert all(torch.isfinite(o).all() for o in outs)


def test_chunk_size_must_be_positive():
    hidden, weight, bias, labels = _part_b_case()
    with pytest.raises(ValueError):
        completion_logps(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError):
        completion_token_kl(hidden, hidden, weight, weight, labels, vocab_chunk_size=0)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

CONFIGS = {
    "sft": {"name": "sft"},
    "dpo": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0, "reference_free": False},
    "ipo": {"name": "ipo", "beta": 0.1, "average_log_prob": True, "reference_free": False},
    "tdpo": {"name": "tdpo", "beta": 0.1, "alpha": 0.5, "if_tdpo2": True},
}
BETA_DPO = {"name": "beta_dpo", "beta": 0.1, "reference_free": False, "mode_weight": 0.2, "a": 0.6,
            "gamma": 0.9}
TRL_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


def args_of(cfg):
    return {k: v for k, v in cfg.items() if k != "name"}


def identity(x):
    return x


def test_get_loss_resolution():
    assert get_loss(CONFIGS["sft"]) is LOSSES["sft"]
    assert get_loss(CONFIGS["dpo"]) is LOSSES["dpo"]
    assert get_loss(dict(CONFIGS["dpo"], label_smoothing=0.2)) is LOSSES["dpo"]  # cDPO
    import train  # the beta-DPO repository's command line: an alias of train.py's
    assert train.rewrite_aliases(["loss=dpo", "loss.mode_loss=mean"]) == ["loss=dpo"]  # its default
    assert train.rewrite_aliases(["loss=dpo", "loss.mode_loss=beta_DPO", "loss.a=0.5"]) == \
        ["loss=beta_dpo", "loss.a=0.5"]
    assert get_loss(BETA_DPO) is LOSSES["beta_dpo"]
    assert get_loss(CONFIGS["ipo"]) is LOSSES["ipo"]
    assert get_loss(CONFIGS["tdpo"]) is LOSSES["tdpo"]
    assert get_loss({"name": "aot_pair"}) is LOSSES["aot_unpaired"]  # TRL's name before 1.0
    assert get_loss({"name": "simpo"}) is LOSSES["cpo"]  # SimPO: CPO's loss_type simpo (config/loss/simpo.yaml)
    # TRL's DPOTrainer losses, and those of its KTO, CPO and ORPO trainers
    assert {"sft", "dpo", "ipo", "tdpo", "beta_dpo", "mix", "kto", "cpo", "orpo"} | set(TRL_LOSS_TYPES) == set(LOSSES)
    assert all(isinstance(s, LossSpec) and s.name == k for k, s in LOSSES.items())


def test_get_loss_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        get_loss({"name": "kpo"})
    msg = str(e.value)
    assert "'kpo'" in msg and all(n in msg for n in ("sft", "dpo", "ipo", "tdpo"))
    with pytest.raises(ValueError):
        get_loss({})


def test_spec_flags_and_functions():
    s = LOSSES
    assert (s["sft"].paired, s["dpo"].paired, s["tdpo"].paired) == (False, True, True)
    assert [n for n in s if s[n].token_level] == ["tdpo"]
    assert [n for n in s if s[n].stateful] == ["beta_dpo"]
    assert s["sft"].fn is sft_loss and s["dpo"].fn is s["sigmoid"].fn
    assert s["tdpo"].fn is tdpo_loss and s["beta_dpo"].fn is beta_dpo_loss


def test_needs_reference():
    s = LOSSES
    assert not s["sft"].needs_reference({})
    assert s["dpo"].needs_reference(args_of(CONFIGS["dpo"]))
    assert not s["dpo"].needs_reference({"beta": 0.1, "reference_free": True})
    assert not s["ipo"].needs_reference({"beta": 0.1, "reference_free": True})
    assert s["ipo"].needs_reference({"beta": 0.1})
    assert s["tdpo"].needs_reference(args_of(CONFIGS["tdpo"]))
    assert s["beta_dpo"].needs_reference(dict(args_of(BETA_DPO), reference_free=True))


def test_average_log_prob():
    s = LOSSES
    assert s["ipo"].average_log_prob({"beta": 0.1})
    assert not s["ipo"].average_log_prob({"beta": 0.1, "average_log_prob": False})
    for n in ("sft", "dpo", "tdpo", "beta_dpo"):
        assert not s[n].average_log_prob({"average_log_prob": True})


def test_init_state():
    assert LOSSES["beta_dpo"].init_state() == {"gap_mean": 0.0, "gap_std": 0.0}
    for n in ("sft", "dpo", "ipo", "tdpo"):
        assert LOSSES[n].init_state() == {}
    a, b = LOSSES["beta_dpo"].init_state(), LOSSES["beta_dpo"].init_state()
    a["gap_mean"] = 5.0
    assert b["gap_mean"] == 0.0  # fresh dict each time


@pytest.mark.parametrize("cfg", list(CONFIGS.values()) + [BETA_DPO, dict(CONFIGS["dpo"], label_smoothing=0.3)])
def test_validate_accepts_shipped_configs(cfg):
    validate_loss_args(cfg)


def test_validate_accepts_repo_config_files():
    yaml = pytest.importorskip("yaml")
    root = os.path.join(os.path.dirname(__file__), "..", "config", "loss")
    files = [f for f in os.listdir(root) if f.endswith(".yaml")] if os.path.isdir(root) else []
    if not files:
        pytest.skip("no config/loss/*.yaml")
    for f in files:
        with open(os.path.join(root, f)) as fh:
            cfg = yaml.safe_load(fh)
        validate_loss_args(cfg)
        get_loss(cfg)


@pytest.mark.parametrize("cfg,key,value", [
    (dict(CONFIGS["dpo"], beta=0), "beta", "0"),
    (dict(CONFIGS["dpo"], beta=-0.1), "beta", "-0.1"),
    (dict(CONFIGS["tdpo"], beta=True), "beta", "True"),
    (dict(CONFIGS["dpo"], beta="0.1"), "beta", "'0.1'"),
    (dict(CONFIGS["dpo"], label_smoothing=0.5), "label_smoothing", "0.5"),
    (dict(CONFIGS["dpo"], label_smoothing=-0.1), "label_smoothing", "-0.1"),
    (dict(BETA_DPO, mode_weight=1.0), "mode_weight", "1.0"),
    (dict(BETA_DPO, mode_weight=-0.2), "mode_weight", "-0.2"),
    (dict(CONFIGS["tdpo"], alpha=-1), "alpha", "-1"),
    (dict(BETA_DPO, a="big"), "a", "'big'"),
    (dict(BETA_DPO, a=float("nan")), "a", "nan"),
    (dict(BETA_DPO, gamma=0.0), "gamma", "0.0"),
    (dict(BETA_DPO, gamma=1.5), "gamma", "1.5"),
    (dict(CONFIGS["dpo"], mode_loss="beta_dpo"), "mode_loss", "'beta_dpo'"),
    (dict(CONFIGS["ipo"], label_smoothing=0.0), "label_smoothing", "0.0"),
    (dict(CONFIGS["ipo"], average_log_prob="yes"), "average_log_prob", "'yes'"),
    (dict(CONFIGS["dpo"], reference_free=1), "reference_free", "1"),
    (dict(CONFIGS["tdpo"], if_tdpo2="true"), "if_tdpo2", "'true'"),
    (dict(BETA_DPO, label_smoothing=0.1), "label_smoothing", "0.1"),
])
def test_validate_refuses_bad_values(cfg, key, value):
    with pytest.raises(ValueError) as e:
        validate_loss_args(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"loss.{key}={value}" in msg


@pytest.mark.parametrize("cfg,key", [
    (dict(CONFIGS["dpo"], alpha=0.5), "alpha"),
    (dict(CONFIGS["tdpo"], reference_free=False), "reference_free"),
    (dict(CONFIGS["sft"], beta=0.1), "beta"),
    (dict(CONFIGS["ipo"], mode_loss="dpo"), "mode_loss"),
    (dict(CONFIGS["dpo"], average_log_prob=True), "average_log_prob"),
])
def test_validate_refuses_unknown_keys_listing_accepted(cfg, key):
    with pytest.raises(ValueError) as e:
        validate_loss_args(cfg)
    msg = str(e.value)
    spec = get_loss(cfg)
    assert f"loss.{key}=" in msg and "accepted keys" in msg
    assert all(k in msg for k in spec.config_keys | {"name"})


def test_validate_refuses_missing_beta_and_unknown_name():
    with pytest.raises(ValueError, match="loss.beta"):
        validate_loss_args({"name": "dpo"})
    with pytest.raises(ValueError, match="known"):
        validate_loss_args({"name": "rrhf", "beta": 0.1})


def test_config_keys_are_function_parameters_or_config_only():
    # the keys that parametrise a loss are its function's own parameters (or its running-state
    # rule's); the rest are declared in the entry (rpo_alpha is added to every TRL loss)
    for spec in LOSSES.values():
        own = set(inspect.signature(spec.fn).parameters)
        if spec.update_state is not None:
            own |= set(inspect.signature(spec.update_state).parameters)
        declared = spec.config_only | (set(TRL_OPTIONS) if spec.trl else set())
        assert spec.config_keys - declared <= own, spec.name
        assert "beta" in spec.config_keys or not spec.paired, spec.name
    # dpo.yaml holds DPO's keys only; beta-DPO's are in beta_dpo.yaml
    assert LOSSES["dpo"].config_keys <= LOSSES["sigmoid"].config_keys
    assert LOSSES["beta_dpo"].config_keys == {"beta", "reference_free", "mode_weight", "a", "gamma"}


# --- compute() --------------------------------------------------------------

PAIR_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"}


def _check_metrics(metrics, expected_keys, batch):
    assert set(metrics) == expected_keys
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and not v.requires_grad, k
        assert v.dim() == 0 or v.shape == (batch,), k


def _seq_logps(batch=4, same=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = (-torch.rand(batch, dtype=D, generator=g) * 10).requires_grad_(True)
    pr = (-torch.rand(batch, dtype=D, generator=g) * 10).requires_grad_(True)
    if same:
        rc, rr = pc.detach().clone(), pr.detach().clone()
    else:
        rc = -torch.rand(batch, dtype=D, generator=g) * 10
        rr = -torch.rand(batch, dtype=D, generator=g) * 10
    return {"chosen": pc, "rejected": pr, "reference_chosen": rc, "reference_rejected": rr}


def test_compute_sft():
    spec = get_loss(CONFIGS["sft"])
    pc = t(-2.0, -4.0, requires_grad=True)
    loss, metrics = compute(spec, {"chosen": pc}, {}, spec.init_state(), identity, True)
    assert close(loss, 3.0) and loss.requires_grad
    _check_metrics(metrics, {"logps/chosen"}, 2)


def test_compute_dpo_policy_equals_reference_is_ln2():
    spec = get_loss(CONFIGS["dpo"])
    logps = _seq_logps(same=True)
    loss, metrics = compute(spec, logps, args_of(CONFIGS["dpo"]), spec.init_state(), identity, True)
    assert close(loss, LN2)
    _check_metrics(metrics, PAIR_KEYS, 4)
    assert close(metrics["rewards/chosen"], [0.0] * 4) and close(metrics["rewards/accuracies"], [0.0] * 4)
    loss.backward()
    assert logps["chosen"].grad is not None


def test_compute_dpo_values_and_accuracies():
    spec = get_loss(CONFIGS["dpo"])
    pc, pr, rc, rr = _pref_inputs()
    logps = {"chosen": pc, "rejected": pr, "reference_chosen": rc, "reference_rejected": rr}
    loss, metrics = compute(spec, logps, dict(args_of(CONFIGS["dpo"]), beta=0.5), {}, identity, True)
    assert close(loss, (math.log(4 / 3) + LN2) / 2)
    assert close(metrics["rewards/accuracies"], [1.0, 0.0])     # 0.5 > 0.5 - ln 3; 0 == 0
    assert close(metrics["rewards/margins"], [LN3, 0.0])
    assert metrics["rewards/accuracies"].dtype == torch.float32


def test_compute_dpo_reference_free_without_reference():
    spec = get_loss(dict(CONFIGS["dpo"], reference_free=True))
    pc, pr = t(-1.0), t(-3.0)
    args = dict(args_of(CONFIGS["dpo"]), reference_free=True, beta=0.5)
    loss, metrics = compute(spec, {"chosen": pc, "rejected": pr,
                                  "reference_chosen": None, "reference_rejected": None}, args, {}, identity, True)
    assert close(loss, softplus_neg(1.0))          # beta h = 0.5 * 2
    assert close(metrics["rewards/chosen"], [-0.5])  # beta * policy
    with pytest.raises(ValueError):
        compute(spec, {"chosen": pc, "rejected": pr}, dict(args, reference_free=False),
                     {}, identity, True)


def test_compute_ipo():
    spec = get_loss(CONFIGS["ipo"])
    loss, metrics = compute(spec, _seq_logps(same=True), args_of(CONFIGS["ipo"]), {}, identity, True)
    assert close(loss, 25.0)  # (0 - 1/(2 * 0.1))^2
    _check_metrics(metrics, PAIR_KEYS, 4)


def test_compute_tdpo():
    spec = get_loss(CONFIGS["tdpo"])
    cm, rm, ckl, rkl = _tdpo_loss_inputs()
    logps = {"chosen_margin": cm, "rejected_margin": rm, "chosen_kl": ckl,
             "rejected_kl": rkl, "chosen": t(-3.0), "rejected": t(-4.0)}
    loss, metrics = compute(spec, logps, dict(args_of(CONFIGS["tdpo"]), beta=0.5), {}, identity, True)
    assert close(loss, softplus_neg(0.75))
    _check_metrics(metrics, PAIR_KEYS | {"kl/chosen", "kl/rejected", "kl/margin"}, 1)
    assert close(metrics["kl/margin"], [-1.0])  # chosen - rejected, as the TDPO repo logs it
    assert close(metrics["rewards/chosen"], [1.25]) and close(metrics["logps/rejected"], [-4.0])


BETA_KEYS = PAIR_KEYS | {"record/gap_mean", "record/gap_std", "record/mask_count", "record/beta_used"}


def test_compute_beta_dpo_first_step_policy_equals_reference():
    spec = get_loss(BETA_DPO)
    state = spec.init_state()
    loss, metrics = compute(spec, _seq_logps(batch=10, same=True), args_of(BETA_DPO), state, identity, True,
                                 generator=gen())
    assert close(loss, LN2)
    _check_metrics(metrics, BETA_KEYS, 10)
    for k in ("record/gap_mean", "record/gap_std", "record/mask_count", "record/beta_used"):
        assert metrics[k].dim() == 0
    assert metrics["record/mask_count"].item() == 8
    assert close(metrics["record/beta_used"], 0.1)
    assert state == {"gap_mean": 0.0, "gap_std": 0.0}


def test_compute_beta_dpo_updates_state_with_gathered_gaps_only_in_train():
    spec = get_loss(BETA_DPO)
    # gaps (1, 3) on this rank; the fake gather duplicates them as if two ranks held the same data
    logps = {"chosen": t(0.0, 2.0, requires_grad=True), "rejected": t(-1.0, -1.0),
             "reference_chosen": t(0.0, 0.0), "reference_rejected": t(0.0, 0.0)}
    seen = []

    def gather(x):
        seen.append(x)
        return torch.cat([x, x])
    # gathered (1, 3, 1, 3): mean 2, unbiased std sqrt(4/3)
    exp_mean, exp_std = 0.1 * 2.0, 0.1 * math.sqrt(4 / 3)
    state = spec.init_state()
    args = dict(args_of(BETA_DPO), mode_weight=0.0, a=0.5)
    _, metrics = compute(spec, logps, args, state, gather, False, generator=gen())
    assert state == {"gap_mean": 0.0, "gap_std": 0.0}           # eval: untouched
    assert close(metrics["record/gap_mean"], exp_mean)           # but this batch used the update
    assert seen and not any(x.requires_grad for x in seen)     # only detached values cross ranks
    loss, metrics = compute(spec, logps, args, state, gather, True, generator=gen())
    assert math.isclose(state["gap_mean"], exp_mean) and math.isclose(state["gap_std"], exp_std)
    assert close(metrics["record/gap_std"], exp_std)
    # all kept: mean gap 2; beta_used = 0.1 (1 + 0.5 (2 - 0.2)) = 0.19; loss = mean softplus(-0.19 h)
    assert close(metrics["record/beta_used"], 0.19)
    assert close(loss, (softplus_neg(0.19) + softplus_neg(0.57)) / 2)
    assert metrics["record/mask_count"].item() == 4  # kept pairs of the gathered (global) batch


def test_compute_beta_dpo_loss_is_mean_over_kept_pairs():
    spec = get_loss(BETA_DPO)
    state = {"gap_mean": 0.0, "gap_std": 1.0}
    # gaps (0, 0.01, 50, 100) with gamma = 1 (state frozen): weights keep the first two
    logps = {"chosen": t(0.0, 0.01, 50.0, 100.0, requires_grad=True), "rejected": t(0., 0., 0., 0.),
             "reference_chosen": t(0., 0., 0., 0.), "reference_rejected": t(0., 0., 0., 0.)}
    args = dict(args_of(BETA_DPO), mode_weight=0.5, a=0.0, gamma=1.0)
    loss, metrics = compute(spec, logps, args, state, identity, True, generator=gen())
    assert close(loss, (softplus_neg(0.0) + softplus_neg(0.001)) / 2)
    assert metrics["record/mask_count"].item() == 2
    loss.backward()
    g = logps["chosen"].grad
    assert g[2].item() == 0.0 and g[3].item() == 0.0 and g[0].item() < 0


def test_compute_metric_names_for_every_spec():
    cases = {
        "sft": ({"chosen": t(-1.0, -2.0)}, {}, {"logps/chosen"}),
        "dpo": (_seq_logps(batch=2), args_of(CONFIGS["dpo"]), PAIR_KEYS),
        "ipo": (_seq_logps(batch=2), args_of(CONFIGS["ipo"]), PAIR_KEYS),
        "tdpo": ({"chosen_margin": t(1.0, 0.0), "rejected_margin": t(0.0, 0.0),
                  "chosen_kl": t(0.1, 0.2), "rejected_kl": t(0.3, 0.1),
                  "chosen": t(-1.0, -2.0), "rejected": t(-2.0, -2.0)},
                 args_of(CONFIGS["tdpo"]), PAIR_KEYS | {"kl/chosen", "kl/rejected", "kl/margin"}),
        "beta_dpo": (_seq_logps(batch=2), args_of(BETA_DPO), BETA_KEYS),
    }
    for name, (logps, args, keys) in cases.items():
        spec = LOSSES[name]
        loss, metrics = compute(spec, logps, args, spec.init_state(), identity, True, generator=gen())
        assert loss.dim() == 0 and torch.isfinite(loss), name
        _check_metrics(metrics, keys, 2)
        assert not any(k.startswith("loss") for k in metrics)


# --- LD-DPO and WPO parts as the trainer supplies them -------------------------

def _tiny_pair_batch(vocab=50, seed=0):
    """A padded chosen/rejected micro-batch of 3 pairs: prompts of 2-3 tokens (-100), completions
    of 1-6 tokens, right padding (-100, attention 0)."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side, lengths in (("chosen", (4, 1, 6)), ("rejected", (2, 5, 6))):
        ids = torch.randint(1, vocab, (3, 10), generator=g)
        mask = torch.zeros(3, 10, dtype=torch.long)
        labels = torch.full((3, 10), -100)
        for i, (prompt, n) in enumerate(zip((2, 3, 2), lengths)):
            mask[i, :prompt + n] = 1
            labels[i, prompt:prompt + n] = ids[i, prompt:prompt + n]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _full_logits_parts(model, batch, side, shared):
    """From model(...).logits: sum, public sum (first `shared` completion tokens), WPO log-weight."""
    logits = model(input_ids=batch[f"{side}_input_ids"],
                   attention_mask=batch[f"{side}_attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1)
    labels = batch[f"{side}_labels"][:, 1:]
    counted = labels != -100
    token = logp.gather(2, labels.clamp(min=0)[..., None])[..., 0]
    public = counted & (counted.cumsum(-1) <= shared[:, None])
    wpo = token - torch.logsumexp(2 * logp, -1)
    return ((token * counted).sum(-1), (token * public).sum(-1), (wpo * counted).sum(-1), counted.sum(-1))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("average", [False, True])
def test_trainer_supplied_ld_and_wpo_parts_equal_full_logits(dtype, tol, average):
    import transformers
    import packing
    import references
    import scoring
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    policy = transformers.GPT2LMHeadModel(config).to(dtype).eval()
    ref_model = transformers.GPT2LMHeadModel(config).to(dtype).eval()
    batch = _tiny_pair_batch()
    spec = get_loss({"name": "ipo" if average else "sigmoid"})
    args = {"beta": 0.1, "ld_alpha": 0.5, "use_weighting": True}
    layouts = [packing.plain_layout(batch, side) for side in ("chosen", "rejected")]
    got = scoring.batch_logps(policy, references.ModelReference(ref_model, 2), batch, layouts, spec,
                              args, 2)
    counts = [(batch[f"{s}_labels"][:, 1:] != -100).sum(-1) for s in ("chosen", "rejected")]
    shared = torch.minimum(*counts)
    assert shared.tolist() == [2, 1, 6]
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            total, public, wpo, n = _full_logits_parts(policy, batch, side, shared)
            ref_total, ref_public, _, _ = _full_logits_parts(ref_model, batch, side, shared)
            div = n.to(dtype) if average else torch.ones_like(total)
            expected = {side: total / div, f"public.{side}": public / div,
                        f"reference_{side}": ref_total / div, f"public.reference_{side}": ref_public / div,
                        f"{side}_wpo": wpo, f"{side}_tokens": n.to(dtype)}
            for key, value in expected.items():
                assert torch.allclose(got.tensors()[key].to(dtype), value, rtol=tol, atol=tol), key
    assert got.chosen.requires_grad and got.public.chosen.requires_grad
    assert not got.chosen_wpo.requires_grad


# --- two data-parallel ranks give one process's loss and gradient --------------

def _on_two_ranks(fn):
    """[fn(0, gather), fn(1, gather)] run on two threads whose gather concatenates both ranks'
    tensors in rank order, as an all-gather over two data-parallel processes."""
    import threading
    barrier, slots, results, errors = threading.Barrier(2, timeout=30), [None, None], [None, None], []

    def gather_for(rank):
        def gather(x):
            slots[rank] = x
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()
            return out
        return gather

    def run(rank):
        try:
            results[rank] = fn(rank, gather_for(rank))
        except Exception as e:  # surfaced below, in the test's thread
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def _global_batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    keys = ("chosen", "rejected", "reference_chosen", "reference_rejected",
            "public.chosen", "public.rejected", "public.reference_chosen",
            "public.reference_rejected", "chosen_wpo", "rejected_wpo")
    out = {k: -torch.rand(n, dtype=D, generator=g) * 20 for k in keys}
    out.update({f"{s}_tokens": torch.randint(1, 30, (n,), generator=g).to(D) for s in ("chosen", "rejected")})
    return out


def _loss_and_grads(config, batch, gather, rank, state):
    spec, args = get_loss(config), {k: v for k, v in config.items() if k != "name"}
    scored = ("chosen", "rejected", "public.chosen", "public.rejected")
    leaves = {k: v.clone().requires_grad_(k in scored) for k, v in batch.items()}
    loss, _ = compute(spec, leaves, args, state, gather, True, generator=torch.Generator().manual_seed(5),
                           rank=rank)
    grads = torch.autograd.grad(loss, [leaves["chosen"], leaves["rejected"]])
    return loss.detach(), torch.cat(grads)


@pytest.mark.parametrize("config", [
    {"name": "beta_dpo", "beta": 0.1, "mode_weight": 0.3, "a": 0.6, "gamma": 0.9},
    {"name": "aot", "beta": 0.1, "label_smoothing": 0.1},
    {"name": "aot_unpaired", "beta": 0.1, "ld_alpha": 0.5},
    {"name": "sigmoid", "beta": 0.1, "rpo_alpha": 0.5, "use_weighting": True},
    {"name": "sigmoid_norm", "beta": 0.1, "rpo_alpha": 0.5, "ld_alpha": 0.2},
    {"name": "mix", "beta": 0.1, "losses": ["sigmoid", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0],
     "use_weighting": True},
], ids=["beta_dpo", "aot", "aot_unpaired", "rpo_wpo", "sigmoid_norm_rpo_ld", "mpo_wpo"])
def test_two_data_parallel_ranks_equal_one_process(config):
    # each rank holds 4 of the 8 pairs; averaging the ranks' losses and gradients (what data-parallel
    # training does) must give the single process's loss and gradient on all 8
    batch = _global_batch()
    state = get_loss(config).init_state()
    want_loss, want_grad = _loss_and_grads(config, batch, lambda x: x, 0, dict(state))
    shards = [{k: v[4 * r:4 * r + 4] for k, v in batch.items()} for r in range(2)]
    got = _on_two_ranks(lambda r, gather: _loss_and_grads(config, shards[r], gather, r, dict(state)))
    loss = (got[0][0] + got[1][0]) / 2
    assert torch.allclose(loss, want_loss, rtol=1e-12), (loss, want_loss)
    # per rank: (chosen, rejected) of its 4 rows; averaged over 2 ranks
    grads = [g.view(2, 4) / 2 for _, g in got]
    assert torch.allclose(torch.cat(grads, 1).flatten(), want_grad, rtol=1e-10, atol=1e-14)
