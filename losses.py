"""Preference-learning losses (SFT, TDPO, beta-DPO; DPO/cDPO/IPO and TRL's loss types come from
trl_losses.py, those of TRL's KTO, CPO and ORPO trainers from kto_cpo_orpo.py) and the loss
registry, which says what each loss needs from the trainer.

Everything here is a pure function of its arguments: no config reading, no
distributed calls (the caller passes a `gather` callable where one is needed).

Sources the formulas follow:
  * DPO / cDPO / IPO: eric-mitchell/direct-preference-optimization, trainers.py
    (Rafailov et al. 2023, arXiv 2305.18290; cDPO note https://ericmitchell.ai/cdpo.pdf;
    Azar et al. 2023, arXiv 2310.12036).
  * TDPO: Vance0124/Token-level-Direct-Preference-Optimization, trainers.py
    (Zeng et al. 2024, arXiv 2404.11999).
  * beta-DPO: junkangwu/beta-DPO, trainers.py (Wu et al. 2024, arXiv 2407.08639).

The per-sequence inputs (log-probs, TDPO's position KL, WPO's and LD-DPO's parts) are computed
in logps.py, which also holds their full-logits reference formulas; nothing here imports it.
"""

import inspect
import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# TRL's loss types; preference_loss and f_divergence_score are re-exported for callers of losses.*
from utils import is_number
from trl_losses import (F_DIVERGENCES, aot_loss, aot_unpaired_loss, apo_down_loss, apo_zero_loss,  # noqa: F401
                        bco_pair_loss, chosen_nll, discopop_loss, exo_pair_loss, f_divergence_score,
                        hinge_loss, ipo_loss, ld_logps, nca_pair_loss, preference_loss, robust_loss,
                        sigmoid_loss, sigmoid_norm_loss, sppo_hard_loss, wpo_weights, _rewards)
# TRL's KTOTrainer, CPOTrainer (CPO, SimPO, AlphaPO) and ORPOTrainer
from kto_cpo_orpo import CPO_LOSS_TYPES, KTO_LOSS_TYPES, cpo_loss, kto_kl, kto_loss, orpo_log_odds, orpo_loss


# ---------------------------------------------------------------------------
# Part A: the DPO, TDPO and beta-DPO repositories' losses on per-sequence log-probs
# ---------------------------------------------------------------------------

