"""TRL 1.16's loss types (huggingface/trl, trainer/dpo_trainer.py, DPOTrainer._compute_loss) as pure
functions, plus what TRL adds to any of them: RPO's NLL term, WPO's weights, LD-DPO's log-probs.

Every function takes the four (B,) log-prob tensors policy_chosen, policy_rejected,
reference_chosen, reference_rejected (summed over completion tokens unless the registry entry in
losses.py says `averaged`), then beta and the loss's own hyper-parameters under TRL's names and
defaults, and returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): the mean of
`losses` is TRL's loss; rewards are beta * (policy - reference), detached, as TRL logs them.
`preference_loss` (the DPO repository's DPO / cDPO / IPO arithmetic) lives here because TRL's
sigmoid and ipo are it. No config reading, no distributed calls: callers pass `gather`.
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


def preference_loss(policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor,
                    reference_rejected_logps: torch.Tensor,
                    beta: float,
                    label_smoothing: float = 0.0,
                    ipo: bool = False,
                    reference_free: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, conservative DPO (label smoothing) or IPO loss per pair.

    h = (pi_c - pi_r) - (ref_c - ref_r), with the reference part 0 when reference_free.
    DPO/cDPO (DPO paper Eq. 7; cDPO note Eq. 3): -(1-eps) logsig(beta h) - eps logsig(-beta h).
    IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 beta))^2; label_smoothing is ignored.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs.
        reference_chosen_logps, reference_rejected_logps: (B,) reference log-probs.
        beta: temperature (> 0).
        label_smoothing: assumed fraction of flipped labels, in [0, 0.5).
        ipo: use the IPO squared loss.
        reference_free: drop the reference log-ratio from h (rewards still use it).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are
        beta * (policy - reference) per side, detached.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    if reference_free:
        h = pi_logratios
    else:
        h = pi_logratios - (reference_chosen_logps - reference_rejected_logps)

    if ipo:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratios: torch.Tensor, f_divergence_type: str = "reverse_kl",
                       f_alpha_divergence_coef: float = 0.5) -> torch.Tensor:
    """f'(pi/ref) from log(pi/ref): the f-DPO reward (Wang et al. 2023, arXiv 2309.16240), as TRL.

    reverse_kl: log t; forward_kl: 1 - 1/t; js_divergence: log 2 + logsig(log t);
    alpha_divergence: (t^(alpha-1) - 1) / (alpha - 1), log t when alpha = 1.

    Args:
        logratios: (B,) log pi - log ref.
        f_divergence_type: one of F_DIVERGENCES.
        f_alpha_divergence_coef: alpha of the alpha-divergence.

    Returns:
        (B,) scores, same dtype.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type != "alpha_divergence":
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; use one of {F_DIVERGENCES}")
    alpha = f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    t = (alpha - 1.0) * logratios
    # TRL clamps exp's argument (11 for float16, 80 otherwise) so the result stays representable
    # once cast back; 16-bit values are exponentiated in float32. (TRL has no float64 entry.)
    work = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    work = work.clamp(max=11.0 if t.dtype == torch.float16 else 80.0)
    return (torch.exp(work) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))


