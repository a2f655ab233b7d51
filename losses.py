"""Preference-learning losses (SFT, DPO/cDPO, IPO, TDPO, beta-DPO) and the loss registry.

Everything here is a pure function of its arguments: no config reading, no
distributed calls (the caller passes a `gather` callable where one is needed).

Sources the formulas follow:
  * DPO / cDPO / IPO: eric-mitchell/direct-preference-optimization, trainers.py
    (Rafailov et al. 2023, arXiv 2305.18290; cDPO note https://ericmitchell.ai/cdpo.pdf;
    Azar et al. 2023, arXiv 2310.12036).
  * TDPO: Vance0124/Token-level-Direct-Preference-Optimization, trainers.py
    (Zeng et al. 2024, arXiv 2404.11999).
  * beta-DPO: junkangwu/beta-DPO, trainers.py (Wu et al. 2024, arXiv 2407.08639).

Part B (`completion_logps`, `completion_token_kl`) computes the same per-sequence
quantities from final hidden states and the output-layer weight without ever
materialising the (B, T, V) logits: only positions with a real label are
processed, a chunk of rows at a time, and the backward recomputes each chunk's
logits instead of keeping them.
"""

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------
# Part A: reference-exact functions on full logits / per-sequence log-probs
# ---------------------------------------------------------------------------

def _shifted_labels(labels: torch.LongTensor) -> Tuple[torch.LongTensor, torch.BoolTensor]:
    """Drop the first label (token t is predicted from position t-1) and build the mask.

    Returns:
        (labels with -100 replaced by 0, mask), both (B, T-1).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    # any valid index works for masked positions; their values are zeroed later
    safe = shifted.masked_fill(~mask, 0)
    return safe, mask


def _reduce_tokens(per_token: torch.Tensor, mask: torch.BoolTensor, average_log_prob: bool) -> torch.Tensor:
    """Masked sum (or mean) over the sequence axis; an all-masked row gives 0, not NaN.

    Args:
        per_token: (B, T-1) values.
        mask: (B, T-1) which positions count.
        average_log_prob: divide by the number of counted positions.

    Returns:
        (B,) tensor.
    """
    # where() rather than multiply so that a non-finite masked value cannot leak in
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    if average_log_prob:
        # the reference divides by the raw count (0/0 = NaN for an empty row)
        total = total / mask.sum(-1).clamp(min=1).to(total.dtype)
    return total


def get_batch_logps(logits: torch.Tensor, labels: torch.LongTensor,
                    average_log_prob: bool = False) -> torch.Tensor:
    """Log-probability of the labelled tokens of each sequence (DPO repo `_get_batch_logps`).

    Args:
        logits: (B, T, V) unnormalised scores; position t predicts token t+1.
        labels: (B, T) token ids, -100 where the token does not count (prompt, padding).
        average_log_prob: mean over counted tokens instead of the sum.

    Returns:
        (B,) summed (or averaged) log-probabilities; 0 for a row without counted tokens.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f'logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree')
    targets, mask = _shifted_labels(labels)
    logps = logits[:, :-1, :].log_softmax(-1)
    per_token = torch.gather(logps, 2, targets.unsqueeze(2)).squeeze(2)
    return _reduce_tokens(per_token, mask, average_log_prob)


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


def _position_kl(ref_logps: torch.Tensor, pol_logps: torch.Tensor) -> torch.Tensor:
    """KL(ref || pol) over the last axis from log-probabilities.

    A reference probability that underflows to 0 contributes exactly 0
    (the TDPO repo takes log(softmax) and gets 0 * -inf = NaN there).
    """
    p_ref = ref_logps.exp()
    term = p_ref * (ref_logps - pol_logps)
    return torch.where(p_ref > 0, term, torch.zeros_like(term)).sum(-1)