def tdpo_loss(chosen_logps_margin: torch.Tensor,
              rejected_logps_margin: torch.Tensor,
              chosen_position_kl: torch.Tensor,
              rejected_position_kl: torch.Tensor,
              beta: float, alpha: float = 0.5, if_tdpo2: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO1 / TDPO2 loss (Zeng et al. 2024; signs as in the TDPO repo's `tdpo_loss`).

    With Delta = chosen_margin - rejected_margin:
      TDPO1: z = Delta - (KL_r - KL_c)
      TDPO2: z = Delta - alpha * (KL_r - stopgrad(KL_c))
    loss = -logsig(beta z).

    Args:
        chosen_logps_margin, rejected_logps_margin: (B,) sum of log pi - log ref over the response.
        chosen_position_kl, rejected_position_kl: (B,) summed per-position KL(ref || pi).
        beta: temperature.
        alpha: weight of the KL term in TDPO2 (unused by TDPO1).
        if_tdpo2: TDPO2 when True, TDPO1 otherwise.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are
        beta * (margin + KL) per side, detached.
    """
    delta = chosen_logps_margin - rejected_logps_margin
    if if_tdpo2:
        # stop-gradient on the chosen KL: TDPO2 only pushes the rejected KL
        z = delta - alpha * (rejected_position_kl - chosen_position_kl.detach())
    else:
        z = delta - (rejected_position_kl - chosen_position_kl)
    losses = -F.logsigmoid(beta * z)
    chosen_rewards = beta * (chosen_logps_margin + chosen_position_kl).detach()
    rejected_rewards = beta * (rejected_logps_margin + rejected_position_kl).detach()
    return losses, chosen_rewards, rejected_rewards


def _keep_count(batch_size: int, mode_weight: float) -> int:
    """Pairs kept by beta-DPO's filter: int(B (1 - mode_weight)) as the repo, but at least 1."""
    return min(batch_size, max(1, int(batch_size * (1 - mode_weight))))


def _sample_kept_pairs(gaps: torch.Tensor, gap_mean: float, gap_std: float, n_keep: int,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
    """Draw `n_keep` distinct pairs with probability proportional to a Gaussian weight of the gap.

    The weights exp(-0.5 ((A - mean) / std)^2) are handled in log space and
    shifted by their maximum before exp(): multinomial normalises, so the draw
    is the reference's draw whenever the reference's weights are usable.
    Fallbacks (where the beta-DPO repo raises or samples zero-weight pairs):
      * std 0 or non-finite (policy == reference on the first step): uniform weights;
      * a gap whose log-weight is not finite (NaN gap) gets weight 0; if all do, uniform;
      * fewer positive (after the shift) weights than pairs still to keep: take
        what multinomial can draw, then repeat on the remaining pairs with their
        own max-shift, i.e. sequential sampling without replacement done in log
        space, so the tail is ordered by weight instead of arbitrarily.

    Args:
        gaps: (B,) detached reward gaps.
        gap_mean, gap_std: running statistics (python floats).
        n_keep: 1 <= n_keep <= B.
        generator: torch.Generator for multinomial; sampling runs on its device.

    Returns:
        (B,) bool mask with exactly n_keep True entries, on gaps' device.
    """
    device = generator.device if generator is not None else gaps.device
    a = gaps.detach().to(device)
    if math.isfinite(gap_std) and gap_std > 0:
        logw = -0.5 * ((a - gap_mean) / gap_std) ** 2
        logw = torch.where(torch.isfinite(logw), logw, torch.full_like(logw, -math.inf))
    else:
        logw = torch.zeros_like(a)
    if not torch.isfinite(logw).any():
        logw = torch.zeros_like(a)

    kept = torch.zeros(a.shape, dtype=torch.bool, device=device)
    remaining = n_keep
    while remaining > 0:
        avail = logw.masked_fill(kept, -math.inf)
        top = avail.max()
        if torch.isinf(top):
            # only -inf weights left: uniform over the pairs not yet kept
            w = (~kept).to(a.dtype)
        else:
            w = torch.exp(avail - top)
        k = min(remaining, int((w > 0).sum()))
        idx = torch.multinomial(w, k, replacement=False, generator=generator)
        kept[idx] = True
        remaining -= k
    return kept.to(gaps.device)


def _kept_pairs_and_beta(gaps: torch.Tensor, beta: float, a: float, mode_weight: float,
                         gap_mean: float, gap_std: float, generator: Optional[torch.Generator]):
    """beta-DPO's (kept mask (N,) of the global batch's gaps, detached beta_used)."""
    kept = _sample_kept_pairs(gaps, gap_mean, gap_std, _keep_count(gaps.shape[0], mode_weight),
                              generator)
    beta_used = beta * (1 + a * (gaps[kept].mean() - gap_mean))
    return kept, beta_used.clamp(min=1e-3).detach()


def beta_dpo_loss(policy_chosen_logps: torch.Tensor,
                  policy_rejected_logps: torch.Tensor,
                  reference_chosen_logps: torch.Tensor,
                  reference_rejected_logps: torch.Tensor,
                  beta: float, a: float, mode_weight: float,
                  gap_mean: float, gap_std: float,
                  reference_free: bool = False,
                  generator: Optional[torch.Generator] = None,
                  gather: Callable = None, rank: int = 0
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """beta-DPO: batch-level dynamic beta with beta-guided data filtering.

    As junkangwu/beta-DPO `preference_loss` with mode_loss == 'beta_DPO' (Wu et al. 2024): gaps
    A = (pi_c - ref_c) - (pi_r - ref_r) (always with the reference), Gaussian weights around the
    running gap mean, keep int(B (1 - mode_weight)) pairs sampled without replacement,
    beta_used = max(beta (1 + a (mean A_kept - gap_mean)), 1e-3). Differences from the repo, all
    where it crashes or returns NaN: at least one pair is kept, and the weights fall back as
    `_sample_kept_pairs` says (uniform when gap_std is 0).
    Across data-parallel ranks the selection and beta_used are those of the gathered (global)
    batch, drawn identically on every rank (same generator state); each rank keeps its own rows.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs.
        reference_chosen_logps, reference_rejected_logps: (B,) reference log-probs.
        beta: base temperature.
        a: how strongly beta follows the kept pairs' mean gap.
        mode_weight: fraction of pairs filtered out, in [0, 1).
        gap_mean, gap_std: running gap statistics (see `update_gap_stats`).
        reference_free: drop the reference log-ratio from h in the loss (not from the gaps).
        generator: random generator for the pair selection.
        gather: concatenates a 1-D tensor over data-parallel ranks (None: one process).
        rank: this process's data-parallel rank (its rows are rank * B ... rank * B + B - 1).

    Returns:
        (losses, chosen_rewards, rejected_rewards, extras), the registry's contract plus extras:
          losses (B,) = -logsig(beta_used h) for every pair (no gradient through beta_used);
          rewards (B,) = beta * (policy - reference), base beta, detached;
          extras = {'weights': (B,) 1.0 for kept pairs, 0.0 otherwise (the loss is the mean over
          the kept pairs of the global batch), 'mask_count': 0-d number kept in the global batch,
          'beta_used': 0-d detached beta}.
    """
    batch_size = policy_chosen_logps.shape[0]
    if batch_size == 0:
        raise ValueError("beta_dpo_loss needs at least one pair")
    gaps = ((policy_chosen_logps - reference_chosen_logps)
            - (policy_rejected_logps - reference_rejected_logps)).detach()
    everywhere = gaps if gather is None else gather(gaps)
    kept_all, beta_used = _kept_pairs_and_beta(everywhere, beta, a, mode_weight, float(gap_mean),
                                               float(gap_std), generator)
    mask = kept_all[rank * batch_size:(rank + 1) * batch_size].to(gaps.dtype)

    pi_logratios = policy_chosen_logps - policy_rejected_logps
    h = pi_logratios if reference_free else (
        pi_logratios - (reference_chosen_logps - reference_rejected_logps))
    losses = -F.logsigmoid(beta_used * h)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards, {
        "weights": mask, "mask_count": kept_all.to(gaps.dtype).sum(), "beta_used": beta_used}


def update_gap_stats(gap_mean: float, gap_std: float, gaps: torch.Tensor,
                     gamma: float = 0.9) -> Tuple[float, float]:
    """Momentum update of beta-DPO's running gap mean and std.

    x <- gamma x + (1 - gamma) batch_statistic, with the unbiased std
    (beta-DPO repo `update_and_sync_tensor_mean`; it starts both at 0).
    The repo's std of a single gap is NaN and poisons the state; here it is 0.
    Non-finite gaps are left out of the statistics; with none left the state is unchanged.

    Args:
        gap_mean, gap_std: current values.
        gaps: (N,) gaps of the whole (already gathered) batch.
        gamma: momentum in (0, 1].

    Returns:
        (gap_mean, gap_std) as python floats.
    """
    g = gaps.detach().flatten().to(torch.float64)
    g = g[torch.isfinite(g)]
    if g.numel() == 0:
        return float(gap_mean), float(gap_std)
    batch_mean = g.mean().item()
    batch_std = g.std(unbiased=True).item() if g.numel() > 1 else 0.0
    return (gamma * float(gap_mean) + (1 - gamma) * batch_mean,
            gamma * float(gap_std) + (1 - gamma) * batch_std)


def sft_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps=None, reference_chosen_logps=None,
             reference_rejected_logps=None) -> Tuple[torch.Tensor, None, None]:
    """Negative log-likelihood of the target per example (DPO repo's SFT branch).

    Takes the registry's four inputs for a uniform call; only the first is used.

    Args:
        policy_chosen_logps: (B,) summed log-prob of each target.

    Returns:
        ((B,) losses, None, None): no rewards without a rejected side or a reference.
    """
    return -policy_chosen_logps, None, None


# ---------------------------------------------------------------------------
# Part B: the registry
# ---------------------------------------------------------------------------

Metrics = Dict[str, torch.Tensor]



@dataclass
class BatchLogps:
    """What a loss reads from one micro-batch (scoring.batch_logps fills it): (B,) tensors,
    summed over completion tokens or per-token means as `LossSpec.average_log_prob` says.

    chosen, rejected: the policy's log-probs (rejected None for SFT).
    reference_chosen, reference_rejected: the reference's (None when the loss uses none).
    chosen_tokens, rejected_tokens: counted completion tokens.
    chosen_margin, rejected_margin, chosen_kl, rejected_kl: token-level losses (TDPO): summed
        log pi - log ref, and summed per-position KL(ref || pi).
    public: LD-DPO (ld_alpha): the same four sequence fields over each pair's first
        min(len_chosen, len_rejected) completion tokens, in the same units.
    chosen_wpo, rejected_wpo: WPO (use_weighting): the policy's summed log-weights, detached.
    label: KTO: (B,) bool, True for a desirable example (the batch's 'label').
    prompt, prompt_tokens: ORPO (LossSpec.prompt_nll): the policy's summed log-probs of each
        prompt's tokens after its first, and their count.
    """
    chosen: torch.Tensor
    rejected: Optional[torch.Tensor] = None
    reference_chosen: Optional[torch.Tensor] = None
    reference_rejected: Optional[torch.Tensor] = None
    chosen_tokens: Optional[torch.Tensor] = None
    rejected_tokens: Optional[torch.Tensor] = None
    chosen_margin: Optional[torch.Tensor] = None
    rejected_margin: Optional[torch.Tensor] = None
    chosen_kl: Optional[torch.Tensor] = None
    rejected_kl: Optional[torch.Tensor] = None
    public: Optional["BatchLogps"] = None
    chosen_wpo: Optional[torch.Tensor] = None
    rejected_wpo: Optional[torch.Tensor] = None
    label: Optional[torch.Tensor] = None
    prompt: Optional[torch.Tensor] = None
    prompt_tokens: Optional[torch.Tensor] = None

    def tensors(self) -> Dict[str, torch.Tensor]:
        """{field: tensor} of the fields that are set ('public.<field>' for LD-DPO's)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BatchLogps):
                out.update({f"public.{k}": v for k, v in value.tensors().items()})
            elif value is not None:
                out[f.name] = value
        return out


# the BatchLogps fields fed, in order, to a loss function's four positional parameters
SEQUENCE_INPUTS = ("chosen", "rejected", "reference_chosen", "reference_rejected")
TOKEN_LEVEL_INPUTS = ("chosen_margin", "rejected_margin", "chosen_kl", "rejected_kl")
# parameters the registry passes itself; never config keys
_RUNTIME_PARAMETERS = ("generator", "gather", "rank")
# what TRL's DPOTrainer adds to every loss type: RPO's NLL term, WPO's weights, LD-DPO's log-probs
TRL_OPTIONS = ("rpo_alpha", "use_weighting", "ld_alpha")


def _length_desensitised(logps: BatchLogps, args: dict) -> BatchLogps:
    """logps with each sequence input replaced by LD-DPO's public + ld_alpha * verbose part
    (`ld_logps`) when ld_alpha is set; the trainer supplies `logps.public` beside them."""
    alpha = args.get("ld_alpha")
    if alpha is None:
        return logps
    return replace(logps, **{key: ld_logps(getattr(logps, key), getattr(logps.public, key), alpha)
                             for key in SEQUENCE_INPUTS if getattr(logps, key) is not None})


def _wpo(logps: BatchLogps, args: dict) -> Optional[torch.Tensor]:
    """(B,) WPO pair weights when use_weighting, else None."""
    if not args.get("use_weighting"):
        return None
    return wpo_weights(logps.chosen_wpo, logps.rejected_wpo, logps.chosen_tokens,
                       logps.rejected_tokens)


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor, gather: Callable) -> torch.Tensor:
    """sum(losses * weights) / sum(weights) over the global batch, as this rank's share: its own
    sum times the number of data-parallel ranks, so that averaging over ranks gives the global value."""
    everywhere = gather(weights.detach())
    ranks = everywhere.numel() // max(1, weights.numel())
    return (losses * weights).sum() * ranks / everywhere.sum().clamp(min=1)


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> Metrics:
    """The metrics every paired loss reports, per example, detached."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


# The parameter names under which loss functions (and update_state) take their per-pair inputs
# (SEQUENCE_INPUTS / TOKEN_LEVEL_INPUTS) and the running state: the registry passes them itself.
_INPUT_PARAMETERS = frozenset({
    "pc", "pr", "rc", "rr", "policy_chosen_logps", "policy_rejected_logps",
    "reference_chosen_logps", "reference_rejected_logps", "chosen_logps_margin",
    "rejected_logps_margin", "chosen_position_kl", "rejected_position_kl", "state",
    "policy_logps", "reference_logps", "labels", "kl"})  # the last four: kto_loss's


def _keyword_parameters(fn: Callable) -> Dict[str, inspect.Parameter]:
    """A loss function's parameters besides its per-pair inputs (hyper-parameters, runtime)."""
    return {k: p for k, p in inspect.signature(fn).parameters.items() if k not in _INPUT_PARAMETERS}


def update_beta_dpo_state(state: dict, policy_chosen_logps, policy_rejected_logps,
                          reference_chosen_logps, reference_rejected_logps,
                          gather: Callable, gamma: float = 0.9) -> dict:
    """beta-DPO's running gap statistics after this (gathered, global) batch (`update_gap_stats`).

    Returns:
        {'gap_mean': float, 'gap_std': float}.
    """
    gaps = ((policy_chosen_logps - reference_chosen_logps)
            - (policy_rejected_logps - reference_rejected_logps)).detach()
    gap_mean, gap_std = update_gap_stats(state["gap_mean"], state["gap_std"], gather(gaps), gamma=gamma)
    return {"gap_mean": gap_mean, "gap_std": gap_std}


@dataclass(frozen=True)
class LossSpec:
    """One loss and, as data, what it needs from the trainer, so that the trainer never reads names.

    Attributes:
        name: registry key.
        fn: the pure formula, fn(4 inputs, beta=..., **hyper-parameters) -> (losses, chosen_rewards,
            rejected_rewards[, extras]); extras may hold 'weights' (the loss is then the weighted
            mean) and 0-d values logged as 'record/<key>'.
        paired: False for sft (the trainer feeds only the chosen / sft_target side).
        token_level: inputs are TOKEN_LEVEL_INPUTS (per-token margins and position KL, TDPO).
        reference: 'never', 'unless_free' (reference_free=true drops it) or 'always'.
        averaged: None: summed log-probs; otherwise they are per-token means, this being the default
            of the `average_log_prob` key where that is accepted and fixed where not.
        initial_state: running state as ((key, float), ...); kept in checkpoints.
        update_state: fn(state, 4 inputs, gather, **its keys) -> new state, on the global batch.
        config_only: keys accepted although `fn` does not take them (read by the registry).
        trl: a TRL loss_type: usable as a mixture term and accepts TRL_OPTIONS.
        aliases: other config names of this entry.
        needs_label_smoothing: label_smoothing must be > 0 (EXO).
        plain_in_mixture: as a mixture term TRL ignores label_smoothing (its sigmoid), so it
            must be 0 there.
        sorts_pairs: the loss sorts the pairs of a batch (AOT): WPO weights cannot follow them.
    Class attributes of subclasses: `checks` (key -> (check, allowed) overriding _CHECKS for keys
    of the entry's own meaning) and `prompt_nll` (the trainer also supplies the prompts'
    log-probs, scoring.example_inputs); methods `check`, `unpaired_weights` and `sides` say what
    single-key checks cannot, whether batches are unpaired examples (KTO) and what is scored.
    """
    name: str
    fn: Callable
    paired: bool = True
    token_level: bool = False
    reference: str = "always"
    averaged: Optional[bool] = None
    initial_state: Tuple[Tuple[str, float], ...] = ()
    update_state: Optional[Callable] = None
    config_only: frozenset = frozenset()
    trl: bool = False
    aliases: Tuple[str, ...] = ()
    needs_label_smoothing: bool = False
    plain_in_mixture: bool = False
    sorts_pairs: bool = False

    # key -> (check, allowed) for keys whose meaning is this entry's own (overrides _CHECKS)
    checks = {}
    # ORPO: the trainer also supplies the prompts' log-probs (scoring.example_inputs)
    prompt_nll = False

    @property
    def stateful(self) -> bool:
        return bool(self.initial_state)

    def check(self, args: dict) -> None:
        """Refuse combinations of keys that the single-key checks cannot see (ValueError)."""

    def unpaired_weights(self, args: dict) -> Optional[Tuple[float, float]]:
        """(desirable_weight, undesirable_weight) for a loss on unpaired examples (KTO), else None."""
        return None

    def sides(self, args: dict) -> Tuple[str, ...]:
        """The responses the trainer scores: chosen and rejected, or only the SFT target."""
        return ("chosen", "rejected") if self.paired else ("chosen",)

    @property
    def hyper_parameters(self) -> Dict[str, inspect.Parameter]:
        """The function's parameters that come from the config."""
        state = dict(self.initial_state)
        return {k: p for k, p in _keyword_parameters(self.fn).items()
                if k not in state and k not in _RUNTIME_PARAMETERS}

    @property
    def config_keys(self) -> frozenset:
        """Keys accepted in the loss config besides `name`."""
        keys = set(self.hyper_parameters) | self.config_only | set(self.state_keys)
        if self.trl:
            keys |= set(TRL_OPTIONS)
        return frozenset(keys)

    @property
    def required_keys(self) -> Tuple[str, ...]:
        return tuple(k for k, p in self.hyper_parameters.items() if p.default is inspect.Parameter.empty)

    @property
    def state_keys(self) -> Tuple[str, ...]:
        """The config keys update_state takes (beta-DPO's gamma)."""
        if self.update_state is None:
            return ()
        return tuple(k for k in _keyword_parameters(self.update_state) if k != "gather")

    def needs_reference(self, args: dict) -> bool:
        """Whether the trainer must run a reference model for this config."""
        if self.reference == "unless_free":
            return not bool(args.get("reference_free", False))
        return self.reference == "always"

    def average_log_prob(self, args: dict) -> bool:
        """Whether sequence log-probs are per-token means (IPO, sigmoid_norm) rather than sums."""
        if self.averaged is None:
            return False
        if "average_log_prob" in self.config_keys:
            return bool(args.get("average_log_prob", self.averaged))
        return self.averaged

    def sequence_parts(self, args: dict) -> Tuple[bool, bool]:
        """(LD-DPO's public sums needed, WPO's log-weights needed) for this config."""
        return args.get("ld_alpha") is not None, bool(args.get("use_weighting"))

    def init_state(self) -> dict:
        """Fresh running state (beta-DPO starts its gap mean and std at 0, as its repository)."""
        return dict(self.initial_state)

    def inputs(self, logps: BatchLogps, args: dict) -> Tuple[torch.Tensor, ...]:
        """The four positional inputs; zero references when reference-free and none were computed."""
        if not self.paired:
            return (logps.chosen, None, None, None)
        if self.token_level:
            return tuple(getattr(logps, k) for k in TOKEN_LEVEL_INPUTS)
        pc, pr = logps.chosen, logps.rejected
        rc, rr = logps.reference_chosen, logps.reference_rejected
        if rc is None or rr is None:
            if not args.get("reference_free", False):
                raise ValueError("reference log-probs are missing and reference_free is false")
            # rewards are then beta * policy
            rc, rr = torch.zeros_like(pc).detach(), torch.zeros_like(pr).detach()
        return pc, pr, rc, rr

    def per_pair(self, inputs: tuple, args: dict, state: dict, gather: Callable, train: bool,
                 generator: Optional[torch.Generator], rank: int = 0):
        """Run `fn` with this config's hyper-parameters (and running state, updated when train);
        functions that take them get the generator, gather and this data-parallel rank.

        Returns:
            (losses (B,), chosen_rewards, rejected_rewards, extras dict).
        """
        kwargs = {k: args[k] for k in self.hyper_parameters if k in args}
        extras = {}
        if self.update_state is not None:
            new = self.update_state(dict(self.init_state(), **state), *inputs, gather,
                                    **{k: args[k] for k in self.state_keys if k in args})
            if train:
                state.update(new)
            kwargs.update(new)
            extras.update(new)
        runtime = {"generator": generator, "gather": gather, "rank": rank}
        kwargs.update({k: v for k, v in runtime.items() if k in _keyword_parameters(self.fn)})
        out = self.fn(*inputs, **kwargs)
        return out[0], out[1], out[2], dict(extras, **(out[3] if len(out) > 3 else {}))

    def chosen_sum(self, logps: BatchLogps, args: dict) -> torch.Tensor:
        """(B,) summed chosen log-probs (for the NLL term) from what the trainer supplied."""
        if self.average_log_prob(args):
            # the trainer divided by counts.clamp(min=1); undo exactly that
            return logps.chosen * logps.chosen_tokens.clamp(min=1)
        return logps.chosen

    def compute(self, logps: BatchLogps, args: dict, state: dict, gather: Callable, train: bool,
                generator: Optional[torch.Generator] = None, rank: int = 0) -> Tuple[torch.Tensor, Metrics]:
        """The scalar loss to optimise and detached metrics.

        Args:
            logps: a BatchLogps: the policy's chosen (and for paired losses rejected) log-probs,
                the reference's (absent when reference-free), token-level losses' margins and
                KL, summed over completion tokens or averaged as `average_log_prob(args)`; the
                token counts; with ld_alpha its `public` part; with use_weighting the WPO
                log-weights.
            args: the loss config without 'name'.
            state: running state from `init_state` (updated in place when train).
            gather: concatenates a 1-D tensor across data-parallel ranks (identity on one process).
            train: training step (False at eval).
            generator: random generator for beta-DPO's pair selection.
            rank: this process's data-parallel rank (global sorts and selections).

        Returns:
            (loss, metrics): 0-d loss (the mean of the per-pair losses, or their weighted mean);
            metrics maps names to detached (B,) or 0-d tensors.
        """
        chosen_sum = self.chosen_sum(logps, args) if args.get("rpo_alpha") is not None else None
        logps = _length_desensitised(logps, args)
        inputs = self.inputs(logps, args)
        losses, cr, rjr, extras = self.per_pair(inputs, args, state, gather, train, generator, rank)
        weights, wpo = extras.pop("weights", None), _wpo(logps, args)
        if wpo is not None:  # WPO (TRL): the mean of weight x loss, not a weighted mean
            losses = losses * wpo
        loss = losses.mean() if weights is None else _weighted_mean(losses, weights, gather)
        if not self.paired:
            return loss, {"logps/chosen": logps.chosen.detach()}
        metrics = _reward_metrics(cr, rjr, logps.chosen, logps.rejected)
        if self.token_level:
            # kl margin is chosen - rejected, as the TDPO repo logs it
            ckl, rkl = inputs[2].detach(), inputs[3].detach()
            metrics.update({"kl/chosen": ckl, "kl/rejected": rkl, "kl/margin": ckl - rkl})
        for key, value in extras.items():
            metrics[f"record/{key}"] = torch.as_tensor(value, dtype=losses.dtype, device=losses.device).detach()
        if wpo is not None:
            metrics["wpo/weights"] = wpo
        if chosen_sum is not None:
            # RPO (Pang et al. 2024, arXiv 2404.19733): + alpha * chosen NLL, TRL's sft term
            nll = chosen_nll(chosen_sum, logps.chosen_tokens, gather, wpo)
            loss = loss + args["rpo_alpha"] * nll
            metrics["nll/chosen"] = nll.detach()
        return loss, metrics


# the hyper-parameters TRL shares across the terms of a mixture (DPOConfig fields)
MIXTURE_SHARED_KEYS = ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau")


class MixtureSpec(LossSpec):
    """TRL's loss_type=[...] with loss_weights (e.g. MPO = sigmoid + bco_pair + sft): sum_i w_i L_i.

    Config: losses (TRL loss_type names), weights (null: all 1.0) and the shared keys
    MIXTURE_SHARED_KEYS, each passed to the terms whose function takes it, as TRL does. The
    trainer supplies summed log-probs and 'chosen_tokens' / 'rejected_tokens'; terms that need
    per-token means (ipo, sigmoid_norm) get sum / tokens, TRL's own division; the `sft` term is
    `chosen_nll`. Metrics: the plain reward metrics (beta * (policy - reference)) plus each
    term's unweighted loss as '<term>/loss' (logged as '<term>_train/loss').
    """

    @property
    def hyper_parameters(self) -> Dict[str, inspect.Parameter]:
        """None of its own: its keys (config_only) go to the terms that take them."""
        return {}

    @property
    def required_keys(self) -> Tuple[str, ...]:
        return ("losses", "beta")

    def terms(self, args: dict):
        """[(term spec, weight)] of this config."""
        names = [_ALIASES.get(n, n) for n in args["losses"]]
        weights = args.get("weights") or [1.0] * len(names)
        return [(LOSSES[n], float(w)) for n, w in zip(names, weights)]

    def needs_reference(self, args: dict) -> bool:
        return any(term.needs_reference(args) for term, _ in self.terms(args))

    def average_log_prob(self, args: dict) -> bool:
        return False

    def compute(self, logps: BatchLogps, args: dict, state: dict, gather: Callable, train: bool,
                generator: Optional[torch.Generator] = None, rank: int = 0) -> Tuple[torch.Tensor, Metrics]:
        """As LossSpec.compute; logps must also hold chosen_tokens and rejected_tokens.
        With ld_alpha the paired terms see LD-DPO's log-probs and the sft term the plain sums,
        as in TRL; with use_weighting every term's per-pair losses are WPO-weighted."""
        chosen_sum = logps.chosen
        logps = _length_desensitised(logps, args)
        pc, pr = logps.chosen, logps.rejected
        if self.needs_reference(args):
            rc, rr = logps.reference_chosen, logps.reference_rejected
        else:  # a mixture of sft alone
            rc, rr = torch.zeros_like(pc).detach(), torch.zeros_like(pr).detach()
        counts = (logps.chosen_tokens.clamp(min=1), logps.rejected_tokens.clamp(min=1))
        wpo = _wpo(logps, args)
        loss, metrics = 0.0, {}
        for term, weight in self.terms(args):
            if not term.paired:
                term_loss = chosen_nll(chosen_sum, logps.chosen_tokens, gather, wpo)
            else:
                inputs = (pc, pr, rc, rr)
                if term.averaged:
                    inputs = (pc / counts[0], pr / counts[1], rc / counts[0], rr / counts[1])
                losses = term.per_pair(inputs, args, state, gather, train, generator, rank)[0]
                term_loss = (losses if wpo is None else losses * wpo).mean()
            loss = loss + weight * term_loss
            metrics[f"{term.name}/loss"] = term_loss.detach()
        metrics.update(_reward_metrics(*_rewards(args["beta"], pc, pr, rc, rr), pc, pr))
        if wpo is not None:
            metrics["wpo/weights"] = wpo
        return loss, metrics


def _reference_free_inputs(logps: BatchLogps) -> Tuple[torch.Tensor, ...]:
    return logps.chosen, logps.rejected, None, None


class CPOSpec(LossSpec):
    """TRL's CPOTrainer (CPO, SimPO, AlphaPO): `cpo_loss` on summed log-probs, or per-token means
    for loss_type ipo and simpo (TRL's own choice), plus cpo_alpha times the mean NLL over the
    batch's chosen completion tokens (TRL's cross-entropy on the chosen labels). No reference."""
    checks = {"loss_type": (lambda v: v in CPO_LOSS_TYPES, f'one of {", ".join(CPO_LOSS_TYPES)}'),
              # AlphaPO's alpha may take either sign (0: the log-prob reward)
              "alpha": (is_number, "a finite number"),
              "simpo_gamma": (is_number, "a finite number"),
              "cpo_alpha": (lambda v: is_number(v) and v >= 0, "a number >= 0")}

    def check(self, args: dict) -> None:
        if args.get("loss_type") in ("hinge", "ipo") and args.get("label_smoothing", 0) != 0:
            # TRL warns and ignores it; refuse rather than ignore
            raise ValueError(f'loss.label_smoothing={args["label_smoothing"]!r}: not used by loss_type='
                             f'{args["loss_type"]}; use 0, or loss_type sigmoid or simpo')

    def average_log_prob(self, args: dict) -> bool:
        return args.get("loss_type") in ("ipo", "simpo")

    def inputs(self, logps: BatchLogps, args: dict) -> Tuple[torch.Tensor, ...]:
        return _reference_free_inputs(logps)

    def compute(self, logps: BatchLogps, args: dict, state: dict, gather: Callable, train: bool,
                generator: Optional[torch.Generator] = None, rank: int = 0) -> Tuple[torch.Tensor, Metrics]:
        """As LossSpec.compute; the NLL term is RPO's (`chosen_nll`) with weight cpo_alpha (0: none)."""
        nll = {"rpo_alpha": args["cpo_alpha"] if args.get("cpo_alpha") else None}
        return super().compute(logps, dict(args, **nll), state, gather, train, generator, rank)


class ORPOSpec(LossSpec):
    """TRL's ORPOTrainer: the mean over pairs of `orpo_loss` on per-token averaged log-probs, plus
    the NLL of the chosen sequences over their prompt and completion tokens (TRL: "computed over
    the full prompt and response"), the mean over all those tokens of the batch. The trainer
    supplies `prompt` and `prompt_tokens` (the prompt's log-probs after its first token)
    beside the completion log-probs. No reference, no SFT stage."""
    prompt_nll = True

    def average_log_prob(self, args: dict) -> bool:
        return True

    def compute(self, logps: BatchLogps, args: dict, state: dict, gather: Callable, train: bool,
                generator: Optional[torch.Generator] = None, rank: int = 0) -> Tuple[torch.Tensor, Metrics]:
        """As LossSpec.compute; the loss is ORPO's whole loss, odds-ratio term plus NLL."""
        pc, pr = logps.chosen, logps.rejected
        losses_, cr, rjr = self.fn(pc, pr, beta=args["beta"])
        nll = chosen_nll(self.chosen_sum(logps, args) + logps.prompt, logps.chosen_tokens + logps.prompt_tokens, gather)
        metrics = _reward_metrics(cr, rjr, pc, pr)
        log_odds = orpo_log_odds(pc, pr).detach()
        metrics.update({"nll/chosen": nll.detach(), "orpo/log_odds_chosen": log_odds,
                        "orpo/log_odds_ratio": F.logsigmoid(log_odds)})
        return losses_.mean() + nll.to(losses_.dtype), metrics


class KTOSpec(LossSpec):
    """TRL's KTOTrainer on unpaired examples. The trainer's batches (preference_datasets with
    `unpaired_weights`) hold one example per row in the chosen columns, its KL sequence (the
    row's prompt with another row's completion) in the rejected columns and a bool 'label'; so
    BatchLogps.chosen / reference_chosen are the examples' summed log-probs, rejected /
    reference_rejected the KL sequences' and label the labels. The KL estimate (`kto_kl`) is
    gathered over data-parallel processes; apo_zero_unpaired uses none, and its trainer scores
    only the examples (`sides`)."""
    checks = {"loss_type": (lambda v: v in KTO_LOSS_TYPES, f'one of {", ".join(KTO_LOSS_TYPES)}'),
              "desirable_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
              "undesirable_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0")}

    def unpaired_weights(self, args: dict) -> Optional[Tuple[float, float]]:
        return float(args["desirable_weight"]), float(args["undesirable_weight"])

    def sides(self, args: dict) -> Tuple[str, ...]:
        """The examples, and their KL sequences where the loss type estimates the KL term."""
        return ("chosen", "rejected") if args.get("loss_type", "kto") == "kto" else ("chosen",)

    def compute(self, logps: BatchLogps, args: dict, state: dict, gather: Callable, train: bool,
                generator: Optional[torch.Generator] = None, rank: int = 0) -> Tuple[torch.Tensor, Metrics]:
        """The mean of `kto_loss` over the examples, and TRL's metrics: kl, the rewards and
        log-probs of desirable and undesirable examples (per example), their counts, the margin
        between the two mean rewards over the (gathered) batch."""
        pc, rc, labels = logps.chosen, logps.reference_chosen, logps.label.bool()
        if args.get("loss_type", "kto") == "kto":
            kl = kto_kl(logps.rejected, logps.reference_rejected, gather)
        else:
            kl = torch.zeros((), dtype=pc.dtype, device=pc.device)
        kwargs = {k: args[k] for k in self.hyper_parameters if k in args}
        losses_, rewards = self.fn(pc, rc, labels, kl, **kwargs)
        good, bad = gather(rewards[labels]), gather(rewards[~labels])
        metrics = {"kto/kl": kl, "rewards/chosen": rewards[labels], "rewards/rejected": rewards[~labels],
                   "logps/chosen": pc.detach()[labels], "logps/rejected": pc.detach()[~labels],
                   "count/desirable": labels.sum().to(pc.dtype), "count/undesirable": (~labels).sum().to(pc.dtype)}
        if good.numel() and bad.numel():
            metrics["rewards/margins"] = good.mean() - bad.mean()
        return losses_.mean(), metrics


def _trl(name: str, fn: Callable, **facts) -> LossSpec:
    return LossSpec(name, fn, trl=True, **facts)


LOSSES: Dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("sft", sft_loss, paired=False, reference="never"),
    # the DPO repository's name for sigmoid
    LossSpec("dpo", sigmoid_loss, reference="unless_free"),
    LossSpec("ipo", ipo_loss, reference="unless_free", averaged=True, config_only=frozenset({"average_log_prob"}),
             trl=True),
    LossSpec("tdpo", tdpo_loss, token_level=True),
    LossSpec("beta_dpo", beta_dpo_loss, initial_state=(("gap_mean", 0.0), ("gap_std", 0.0)),
             update_state=update_beta_dpo_state),
    _trl("sigmoid", sigmoid_loss, reference="unless_free", plain_in_mixture=True),
    _trl("hinge", hinge_loss),
    _trl("exo_pair", exo_pair_loss, needs_label_smoothing=True),
    _trl("nca_pair", nca_pair_loss),
    _trl("robust", robust_loss),
    _trl("bco_pair", bco_pair_loss),
    _trl("sppo_hard", sppo_hard_loss),
    _trl("aot", aot_loss, sorts_pairs=True),
    _trl("aot_unpaired", aot_unpaired_loss, aliases=("aot_pair",), sorts_pairs=True),
    _trl("apo_zero", apo_zero_loss),
    _trl("apo_down", apo_down_loss),
    _trl("discopop", discopop_loss),
    _trl("sigmoid_norm", sigmoid_norm_loss, averaged=True),
    MixtureSpec("mix", chosen_nll, config_only=frozenset({"losses", "weights", *MIXTURE_SHARED_KEYS,
                                                         "use_weighting", "ld_alpha"})),
    # SimPO is CPO's loss_type simpo with cpo_alpha 0 (config/loss/simpo.yaml)
    CPOSpec("cpo", cpo_loss, reference="never", aliases=("simpo",), config_only=frozenset({"cpo_alpha"})),
    ORPOSpec("orpo", orpo_loss, reference="never"),
    KTOSpec("kto", kto_loss),
)}
# TRL's ipo is ours with averaged log-probs (its default); as a mixture term it is TRL's
_TRL_TERMS = tuple(n for n, s in LOSSES.items() if s.trl) + ("sft",)
_ALIASES = {alias: name for name, spec in LOSSES.items() for alias in spec.aliases}
# config `name` values
_CONFIG_NAMES = tuple(LOSSES) + tuple(_ALIASES)