def _rewards(beta, pc, pr, rc, rr):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def _delta_score(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef):
    """f'(chosen ratio) - f'(rejected ratio), in TRL's order of operations."""
    return (f_divergence_score(pc - rc, f_divergence_type, f_alpha_divergence_coef)
            - f_divergence_score(pr - rr, f_divergence_type, f_alpha_divergence_coef))


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) logsig(z) - eps logsig(-z): the logistic loss with flipped-label rate eps."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def sigmoid_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 reference_free: bool = False):
    """DPO (Rafailov et al. 2023, Eq. 7), cDPO with label_smoothing, f-DPO with f_divergence_type.

    With reverse_kl this is `preference_loss` (the DPO repository's arithmetic). TRL 1.16's
    sigmoid has no label smoothing; label_smoothing > 0 is the cDPO note's form (older TRL).
    """
    if f_divergence_type == "reverse_kl":
        return preference_loss(pc, pr, rc, rr, beta, label_smoothing, reference_free=reference_free)
    if reference_free:
        raise ValueError("reference_free needs f_divergence_type=reverse_kl")
    delta = _delta_score(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    return (_smoothed_logistic(beta * delta, label_smoothing),) + _rewards(beta, pc, pr, rc, rr)


def ipo_loss(pc, pr, rc, rr, beta: float, reference_free: bool = False):
    """IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 beta))^2 on per-token averaged log-probs."""
    return preference_loss(pc, pr, rc, rr, beta, ipo=True, reference_free=reference_free)


def hinge_loss(pc, pr, rc, rr, beta: float, f_divergence_type: str = "reverse_kl",
               f_alpha_divergence_coef: float = 0.5):
    """SLiC / RSO hinge (Zhao et al. 2023, arXiv 2305.10425; Liu et al. 2023, arXiv 2309.06657):
    relu(1 - beta delta)."""
    delta = _delta_score(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    return (torch.relu(1 - beta * delta),) + _rewards(beta, pc, pr, rc, rr)


def exo_pair_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 1e-3,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, Eq. 16): KL(softmax(beta ratios) || (1-eps, eps)).

    = sig(z)(logsig(z) - log(1-eps)) + sig(-z)(logsig(-z) - log eps), z = beta delta; eps > 0.
    """
    z = beta * _delta_score(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))
    return (losses,) + _rewards(beta, pc, pr, rc, rr)


def nca_pair_loss(pc, pr, rc, rr, beta: float):
    """NCA (Chen et al. 2024, arXiv 2402.05369): -logsig(r_c) - logsig(-r_c)/2 - logsig(-r_r)/2."""
    cr, rjr = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rjr)
    return losses, cr.detach(), rjr.detach()


def robust_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0,
                f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409):
    (-(1-eps) logsig(z) + eps logsig(-z)) / (1 - 2 eps), z = beta delta."""
    z = beta * _delta_score(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    clean = -(1 - label_smoothing) * F.logsigmoid(z)
    flipped = -label_smoothing * F.logsigmoid(-z)
    return ((clean - flipped) / (1 - 2 * label_smoothing),) + _rewards(beta, pc, pr, rc, rr)


def bco_pair_loss(pc, pr, rc, rr, beta: float):
    """BCO on pairs (Jung et al. 2024, arXiv 2404.04656), as TRL 1.16 (no running reward shift):
    -logsig(r_c) - logsig(-r_r)."""
    cr, rjr = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(cr) - F.logsigmoid(-rjr), cr.detach(), rjr.detach()


def sppo_hard_loss(pc, pr, rc, rr, beta: float):
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P in {0, 1}):
    (ratio_c - 1/(2 beta))^2 + (ratio_r + 1/(2 beta))^2."""
    losses = ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2
    return (losses,) + _rewards(beta, pc, pr, rc, rr)


def _sorted_positions(values: torch.Tensor, gather: Optional[Callable], rank: int):
    """(values of the global batch sorted ascending, each local row's position in that order).

    Args:
        values: (B,) this rank's values (detached here).
        gather: concatenates over data-parallel ranks, None for one process.
        rank: this rank's data-parallel index.
    """
    everywhere = values.detach() if gather is None else gather(values.detach())
    ordered, order = torch.sort(everywhere, dim=0)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    b = values.shape[0]
    return ordered, position[rank * b:(rank + 1) * b]


def aot_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0,
             gather: Optional[Callable] = None, rank: int = 0):
    """AOT for paired data (Melnyk et al. 2024, arXiv 2406.05882): the smoothed logistic loss on
    sorted(pi_c - pi_r) - sorted(ref_c - ref_r) over the (global) batch.

    Row i of `losses` is the term of the sorted position its policy margin takes, so the rows'
    mean is TRL's loss (TRL sorts per device; here the sort spans all data-parallel ranks, so
    several processes equal one) and the gradient reaches each margin where it is sorted to.
    """
    ordered_ref, _ = _sorted_positions(rc - rr, gather, rank)
    _, position = _sorted_positions(pc - pr, gather, rank)
    delta = (pc - pr) - ordered_ref[position]
    return (_smoothed_logistic(beta * delta, label_smoothing),) + _rewards(beta, pc, pr, rc, rr)


def aot_unpaired_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0,
                      gather: Optional[Callable] = None, rank: int = 0):
    """AOT for unpaired data (TRL's `aot_unpaired`, formerly `aot_pair`): the smoothed logistic
    loss on sorted(ratio_c) - sorted(ratio_r) over the (global) batch.

    Row i holds the term at the position its chosen ratio sorts to (its value), plus the term at
    the position its rejected ratio sorts to minus that term's value (its gradient only): the
    rows' mean and gradient are TRL's, and across ranks those of the gathered batch.
    """
    chosen, rejected = pc - rc, pr - rr
    ordered_c, at_c = _sorted_positions(chosen, gather, rank)
    ordered_r, at_r = _sorted_positions(rejected, gather, rank)
    by_chosen = _smoothed_logistic(beta * (chosen - ordered_r[at_c]), label_smoothing)
    by_rejected = _smoothed_logistic(beta * (ordered_c[at_r] - rejected), label_smoothing)
    return (by_chosen + (by_rejected - by_rejected.detach()),) + _rewards(beta, pc, pr, rc, rr)


def apo_zero_loss(pc, pr, rc, rr, beta: float):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): 1 - sig(r_c) + sig(r_r)."""
    losses = (1 - torch.sigmoid(beta * (pc - rc))) + torch.sigmoid(beta * (pr - rr))
    return (losses,) + _rewards(beta, pc, pr, rc, rr)


def apo_down_loss(pc, pr, rc, rr, beta: float):
    """APO-down (same paper, Eq. 8): sig(r_c) + 1 - sig(r_c - r_r)."""
    chosen = pc - rc
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - (pr - rr))))
    return (losses,) + _rewards(beta, pc, pr, rc, rr)