def tdpo_get_batch_logps(logits: torch.Tensor, reference_logits: torch.Tensor,
                         labels: torch.LongTensor, average_log_prob: bool = False
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence TDPO statistics (TDPO repo `_tdpo_get_batch_logps`).

    Args:
        logits: (B, T, V) policy logits.
        reference_logits: (B, T, V) reference logits (the caller decides whether they carry grad).
        labels: (B, T) token ids with -100 for ignored positions.
        average_log_prob: means over counted positions instead of sums.

    Returns:
        (logps_margin, position_kl, logps), each (B,):
          logps_margin = sum_t [log pi(y_t) - log ref(y_t)],
          position_kl  = sum_t KL(ref(.|prefix_t) || pi(.|prefix_t)),
          logps        = sum_t log pi(y_t);
        summed over counted positions (or averaged; 0 for an empty row).
    """
    if logits.shape[:-1] != labels.shape or reference_logits.shape != logits.shape:
        raise ValueError(f'logits {tuple(logits.shape)}, reference_logits '
                         f'{tuple(reference_logits.shape)} and labels {tuple(labels.shape)} disagree')
    targets, mask = _shifted_labels(labels)
    pol_logps = logits[:, :-1, :].log_softmax(-1)
    # log_softmax, not softmax().log(): keeps underflowing reference probabilities finite
    ref_logps = reference_logits[:, :-1, :].log_softmax(-1)

    idx = targets.unsqueeze(2)
    token_logps = torch.gather(pol_logps, 2, idx).squeeze(2)
    ref_token_logps = torch.gather(ref_logps, 2, idx).squeeze(2)
    kl = _position_kl(ref_logps, pol_logps)

    return (_reduce_tokens(token_logps - ref_token_logps, mask, average_log_prob),
            _reduce_tokens(kl, mask, average_log_prob),
            _reduce_tokens(token_logps, mask, average_log_prob))


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


def beta_dpo_loss(policy_chosen_logps: torch.Tensor,
                  policy_rejected_logps: torch.Tensor,
                  reference_chosen_logps: torch.Tensor,
                  reference_rejected_logps: torch.Tensor,
                  beta: float, a: float, mode_weight: float,
                  gap_mean: float, gap_std: float,
                  reference_free: bool = False,
                  generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """beta-DPO: batch-level dynamic beta with beta-guided data filtering.

    As junkangwu/beta-DPO `preference_loss` with mode_loss == 'beta_DPO'
    (Wu et al. 2024): gaps A = (pi_c - ref_c) - (pi_r - ref_r) (always with the
    reference), Gaussian weights around the running gap mean, keep
    int(B (1 - mode_weight)) pairs sampled without replacement,
    beta_used = max(beta (1 + a (mean A_kept - gap_mean)), 1e-3).
    Differences from the repo, all in cases where it crashes or returns NaN:
    at least one pair is kept, and the weights fall back as described in
    `_sample_kept_pairs` (uniform when gap_std is 0).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs.
        reference_chosen_logps, reference_rejected_logps: (B,) reference log-probs.
        beta: base temperature.
        a: how strongly beta follows the kept pairs' mean gap.
        mode_weight: fraction of pairs filtered out, in [0, 1).
        gap_mean, gap_std: running gap statistics (see `update_gap_stats`).
        reference_free: drop the reference log-ratio from h in the loss (not from the gaps).
        generator: random generator for the pair selection.

    Returns:
        (losses, mask, chosen_rewards, rejected_rewards, beta_used):
          losses (B,) = -logsig(beta_used h) for every pair (no gradient through beta_used),
          mask (B,) 1.0 for kept pairs, 0.0 otherwise (same dtype as losses),
          rewards (B,) = beta * (policy - reference), base beta, detached,
          beta_used 0-d detached tensor.
    """
    batch_size = policy_chosen_logps.shape[0]
    if batch_size == 0:
        raise ValueError('beta_dpo_loss needs at least one pair')
    gap_mean, gap_std = float(gap_mean), float(gap_std)

    gaps = ((policy_chosen_logps - reference_chosen_logps)
            - (policy_rejected_logps - reference_rejected_logps)).detach()
    kept = _sample_kept_pairs(gaps, gap_mean, gap_std, _keep_count(batch_size, mode_weight), generator)
    mask = kept.to(gaps.dtype)

    beta_used = beta * (1 + a * (gaps[kept].mean() - gap_mean))
    beta_used = beta_used.clamp(min=1e-3).detach()

    pi_logratios = policy_chosen_logps - policy_rejected_logps
    if reference_free:
        h = pi_logratios
    else:
        h = pi_logratios - (reference_chosen_logps - reference_rejected_logps)
    losses = -F.logsigmoid(beta_used * h)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, mask, chosen_rewards, rejected_rewards, beta_used


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


def sft_loss(policy_chosen_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the target per example (DPO repo's SFT branch).

    Args:
        policy_chosen_logps: (B,) summed log-prob of each target.

    Returns:
        (B,) losses.
    """
    return -policy_chosen_logps


# ---------------------------------------------------------------------------
# Part B: log-probs and token KL from hidden states, without (B, T, V) logits
# ---------------------------------------------------------------------------

def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise (bf16/fp16 logits are upcast, as the repos do)."""
    dt = torch.float32
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  cdt: torch.dtype) -> torch.Tensor:
    """(R, H) x (V', H) -> (R, V') logits in the input dtype, then upcast (like `.logits.to(float32)`)."""
    return F.linear(rows, weight, bias).to(cdt)


def _accumulate_linear_grads(d: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                             grad_rows: Optional[torch.Tensor], grad_w: Optional[torch.Tensor],
                             grad_b: Optional[torch.Tensor]) -> None:
    """Backprop d (R, V') = dL/dlogits through logits = rows @ weight.T + bias, into the given buffers."""
    d_in = d.to(weight.dtype)
    # addmm_ accumulates inside the GEMM: no (R, H) / (V, H) temporary and no extra pass over it
    if grad_rows is not None:
        if grad_rows.dtype == d_in.dtype:
            grad_rows.addmm_(d_in, weight)
        else:
            grad_rows.add_((d_in @ weight).to(grad_rows.dtype))
    if grad_w is not None:
        if grad_w.dtype == d_in.dtype:
            grad_w.addmm_(d_in.t(), rows)
        else:
            grad_w.add_((d_in.t() @ rows).to(grad_w.dtype))
    if grad_b is not None:
        grad_b.add_(d.sum(0).to(grad_b.dtype))


# On CPU, blocks of at most this many logits (16 MiB in float32) are served from the allocator's
# free lists; larger ones are fresh mmaps whose page faults cost as much as the arithmetic on them.
CPU_BLOCK_ELEMENTS = 1 << 22


def _blocks(n: int, vocab: int, chunk_size: int, device: torch.device):
    """Row ranges the output layer is computed in: chunk_size rows, on CPU also at most
    CPU_BLOCK_ELEMENTS logits."""
    rows = chunk_size
    if device.type == 'cpu':
        rows = max(1, min(rows, CPU_BLOCK_ELEMENTS // vocab))
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _in_place(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """fn(x, -1) written over x (no new (rows, V) allocation) where the kernel accepts it."""
    try:
        return fn(x, -1, out=x)
    except RuntimeError:
        return fn(x, -1)


def _target_logps(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  targets: torch.Tensor, chunk_size: int, keep_rows: int):
    """(per-row log-probs of the targets, {block start: log-softmax} of the blocks within the
    first keep_rows rows), computed block by block."""
    cdt = _compute_dtype(rows, weight, bias)
    n = rows.shape[0]
    logps = torch.empty(n, dtype=cdt, device=rows.device)
    kept = {}
    for s, e in _blocks(n, weight.shape[0], chunk_size, rows.device):
        # one fused pass per row (max, sum, write) instead of logsumexp's separate passes
        log_probs = _in_place(torch.log_softmax, _chunk_logits(rows[s:e], weight, bias, cdt))
        logps[s:e] = log_probs.gather(1, targets[s:e, None]).squeeze(1)
        if e <= keep_rows:
            kept[s] = log_probs
        del log_probs
    return logps, kept


class _TokenLogpFunction(torch.autograd.Function):
    """Per-row log softmax(rows @ W.T + b)[target], in blocks of rows.

    Keeps the log-softmax of the first chunk_size rows (all of them when they fit) for
    backward, which recomputes the logits of the rest only; with everything kept the output
    layer costs three matrix products instead of four.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size):
        logps, ctx.kept = _target_logps(rows, weight, bias, targets, chunk_size, keep_rows=chunk_size)
        ctx.save_for_backward(rows, weight, bias, targets)
        ctx.chunk_size, ctx.cdt = chunk_size, logps.dtype
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps):
        rows, weight, bias, targets = ctx.saved_tensors
        need_rows, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = ctx.cdt
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        kept, ctx.kept = ctx.kept, {}  # consumed in place; a second backward recomputes
        for s, e in _blocks(rows.shape[0], weight.shape[0], ctx.chunk_size, rows.device):
            g = grad_logps[s:e].to(cdt)
            d = kept.pop(s, None)
            if d is not None:
                d = d.exp_()
            else:
                d = _in_place(torch.softmax, _chunk_logits(rows[s:e], weight, bias, cdt))
            # d logp[target] / d logits = onehot(target) - softmax
            d.mul_(-g[:, None])
            d.scatter_add_(1, targets[s:e, None], g[:, None])
            sub_rows = grad_rows[s:e] if grad_rows is not None else None
            _accumulate_linear_grads(d, rows[s:e], weight, sub_rows, grad_w, grad_b)
            del d
        return (grad_rows,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None)


class _TokenKLFunction(torch.autograd.Function):
    """Per-row target log-probs of policy and reference and KL(ref || policy), chunked over rows and vocab.

    Forward, per row chunk: pass 1 streams vocab chunks to get both logsumexps
    (and the target logits); pass 2 streams them again for sum p_ref (logp_ref - logp_pol).
    Only the policy side gets gradients: dKL/dlogits_pol = p_pol - p_ref and
    dlogp/dlogits_pol = onehot - p_pol, so one more streamed pass in backward.
    """

    @staticmethod
    def forward(ctx, rows, ref_rows, weight, ref_weight, bias, ref_bias, targets,
                chunk_size, vocab_chunk_size):
        cdt = _compute_dtype(rows, weight, bias, ref_rows, ref_weight, ref_bias)
        n, vocab = rows.shape[0], weight.shape[0]
        dev = rows.device
        logp = torch.empty(n, dtype=cdt, device=dev)
        ref_logp = torch.empty(n, dtype=cdt, device=dev)
        kl = torch.empty(n, dtype=cdt, device=dev)
        lse = torch.empty(n, dtype=cdt, device=dev)
        ref_lse = torch.empty(n, dtype=cdt, device=dev)
        vchunks = [(v, min(v + vocab_chunk_size, vocab)) for v in range(0, vocab, vocab_chunk_size)]

        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            r, rr, t = rows[s:e], ref_rows[s:e], targets[s:e]
            lse_c = torch.full((e - s,), -math.inf, dtype=cdt, device=dev)
            ref_lse_c = lse_c.clone()
            tgt_c = torch.zeros(e - s, dtype=cdt, device=dev)
            ref_tgt_c = tgt_c.clone()
            cached = None
            for v0, v1 in vchunks:
                z = _chunk_logits(r, weight[v0:v1], None if bias is None else bias[v0:v1], cdt)
                zr = _chunk_logits(rr, ref_weight[v0:v1], None if ref_bias is None else ref_bias[v0:v1], cdt)
                lse_c = torch.logaddexp(lse_c, torch.logsumexp(z, -1))
                ref_lse_c = torch.logaddexp(ref_lse_c, torch.logsumexp(zr, -1))
                inside = (t >= v0) & (t < v1)
                local = (t - v0).clamp(0, v1 - v0 - 1)[:, None]
                tgt_c = torch.where(inside, z.gather(1, local).squeeze(1), tgt_c)
                ref_tgt_c = torch.where(inside, zr.gather(1, local).squeeze(1), ref_tgt_c)
                # a single vocab chunk can be reused by pass 2 instead of recomputed
                cached = (z, zr) if len(vchunks) == 1 else None
                del z, zr
            kl_c = torch.zeros(e - s, dtype=cdt, device=dev)
            for v0, v1 in vchunks:
                if cached is not None:
                    z, zr = cached
                else:
                    z = _chunk_logits(r, weight[v0:v1], None if bias is None else bias[v0:v1], cdt)
                    zr = _chunk_logits(rr, ref_weight[v0:v1], None if ref_bias is None else ref_bias[v0:v1], cdt)
                kl_c += _position_kl(zr - ref_lse_c[:, None], z - lse_c[:, None])
                del z, zr
            cached = None
            lse[s:e], ref_lse[s:e], kl[s:e] = lse_c, ref_lse_c, kl_c
            logp[s:e] = tgt_c - lse_c
            ref_logp[s:e] = ref_tgt_c - ref_lse_c

        ctx.save_for_backward(rows, ref_rows, weight, ref_weight, bias, ref_bias, targets, lse, ref_lse)
        ctx.chunk_size, ctx.vocab_chunk_size = chunk_size, vocab_chunk_size
        ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_ref_logp, grad_kl):
        rows, ref_rows, weight, ref_weight, bias, ref_bias, targets, lse, ref_lse = ctx.saved_tensors
        need_rows, _, need_w, _, need_b = ctx.needs_input_grad[:5]
        cdt = lse.dtype
        n, vocab = rows.shape[0], weight.shape[0]
        cs, vcs = ctx.chunk_size, ctx.vocab_chunk_size
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None

        for s in range(0, n, cs):
            e = min(s + cs, n)
            r, rr, t = rows[s:e], ref_rows[s:e], targets[s:e]
            g_lp = grad_logp[s:e].to(cdt)[:, None]
            g_kl = grad_kl[s:e].to(cdt)[:, None]
            sub_rows = grad_rows[s:e] if grad_rows is not None else None
            for v0 in range(0, vocab, vcs):
                v1 = min(v0 + vcs, vocab)
                z = _chunk_logits(r, weight[v0:v1], None if bias is None else bias[v0:v1], cdt)
                zr = _chunk_logits(rr, ref_weight[v0:v1], None if ref_bias is None else ref_bias[v0:v1], cdt)
                p = torch.exp(z - lse[s:e, None])
                p_ref = torch.exp(zr - ref_lse[s:e, None])
                del z, zr
                # g_lp (onehot - p) + g_kl (p - p_ref)
                d = (g_kl - g_lp) * p - g_kl * p_ref
                del p, p_ref
                # targets outside this vocab chunk add 0 (no data-dependent branch: no device sync)
                inside = ((t >= v0) & (t < v1))[:, None]
                local = (t - v0).clamp(0, v1 - v0 - 1)[:, None]
                d.scatter_add_(1, local, torch.where(inside, g_lp, torch.zeros_like(g_lp)))
                _accumulate_linear_grads(
                    d, r, weight[v0:v1], sub_rows,
                    grad_w[v0:v1] if grad_w is not None else None,
                    grad_b[v0:v1] if grad_b is not None else None)
                del d
        return (grad_rows, None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None,
                None, None, None)


def _completion_rows(hidden: torch.Tensor, labels: torch.LongTensor):
    """Pick the positions that predict a counted label.

    Args:
        hidden: (B, T, H).
        labels: (B, T).

    Returns:
        (seq_index (N,), positions (N,), targets (N,), counts (B,)): position t of
        sequence b predicts labels[b, t+1] != -100.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f'hidden {tuple(hidden.shape)} must be (B, T, H) matching labels {tuple(labels.shape)}')
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    seq, pos = mask.nonzero(as_tuple=True)
    return seq, pos, shifted[seq, pos], mask.sum(-1)


def _per_sequence(per_row: torch.Tensor, seq: torch.Tensor, counts: torch.Tensor,
                  batch_size: int, average_log_prob: bool) -> torch.Tensor:
    """Sum (or mean) per-row values into (B,); rows without counted tokens give 0."""
    out = per_row.new_zeros(batch_size).index_add(0, seq, per_row)
    if average_log_prob:
        out = out / counts.clamp(min=1).to(out.dtype)
    return out


def _check_chunks(chunk_size: int, vocab_chunk_size: int = 1) -> None:
    if int(chunk_size) < 1 or int(vocab_chunk_size) < 1:
        raise ValueError(f'chunk sizes must be >= 1, got chunk_size={chunk_size}, '
                         f'vocab_chunk_size={vocab_chunk_size}')


def completion_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.LongTensor,
                     bias: Optional[torch.Tensor] = None, average_log_prob: bool = False,
                     chunk_size: int = 1024) -> torch.Tensor:
    """`get_batch_logps(hidden @ weight.T + bias, labels)` without materialising the logits.

    Only positions whose shifted label is not -100 are processed, at most
    `chunk_size` rows at a time (smaller blocks on CPU). With gradients, the
    log-softmax of the first `chunk_size` rows is kept for backward, which
    recomputes the rest; so at most (chunk_size, V) values are kept, plus one
    block in flight. Gradients flow to hidden, weight and bias.

    Args:
        hidden: (B, T, H) final hidden states (after the final norm).
        weight: (V, H) output-layer weight.
        labels: (B, T) token ids, -100 where ignored.
        bias: optional (V,) output-layer bias.
        average_log_prob: mean over counted tokens instead of the sum.
        chunk_size: positions per chunk.

    Returns:
        (B,) log-probs in float32 (float64 if any input is float64); 0 for a row with no counted token.
    """
    _check_chunks(chunk_size)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    seq, pos, targets, counts = _completion_rows(hidden, labels)
    rows = hidden[seq, pos]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rows, weight, bias))
    if needs_grad:
        per_row = _TokenLogpFunction.apply(rows, weight, bias, targets, int(chunk_size))
    else:  # reference / evaluation: nothing saved for a backward that never comes
        per_row, _ = _target_logps(rows, weight, bias, targets, int(chunk_size), keep_rows=0)
    return _per_sequence(per_row, seq, counts, hidden.shape[0], average_log_prob)


def completion_token_kl(policy_hidden: torch.Tensor, reference_hidden: torch.Tensor,
                        policy_weight: torch.Tensor, reference_weight: torch.Tensor,
                        labels: torch.LongTensor,
                        policy_bias: Optional[torch.Tensor] = None,
                        reference_bias: Optional[torch.Tensor] = None,
                        average_log_prob: bool = False,
                        chunk_size: int = 1024, vocab_chunk_size: int = 8192
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tdpo_get_batch_logps(policy_logits, reference_logits, labels)` without materialising logits.

    Rows are processed `chunk_size` at a time and the vocabulary `vocab_chunk_size`
    columns at a time, so no block larger than (chunk_size, vocab_chunk_size)
    exists. The reference side is a constant (detached); gradients flow to the
    policy hidden states, weight and bias.

    Args:
        policy_hidden, reference_hidden: (B, T, H) and (B, T, H_ref) final hidden states.
        policy_weight, reference_weight: (V, H) and (V, H_ref) output-layer weights.
        labels: (B, T) token ids, -100 where ignored.
        policy_bias, reference_bias: optional (V,) biases.
        average_log_prob: means over counted positions instead of sums.
        chunk_size: positions per chunk.
        vocab_chunk_size: vocabulary columns per chunk.

    Returns:
        (logps_margin, position_kl, logps), each (B,), as `tdpo_get_batch_logps`.
    """
    _check_chunks(chunk_size, vocab_chunk_size)
    if policy_weight.shape[0] != reference_weight.shape[0]:
        raise ValueError('policy and reference vocabularies differ: '
                         f'{policy_weight.shape[0]} vs {reference_weight.shape[0]}')
    if policy_hidden.dtype != policy_weight.dtype:
        policy_hidden = policy_hidden.to(policy_weight.dtype)
    reference_hidden = reference_hidden.detach().to(reference_weight.dtype)
    seq, pos, targets, counts = _completion_rows(policy_hidden, labels)
    if reference_hidden.shape[:2] != labels.shape:
        raise ValueError(f'reference_hidden {tuple(reference_hidden.shape)} does not match labels')
    rows = policy_hidden[seq, pos]
    ref_rows = reference_hidden[seq, pos]
    logp, ref_logp, kl = _TokenKLFunction.apply(
        rows, ref_rows, policy_weight, reference_weight.detach(), policy_bias,
        None if reference_bias is None else reference_bias.detach(), targets,
        int(chunk_size), int(vocab_chunk_size))
    b = policy_hidden.shape[0]
    return (_per_sequence(logp - ref_logp, seq, counts, b, average_log_prob),
            _per_sequence(kl, seq, counts, b, average_log_prob),
            _per_sequence(logp, seq, counts, b, average_log_prob))


# ---------------------------------------------------------------------------
# Part C: the registry
# ---------------------------------------------------------------------------

Metrics = Dict[str, torch.Tensor]


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> Metrics:
    """The metrics every paired loss reports, per example, detached."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        'rewards/chosen': chosen_rewards,
        'rewards/rejected': rejected_rewards,
        'rewards/accuracies': (chosen_rewards > rejected_rewards).float(),
        'rewards/margins': chosen_rewards - rejected_rewards,
        'logps/chosen': policy_chosen.detach(),
        'logps/rejected': policy_rejected.detach(),
    }


def _reference_pair(logps: dict, args: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs; zeros when reference-free and none were computed (then rewards = beta * policy)."""
    rc, rr = logps.get('reference_chosen'), logps.get('reference_rejected')
    if rc is None or rr is None:
        if not args.get('reference_free', False):
            raise ValueError('reference log-probs are missing and reference_free is false')
        return (torch.zeros_like(logps['policy_chosen']).detach(),
                torch.zeros_like(logps['policy_rejected']).detach())
    return rc, rr


def _compute_sft(logps, args, state, gather, train, generator=None):
    losses = sft_loss(logps['policy_chosen'])
    return losses.mean(), {'logps/chosen': logps['policy_chosen'].detach()}


def _compute_preference(ipo: bool):
    def compute(logps, args, state, gather, train, generator=None):
        rc, rr = _reference_pair(logps, args)
        losses, cr, rjr = preference_loss(
            logps['policy_chosen'], logps['policy_rejected'], rc, rr, beta=args['beta'],
            label_smoothing=0.0 if ipo else args.get('label_smoothing', 0.0),
            ipo=ipo, reference_free=args.get('reference_free', False))
        return losses.mean(), _reward_metrics(cr, rjr, logps['policy_chosen'], logps['policy_rejected'])
    return compute


def _compute_tdpo(logps, args, state, gather, train, generator=None):
    ckl, rkl = logps['chosen_position_kl'], logps['rejected_position_kl']
    losses, cr, rjr = tdpo_loss(
        logps['chosen_margin'], logps['rejected_margin'], ckl, rkl, beta=args['beta'],
        alpha=args.get('alpha', 0.5), if_tdpo2=args.get('if_tdpo2', True))
    metrics = _reward_metrics(cr, rjr, logps['policy_chosen'], logps['policy_rejected'])
    # kl margin is chosen - rejected, as the TDPO repo logs it
    metrics.update({'kl/chosen': ckl.detach(), 'kl/rejected': rkl.detach(),
                    'kl/margin': (ckl - rkl).detach()})
    return losses.mean(), metrics


def _compute_beta_dpo(logps, args, state, gather, train, generator=None):
    pc, pr = logps['policy_chosen'], logps['policy_rejected']
    rc, rr = logps['reference_chosen'], logps['reference_rejected']
    gaps = ((pc - rc) - (pr - rr)).detach()
    # as the beta-DPO repo: the running stats absorb this batch *before* it is filtered.
    # The repo also does this on eval batches, mutating the training state; here eval
    # uses the updated values for this batch only and leaves `state` untouched.
    gap_mean, gap_std = update_gap_stats(state.get('gap_mean', 0.0), state.get('gap_std', 0.0),
                                         gather(gaps), gamma=args.get('gamma', 0.9))
    if train:
        state['gap_mean'], state['gap_std'] = gap_mean, gap_std
    losses, mask, cr, rjr, beta_used = beta_dpo_loss(
        pc, pr, rc, rr, beta=args['beta'], a=args.get('a', 0.6),
        mode_weight=args.get('mode_weight', 0.2), gap_mean=gap_mean, gap_std=gap_std,
        reference_free=args.get('reference_free', False), generator=generator)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    metrics = _reward_metrics(cr, rjr, pc, pr)
    metrics.update({
        'record/gap_mean': torch.tensor(gap_mean, dtype=pc.dtype, device=pc.device),
        'record/gap_std': torch.tensor(gap_std, dtype=pc.dtype, device=pc.device),
        'record/mask_count': mask.sum().detach(),
        'record/beta_used': beta_used.detach(),
    })
    return loss, metrics


@dataclass(frozen=True)
class LossSpec:
    """What the trainer needs to know about a loss, so that it never branches on the name.

    Attributes:
        name: registry key.
        fn: the pure loss function (for docs and cross-checking).
        paired: False only for sft (the trainer feeds just the chosen / sft_target side).
        token_level: True for tdpo (the trainer supplies per-token margins and position KL).
        stateful: True for beta_dpo (running gap stats kept in checkpoints).
        config_keys: keys accepted in the loss config besides `name`.
    """
    name: str
    fn: Callable
    paired: bool
    token_level: bool
    stateful: bool
    config_keys: frozenset = frozenset()
    _reference: str = field(default='always', repr=False)          # 'never' | 'unless_free' | 'always'
    _average_default: Optional[bool] = field(default=None, repr=False)  # None: never average
    _compute: Optional[Callable] = field(default=None, repr=False, compare=False)

    def needs_reference(self, args: dict) -> bool:
        """Whether the trainer must run a reference model for this config."""
        if self._reference == 'never':
            return False
        if self._reference == 'unless_free':
            return not bool(args.get('reference_free', False))
        return True

    def average_log_prob(self, args: dict) -> bool:
        """Whether sequence log-probs are per-token means (IPO, Azar et al. 2023) rather than sums."""
        if self._average_default is None:
            return False
        return bool(args.get('average_log_prob', self._average_default))

    def init_state(self) -> dict:
        """Fresh running state; beta-DPO starts its gap mean and std at 0 as the repo does."""
        return {'gap_mean': 0.0, 'gap_std': 0.0} if self.stateful else {}

    def compute(self, logps: dict, args: dict, state: dict, gather: Callable, train: bool,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Metrics]:
        """The scalar loss to optimise and detached metrics.

        Args:
            logps: sft: 'policy_chosen'; dpo/ipo/beta_dpo: 'policy_chosen', 'policy_rejected',
                'reference_chosen', 'reference_rejected' (references may be absent/None when
                reference-free); tdpo: 'chosen_margin', 'rejected_margin', 'chosen_position_kl',
                'rejected_position_kl', 'policy_chosen', 'policy_rejected'. All (B,).
            args: the loss config without 'name'.
            state: running state from `init_state` (beta_dpo updates it in place when train).
            gather: concatenates a 1-D tensor across data-parallel ranks (identity on one process).
            train: training step (False at eval).
            generator: random generator for beta_dpo's pair selection.

        Returns:
            (loss, metrics): loss is 0-d (beta_dpo: mean over kept pairs; others: batch mean);
            metrics maps names to detached (B,) or 0-d tensors.
        """
        return self._compute(logps, args, state, gather, train, generator)


_DPO_KEYS = frozenset({'beta', 'label_smoothing', 'reference_free', 'mode_loss', 'mode_weight', 'a', 'gamma'})

LOSSES: Dict[str, LossSpec] = {
    'sft': LossSpec('sft', sft_loss, paired=False, token_level=False, stateful=False,
                    config_keys=frozenset(), _reference='never', _compute=_compute_sft),
    'dpo': LossSpec('dpo', preference_loss, paired=True, token_level=False, stateful=False,
                    config_keys=_DPO_KEYS, _reference='unless_free', _compute=_compute_preference(False)),
    'ipo': LossSpec('ipo', preference_loss, paired=True, token_level=False, stateful=False,
                    config_keys=frozenset({'beta', 'reference_free', 'average_log_prob'}),
                    _reference='unless_free', _average_default=True, _compute=_compute_preference(True)),
    'tdpo': LossSpec('tdpo', tdpo_loss, paired=True, token_level=True, stateful=False,
                     config_keys=frozenset({'beta', 'alpha', 'if_tdpo2'}), _compute=_compute_tdpo),
    'beta_dpo': LossSpec('beta_dpo', beta_dpo_loss, paired=True, token_level=False, stateful=True,
                         config_keys=_DPO_KEYS, _compute=_compute_beta_dpo),
}

# config `name` values; beta-DPO is reached through name=dpo, mode_loss=beta_DPO (beta-DPO repo README)
_CONFIG_NAMES = ('sft', 'dpo', 'ipo', 'tdpo')
# 'mean' is the beta-DPO repo's default mode_loss, meaning plain DPO
_PLAIN_DPO_MODES = ('dpo', 'mean')
_MODE_LOSSES = _PLAIN_DPO_MODES + ('beta_DPO',)
# keys that are config-only (no function parameter of that name)
_CONFIG_ONLY_KEYS = frozenset({'name', 'mode_loss', 'average_log_prob'})
_REQUIRED_KEYS = {'sft': (), 'dpo': ('beta',), 'ipo': ('beta',), 'tdpo': ('beta',), 'beta_dpo': ('beta',)}


def get_loss(loss_args: dict) -> LossSpec:
    """Resolve a loss config to its registry entry.

    Args:
        loss_args: the loss config as a plain dict, including `name`.

    Returns:
        The LossSpec; name=dpo with mode_loss=beta_DPO resolves to 'beta_dpo'.

    Raises:
        ValueError: unknown or missing name.
    """
    name = loss_args.get('name')
    if name not in _CONFIG_NAMES:
        raise ValueError(f'unknown loss name {name!r}; known: {", ".join(_CONFIG_NAMES)} '
                         f'(beta-DPO is name=dpo with mode_loss=beta_DPO)')
    if name == 'dpo' and loss_args.get('mode_loss', 'dpo') == 'beta_DPO':
        return LOSSES['beta_dpo']
    return LOSSES[name]


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def validate_loss_args(loss_args: dict) -> None:
    """Refuse a loss config that the losses would misread, with a one-line reason.

    Args:
        loss_args: the loss config as a plain dict, including `name`.

    Raises:
        ValueError: naming the key, its value and what is allowed.
    """
    spec = get_loss(loss_args)
    name = loss_args['name']

    if spec.name == 'ipo' and 'label_smoothing' in loss_args:
        raise ValueError(f'loss.label_smoothing={loss_args["label_smoothing"]!r}: meaningless for ipo '
                         '(conservative smoothing is a DPO variant); remove the key')
    accepted = spec.config_keys | {'name'}
    for key in loss_args:
        if key not in accepted:
            raise ValueError(f'loss.{key}={loss_args[key]!r}: unknown key for loss {name!r}; '
                             f'accepted keys: {", ".join(sorted(accepted))}')
    for key in _REQUIRED_KEYS[spec.name]:
        if key not in loss_args:
            raise ValueError(f'loss.{key} is missing: required for loss {name!r}')

    def bad(key, allowed):
        return ValueError(f'loss.{key}={loss_args[key]!r}: must be {allowed}')

    checks = {
        'beta': (lambda v: _is_number(v) and v > 0, 'a number > 0'),
        'label_smoothing': (lambda v: _is_number(v) and 0 <= v < 0.5, 'a number in [0, 0.5)'),
        'mode_weight': (lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)'),
        'alpha': (lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
        'a': (_is_number, 'a finite number'),
        'gamma': (lambda v: _is_number(v) and 0 < v <= 1, 'a number in (0, 1]'),
        'mode_loss': (lambda v: v in _MODE_LOSSES, f'one of {", ".join(_MODE_LOSSES)}'),
        'reference_free': (lambda v: isinstance(v, bool), 'true or false'),
        'if_tdpo2': (lambda v: isinstance(v, bool), 'true or false'),
        'average_log_prob': (lambda v: isinstance(v, bool), 'true or false'),
    }
    for key, (ok, allowed) in checks.items():
        if key in loss_args and not ok(loss_args[key]):
            raise bad(key, allowed)

    if spec.name == 'beta_dpo' and loss_args.get('label_smoothing', 0) != 0:
        # the beta-DPO repo never applies label smoothing; refuse rather than ignore it
        raise ValueError(f'loss.label_smoothing={loss_args["label_smoothing"]!r}: must be 0 with '
                         'mode_loss=beta_DPO (beta-DPO has no conservative variant)')