def get_loss(loss_args: dict) -> LossSpec:
    """Resolve a loss config to its registry entry.

    Args:
        loss_args: the loss config as a plain dict, including `name`.

    Returns:
        The LossSpec; aliases resolve to their entry.

    Raises:
        ValueError: unknown or missing name.
    """
    name = loss_args.get("name")
    if name not in _CONFIG_NAMES:
        raise ValueError(f'unknown loss name {name!r}; known: {", ".join(_CONFIG_NAMES)}')
    return LOSSES[_ALIASES.get(name, name)]


_CHECKS = {
    "beta": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "label_smoothing": (lambda v: is_number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "mode_weight": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "alpha": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "a": (is_number, "a finite number"),
    "gamma": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "reference_free": (lambda v: isinstance(v, bool), "true or false"),
    "if_tdpo2": (lambda v: isinstance(v, bool), "true or false"),
    "average_log_prob": (lambda v: isinstance(v, bool), "true or false"),
    "f_divergence_type": (lambda v: v in F_DIVERGENCES, f'one of {", ".join(F_DIVERGENCES)}'),
    "f_alpha_divergence_coef": (is_number, "a finite number"),
    "discopop_tau": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "rpo_alpha": (lambda v: v is None or (is_number(v) and v >= 0), "null or a number >= 0"),
    "use_weighting": (lambda v: isinstance(v, bool), "true or false"),
    "ld_alpha": (lambda v: v is None or (is_number(v) and 0 <= v <= 1), "null or a number in [0, 1]"),
    "losses": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and len(set(v)) == len(v)
               and all(n in _TRL_TERMS or _ALIASES.get(n) in _TRL_TERMS for n in v),
               f'a non-empty list of distinct TRL loss types from {", ".join(_TRL_TERMS)}'),
    "weights": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(is_number(w) for w in v)),
                "null (all 1.0) or a list of numbers, one per loss"),
}