def discopop_loss(pc, pr, rc, rr, beta: float, discopop_tau: float = 0.05,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5):
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5), z = beta delta:
    (1 - sig(z/tau)) (-logsig(z)) + sig(z/tau) exp(-z)."""
    z = beta * _delta_score(pc, pr, rc, rr, f_divergence_type, f_alpha_divergence_coef)
    mix = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    return (losses,) + _rewards(beta, pc, pr, rc, rr)


def sigmoid_norm_loss(pc, pr, rc, rr, beta: float):
    """Length-normalised DPO (TRL's `sigmoid_norm`; SimPO-style averaging, Meng et al. 2024,
    arXiv 2405.14734) on per-token averaged log-probs: -logsig(beta ((pi_c - ref_c) - (pi_r - ref_r)))."""
    delta = (pc - rc) - (pr - rr)
    return (-F.logsigmoid(beta * delta),) + _rewards(beta, pc, pr, rc, rr)


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor,
               gather: Callable, wpo: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TRL's `sft` term (and RPO's NLL): mean NLL over all chosen completion tokens of the batch.

    -sum(log-probs) / sum(tokens) over the global batch: each rank returns its own sum times the
    number of data-parallel ranks over the gathered token count, so that the trainers' gradient
    averaging over ranks yields the global token mean (FSDP equals one process).

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions.
        chosen_tokens: (B,) number of completion tokens per row (no grad).
        gather: concatenates a 1-D tensor over data-parallel ranks.
        wpo: (B,) WPO pair weights or None; TRL multiplies its (batch-constant) sft term by
            them and averages, i.e. scales it by the batch's mean weight.

    Returns:
        0-d loss.
    """
    tokens = chosen_tokens.detach().to(policy_chosen_logps.dtype)
    everywhere = gather(tokens)
    ranks = everywhere.numel() // max(1, tokens.numel())
    nll = -policy_chosen_logps.sum() * ranks / everywhere.sum().clamp(min=1)
    return nll if wpo is None else nll * gather(wpo.detach()).mean()


def wpo_weights(chosen_wpo_logweight: torch.Tensor, rejected_wpo_logweight: torch.Tensor,
                chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024, arXiv 2406.11827, Eq. 2, as TRL's use_weighting).

    w = exp(mean_t [log p(y_t) - logsumexp_v 2 log p(v)]) per side, chosen times rejected.
    The trainer supplies the per-sequence sums from the chunked output layer
    (losses.BatchLogps.chosen_wpo / rejected_wpo).

    Args:
        chosen_wpo_logweight, rejected_wpo_logweight: (B,) sum over completion tokens of
            log p(y_t) - logsumexp_v(2 log p(v | prefix_t)), detached.
        chosen_tokens, rejected_tokens: (B,) completion token counts.

    Returns:
        (B,) detached weights that multiply each pair's loss.
    """
    chosen = torch.exp(chosen_wpo_logweight.detach() / chosen_tokens.clamp(min=1))
    rejected = torch.exp(rejected_wpo_logweight.detach() / rejected_tokens.clamp(min=1))
    return chosen * rejected


def ld_logps(total_logps: torch.Tensor, public_logps: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's length-desensitised log-prob (Liu et al. 2024, arXiv 2409.06411), as TRL's ld_alpha.

    public + ld_alpha * verbose, where `public` sums the first min(len_chosen, len_rejected)
    completion tokens of the pair and verbose = total - public; the trainer supplies
    them as losses.BatchLogps.public.

    Args:
        total_logps: (B,) log-probs summed over all completion tokens.
        public_logps: (B,) summed over the pair's shared length only.
        ld_alpha: weight of the verbose part, in [0, 1].

    Returns:
        (B,) log-probs.
    """
    return public_logps + ld_alpha * (total_logps - public_logps)
