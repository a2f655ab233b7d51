"""The losses of TRL 1.16's KTOTrainer, CPOTrainer (CPO, SimPO, AlphaPO) and ORPOTrainer as pure
functions of per-sequence log-probs.

Sources (TRL 1.16, huggingface/trl): trainer/kto_trainer.py (`KTOTrainer._compute_loss`),
experimental/cpo/cpo_trainer.py (`CPOTrainer.cpo_loss`), experimental/orpo/orpo_trainer.py
(`ORPOTrainer.odds_ratio_loss`). Papers: KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7),
APO-zero unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266), CPO (Xu et al. 2024,
arXiv 2401.08417, Eq. 3), SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), AlphaPO (Gupta et al.
2025, arXiv 2501.03884), ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4 and 7).

The paired functions keep the registry's shape: four (B,) inputs (policy chosen, policy rejected,
reference chosen, reference rejected; the references are unused by these reference-free
objectives and may be None), then beta and the loss's own keys under TRL's names and defaults;
they return (losses, chosen_rewards, rejected_rewards). The NLL terms (CPO's cpo_alpha, ORPO's
chosen NLL) are added by the registry entries, as RPO's is. No config reading, no distributed
calls: callers pass `gather`.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (Gupta et al. 2025): (1 - p^(-alpha)) / alpha with p = exp(logps).

    TRL forms exp(logps) ** -alpha; -expm1(-alpha logps) / alpha is the same number where that is
    finite, and stays finite where exp(logps) underflows to 0.

    Args:
        logps: (B,) log-probs (per-token means for simpo and ipo).
        alpha: shape parameter, not 0.

    Returns:
        (B,) rewards.
    """
    return -torch.expm1(-alpha * logps) / alpha


def cpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc=None, rr=None, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, alpha: float = 0.0,
             simpo_gamma: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair term of TRL's CPOTrainer (`cpo_loss`): CPO, SimPO, AlphaPO; no reference.

    With s = pi_c - pi_r (or AlphaPO's reward difference when alpha != 0):
      sigmoid (CPO Eq. 3): -(1 - eps) logsig(beta s) - eps logsig(-beta s);
      simpo (SimPO Eq. 6): the same on s - gamma / beta;
      hinge: relu(1 - beta s);  ipo: (s - 1 / (2 beta))^2 (label_smoothing unused, as TRL).
    The caller supplies per-token averaged log-probs for simpo and ipo, summed ones otherwise.

    Args:
        pc, pr: (B,) policy log-probs of the chosen and rejected completions.
        rc, rr: unused (reference-free); any value, None included.
        beta: temperature (> 0).
        loss_type: one of CPO_LOSS_TYPES.
        label_smoothing: flipped-label rate for sigmoid and simpo, in [0, 0.5).
        alpha: AlphaPO's reward shape; 0 keeps the log-prob reward.
        simpo_gamma: SimPO's target reward margin (simpo only).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are beta times the reward
        (log-prob, or AlphaPO's), detached, as TRL logs them.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f'unknown CPO loss_type {loss_type!r}; use one of {", ".join(CPO_LOSS_TYPES)}')
    if alpha != 0:
        chosen, rejected = alphapo_reward(pc, alpha), alphapo_reward(pr, alpha)
    else:
        chosen, rejected = pc, pr
    s = chosen - rejected
    if loss_type == "simpo":
        s = s - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * s) * (1 - label_smoothing) - F.logsigmoid(-beta * s) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * s)
    else:  # ipo: Azar et al. 2023, Eq. 17, beta being their tau
        losses = (s - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, switching formula at -log 2 to avoid cancellation
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"), as TRL's ORPO."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(pc: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio log(odds_c / odds_r), odds = p / (1 - p), on averaged log-probs,
    in at least float32 (TRL upcasts 16-bit inputs)."""
    if pc.dtype in (torch.float16, torch.bfloat16):
        pc, pr = pc.float(), pr.float()
    return (pc - pr) - (log1mexp(pc) - log1mexp(pr))


def orpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc=None, rr=None, *, beta: float
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, Eq. 7; TRL's `odds_ratio_loss`, sign turned so
    that it is a loss): -beta logsig(log odds ratio). beta is the paper's lambda.

    Args:
        pc, pr: (B,) per-token averaged policy log-probs (< 0) of the chosen and rejected sides.
        rc, rr: unused (reference-free).
        beta: weight of the odds-ratio term (> 0).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,), at least float32; the rewards are
        beta * averaged log-prob, detached, as TRL logs them.
    """
    log_odds = orpo_log_odds(pc, pr)
    return (-beta * F.logsigmoid(log_odds), beta * pc.detach().to(log_odds.dtype),
            beta * pr.detach().to(log_odds.dtype))


def mismatched_order(batch_size: int) -> torch.Tensor:
    """KTO's mismatched pairs (TRL's `add_kl_completion_ids`): row i takes the completion of row
    i - 1, the first row that of the last: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).

    Returns:
        (batch_size,) long indices into the batch's completions.
    """
    return torch.roll(torch.arange(batch_size), 1)


def kto_kl(kl_policy_logps: torch.Tensor, kl_reference_logps: torch.Tensor,
           gather: Optional[Callable] = None) -> torch.Tensor:
    """KTO's reference point z_0: the batch estimate of KL(policy || reference), as TRL.

    The mean over this process's mismatched pairs of log pi(y'|x) - log ref(y'|x), averaged over
    data-parallel processes (the mean of the per-process means), clamped at 0, detached.

    Args:
        kl_policy_logps, kl_reference_logps: (B,) summed log-probs of the mismatched completions.
        gather: concatenates a 1-D tensor over data-parallel processes (None: one process).

    Returns:
        0-d detached tensor.
    """
    local = (kl_policy_logps - kl_reference_logps).detach().mean().reshape(1)
    everywhere = local if gather is None else gather(local)
    return everywhere.mean().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto"
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7) as TRL's KTOTrainer computes it, per example.

    With r = pi - ref (summed completion log-probs) and the reference point kl (`kto_kl`):
      kto: desirable w_d (1 - sig(beta (r - kl))), undesirable w_u (1 - sig(beta (kl - r)));
      apo_zero_unpaired (kl unused): desirable w_d (1 - sig(beta r)), undesirable w_u sig(beta r).
    TRL concatenates the desirable rows' losses before the undesirable rows' and averages; here each
    row keeps its place, so the mean (the loss) and the gradient are the same.

    Args:
        policy_logps, reference_logps: (B,) summed log-probs of each example's completion.
        labels: (B,) bool, True for desirable.
        kl: 0-d detached reference point (ignored by apo_zero_unpaired).
        beta: temperature (> 0).
        desirable_weight, undesirable_weight: lambda_D and lambda_U of the paper.
        loss_type: one of KTO_LOSS_TYPES.

    Returns:
        (losses, rewards), each (B,); rewards = beta * r, detached.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f'unknown KTO loss_type {loss_type!r}; use one of {", ".join(KTO_LOSS_TYPES)}')
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    ratio = policy_logps - reference_logps
    if loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (ratio - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - ratio))
    else:
        desirable = 1 - torch.sigmoid(beta * ratio)
        undesirable = torch.sigmoid(beta * ratio)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return losses, beta * ratio.detach()


def kto_weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                      undesirable_weight: float) -> Optional[str]:
    """TRL's advice for imbalanced data (KTOTrainer, from Eq. 8 of the KTO paper): the weighted
    counts should satisfy 1 <= (w_D n_D) / (w_U n_U) <= 4/3, i.e. EITHER desirable_weight in
    [n_U w_U / n_D, 1.33 n_U w_U / n_D] OR undesirable_weight in [n_D w_D / (1.33 n_U), n_D w_D / n_U].

    Returns:
        None when the counts are equal or one weight is already in its range; else one line
        recommending the ranges (TRL rounds them to 2 decimals, as here).
    """
    n_desirable, n_undesirable = max(n_desirable, 1), max(n_undesirable, 1)
    if n_desirable == n_undesirable:
        return None
    desirable = (round(n_undesirable * undesirable_weight / n_desirable, 2),
                 round(n_undesirable * undesirable_weight / n_desirable * 1.33, 2))
    undesirable = (round(n_desirable * desirable_weight / n_undesirable / 1.33, 2),
                   round(n_desirable * desirable_weight / n_undesirable, 2))
    if desirable[0] <= desirable_weight <= desirable[1] or undesirable[0] <= undesirable_weight <= undesirable[1]:
        return None
    return (f"{n_desirable:,} desirable and {n_undesirable:,} undesirable examples with loss.desirable_weight="
            f"{desirable_weight} and loss.undesirable_weight={undesirable_weight}: KTO (Eq. 8, as TRL) "
            f"recommends EITHER desirable_weight in [{desirable[0]}, {desirable[1]}] OR undesirable_weight in "
            f"[{undesirable[0]}, {undesirable[1]}] (not both); see docs/kto.md")