def _check_mixture(loss_args: dict, spec: "MixtureSpec") -> None:
    """What TRL refuses in a mixture, and what would make a term differ from TRL's."""
    weights = loss_args.get("weights")
    if weights is not None and len(weights) != len(loss_args["losses"]):
        raise ValueError(f'loss.weights={weights!r}: needs one weight per entry of loss.losses '
                         f'({len(loss_args["losses"])})')
    for term, _ in spec.terms(loss_args):
        if term.needs_label_smoothing and loss_args.get("label_smoothing", 0) == 0:
            raise ValueError(f"loss.label_smoothing=0: {term.name} needs a value > 0 (the EXO paper "
                             "uses 1e-3)")
        if term.plain_in_mixture and loss_args.get("label_smoothing", 0) != 0:
            raise ValueError(f'loss.label_smoothing={loss_args["label_smoothing"]!r}: TRL\'s sigmoid term '
                             'ignores it, ours would be cDPO; use 0 with sigmoid in a mixture')
        if loss_args.get("f_divergence_type", "reverse_kl") != "reverse_kl" and term.paired \
                and "f_divergence_type" not in term.hyper_parameters:
            raise ValueError(f'loss.f_divergence_type={loss_args["f_divergence_type"]!r}: not supported by '
                             f'the {term.name} term; use reverse_kl')


def validate_loss_args(loss_args: dict) -> None:
    """Refuse a loss config that the losses would misread, with a one-line reason.

    Args:
        loss_args: the loss config as a plain dict, including `name`.

    Raises:
        ValueError: naming the key, its value and what is allowed.
    """
    spec = get_loss(loss_args)
    name = loss_args["name"]
    accepted = spec.config_keys | {"name"}
    for key in loss_args:
        if key not in accepted:
            raise ValueError(f'loss.{key}={loss_args[key]!r}: unknown key for loss {name!r}; '
                             f'accepted keys: {", ".join(sorted(accepted))}')
    for key in spec.required_keys:
        if key not in loss_args:
            raise ValueError(f"loss.{key} is missing: required for loss {name!r}")
    for key, (ok, allowed) in dict(_CHECKS, **spec.checks).items():
        if key in loss_args and not ok(loss_args[key]):
            raise ValueError(f"loss.{key}={loss_args[key]!r}: must be {allowed}")
    if spec.needs_label_smoothing and loss_args.get("label_smoothing") == 0:
        raise ValueError(f"loss.label_smoothing=0: {spec.name} needs a value > 0 (the EXO paper uses "
                         "1e-3; TRL 1.16 refuses 0 too)")
    if loss_args.get("reference_free") and loss_args.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        raise ValueError(f'loss.f_divergence_type={loss_args["f_divergence_type"]!r}: needs the reference; '
                         'use reverse_kl with reference_free=true')
    spec.check(loss_args)
    if isinstance(spec, MixtureSpec):
        _check_mixture(loss_args, spec)
    terms = [term for term, _ in spec.terms(loss_args)] if isinstance(spec, MixtureSpec) else [spec]
    sorting = [term.name for term in terms if term.sorts_pairs]
    if loss_args.get("use_weighting") and sorting:
        # TRL refuses it too: sorting moves the pairs away from their weights
        raise ValueError(f"loss.use_weighting=true: WPO weights cannot be applied to {sorting[0]}, "
                         "which sorts the pairs; use use_weighting=false")
