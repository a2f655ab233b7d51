"""Log-probs from a causal LM's hidden states, without ever building (B, T, V) logits.

The output layer is applied only at positions whose label is counted (the completion), a chunk of
rows at a time, and backward recomputes each chunk's logits instead of keeping them. The results
equal `get_batch_logps` / `tdpo_get_batch_logps`, the full-logits formulas at the top of this file
(tests/test_losses.py checks this in float64). The helpers at the end find a model's backbone and
output layer; packing.model_logps runs a model over a Layout and calls these kernels.
"""
import contextlib
import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import vision

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------
# The reference formulas on full (B, T, V) logits (the DPO and TDPO repositories'); the chunked
# kernels below must equal them, and _position_kl is shared so both paths compute KL alike.
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
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    targets, mask = _shifted_labels(labels)
    logps = logits[:, :-1, :].log_softmax(-1)
    per_token = torch.gather(logps, 2, targets.unsqueeze(2)).squeeze(2)
    return _reduce_tokens(per_token, mask, average_log_prob)


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
        raise ValueError(f"logits {tuple(logits.shape)}, reference_logits "
                         f"{tuple(reference_logits.shape)} and labels {tuple(labels.shape)} disagree")
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



def get_batch_parts(logits: torch.Tensor, labels: torch.LongTensor,
                    public_tokens: Optional[torch.Tensor] = None, wpo: bool = False) -> dict:
    """Summed log-probs plus LD-DPO's and WPO's per-sequence parts, on full logits (for models
    whose logits are not a plain linear layer).

    Args:
        logits: (B, T, V); labels: (B, T) with -100 where not counted.
        public_tokens: (B,) LD-DPO's shared completion length per row, or None.
        wpo: also return WPO's per-sequence log-weights (detached).

    Returns:
        {'sum': (B,), 'public': (B,) when public_tokens is given, 'wpo_logweight': (B,) when wpo}.
    """
    targets, mask = _shifted_labels(labels)
    log_probs = logits[:, :-1, :].log_softmax(-1)
    per_token = torch.gather(log_probs, 2, targets.unsqueeze(2)).squeeze(2)
    out = {"sum": _reduce_tokens(per_token, mask, False)}
    if public_tokens is not None:
        # 1-based position among the row's completion tokens (TRL's `comp_pos`)
        position = mask.long().cumsum(-1)
        out["public"] = _reduce_tokens(per_token, mask & (position <= public_tokens[:, None]), False)
    if wpo:
        out["wpo_logweight"] = _reduce_tokens(
            per_token - torch.logsumexp(2 * log_probs, -1), mask, False).detach()
    return out


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise (bf16/fp16 logits are upcast, as the repos do)."""
    dt = torch.float32
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  cdt: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, H) x (V', H) -> (R, V') logits in the input dtype, then upcast (like `.logits.to(float32)`),
    written into `out` (R, V') when given: by the product itself where no cast is involved."""
    if out is None:
        return F.linear(rows, weight, bias).to(cdt)
    if rows.dtype != cdt or weight.dtype != cdt or torch.is_autocast_enabled(rows.device.type):
        return out.copy_(F.linear(rows, weight, bias))
    # what F.linear computes for 2-D rows, into out
    if bias is None:
        return torch.mm(rows, weight.t(), out=out)
    return torch.addmm(bias, rows, weight.t(), out=out)


def _autocast_state(device: torch.device) -> Optional[Tuple[str, torch.dtype]]:
    """(device type, dtype) of the torch.autocast in force for `device`, or None."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return device.type, torch.get_autocast_dtype(device.type)


def _autocast_as(state: Optional[Tuple[str, torch.dtype]]):
    """Re-enter a forward's autocast in backward, which runs outside it, so that recomputed
    logits are the forward's logits (bf16/fp16 products) and the gradient is theirs."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])


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


# On CPU, blocks of at most this many logits (16 MiB in float32): the blocks that are not kept
# for backward (the reference's, recomputed ones) stay small, and small ones are served from the
# allocator's free lists even where glibc is left to its defaults (utils.keep_freed_memory).
CPU_BLOCK_ELEMENTS = 1 << 22


def _blocks(n: int, vocab: int, chunk_size: int, device: torch.device):
    """Row ranges the output layer is computed in: chunk_size rows, on CPU also at most
    CPU_BLOCK_ELEMENTS logits."""
    rows = chunk_size
    if device.type == "cpu":
        rows = max(1, min(rows, CPU_BLOCK_ELEMENTS // vocab))
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _in_place(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """fn(x, -1) written over x (no new (rows, V) allocation) where the kernel accepts it."""
    try:
        return fn(x, -1, out=x)
    except RuntimeError:
        return fn(x, -1)


def _target_logps(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  targets: torch.Tensor, chunk_size: int, keep_rows: int, wpo: bool = False):
    """(per-row log-probs of the targets, (k, V) log-softmax of the first k rows (the whole
    blocks within keep_rows; None when k is 0), per-row WPO log-weights or None), computed block
    by block; the kept blocks are written into one buffer, so that backward can treat them as one.

    WPO's log-weight of a row is log p(target) - logsumexp_v(2 log p(v)): the log of the target's
    probability over the distribution's sum of squares (TRL's `log_sum_sq_probs`)."""
    cdt = _compute_dtype(rows, weight, bias)
    n, vocab = rows.shape[0], weight.shape[0]
    logps = torch.empty(n, dtype=cdt, device=rows.device)
    wpo_rows = torch.empty(n, dtype=cdt, device=rows.device) if wpo else None
    blocks = _blocks(n, vocab, chunk_size, rows.device)
    k = max((e for _, e in blocks if e <= keep_rows), default=0)  # the whole blocks kept
    kept = torch.empty(k, vocab, dtype=cdt, device=rows.device) if k else None
    for s, e in blocks:
        out = kept[s:e] if e <= k else None
        # one fused pass per row (max, sum, write) instead of logsumexp's separate passes
        log_probs = _in_place(torch.log_softmax, _chunk_logits(rows[s:e], weight, bias, cdt, out))
        logps[s:e] = log_probs.gather(1, targets[s:e, None]).squeeze(1)
        if wpo:
            wpo_rows[s:e] = logps[s:e] - torch.logsumexp(2 * log_probs, -1)
        del log_probs
    return logps, kept, wpo_rows


def _logp_grad_(d: torch.Tensor, g: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax d (R, V) -> g * d logp[target] / d logits = g * (onehot(target) - softmax), in place."""
    d.mul_(-g[:, None])
    return d.scatter_add_(1, targets[:, None], g[:, None])


class TokenLogpFunction(torch.autograd.Function):
    """Per-row log softmax(rows @ W.T + b)[target], in blocks of rows, and (when wpo) the rows'
    WPO log-weights as a second output without gradient (WPO's weights are constants).

    Keeps the log-softmax of the first chunk_size rows (all of them when they fit) for
    backward, which recomputes the logits of the rest only; with everything kept the output
    layer costs three matrix products instead of four. The kept rows' gradients are two
    products over all of them at once (on CPU the forward's blocks are small, and a product
    per block would read and write the whole (V, H) weight gradient once per block).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size, wpo=False, keep_rows=None):
        # keep_rows: kept_rows(...), 0 where no backward comes (reference, evaluation)
        keep = chunk_size if keep_rows is None else keep_rows
        logps, ctx.kept, wpo_rows = _target_logps(rows, weight, bias, targets, chunk_size,
                                                  keep_rows=keep, wpo=wpo)
        ctx.save_for_backward(rows, weight, bias, targets)
        ctx.chunk_size, ctx.cdt = chunk_size, logps.dtype
        ctx.autocast = _autocast_state(rows.device)
        wpo_rows = wpo_rows if wpo else logps.new_zeros(0)
        ctx.mark_non_differentiable(wpo_rows)
        return logps, wpo_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps, _grad_wpo):
        rows, weight, bias, targets = ctx.saved_tensors
        need_rows, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = ctx.cdt
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        g = grad_logps.to(cdt)
        kept, ctx.kept = ctx.kept, None  # consumed in place; a second backward recomputes
        k = 0 if kept is None else kept.shape[0]
        # the kept rows in one piece, unless their products need a cast copy (half-precision
        # weights): then block by block, so that the copy stays one block's size
        whole = k > 0 and weight.dtype == cdt
        pieces = [(0, k)] if whole else []
        pieces += [(s, e) for s, e in _blocks(rows.shape[0], weight.shape[0], ctx.chunk_size,
                                              rows.device) if not whole or s >= k]
        for s, e in pieces:
            if e <= k:
                d = kept[s:e].exp_()
            else:
                with _autocast_as(ctx.autocast):
                    logits = _chunk_logits(rows[s:e], weight, bias, cdt)
                d = _in_place(torch.softmax, logits)
                del logits
            _logp_grad_(d, g[s:e], targets[s:e])
            sub_rows = grad_rows[s:e] if grad_rows is not None else None
            _accumulate_linear_grads(d, rows[s:e], weight, sub_rows, grad_w, grad_b)
            del d
        del kept
        return (grad_rows,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None, None, None)


class TokenKLFunction(torch.autograd.Function):
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
        ctx.autocast = _autocast_state(dev)
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
                with _autocast_as(ctx.autocast):
                    z = _chunk_logits(r, weight[v0:v1], None if bias is None else bias[v0:v1], cdt)
                    zr = _chunk_logits(rr, ref_weight[v0:v1],
                                       None if ref_bias is None else ref_bias[v0:v1], cdt)
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
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (B, T, H) matching labels {tuple(labels.shape)}")
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    seq, pos = mask.nonzero(as_tuple=True)
    return seq, pos, shifted[seq, pos], mask.sum(-1)


class Selection(NamedTuple):
    """Which rows of hidden states score which tokens of which sequence, when the sequences are
    not one per row (packing.py lays several sequences, or a shared prompt, into one row).

    index: (N,) positions in hidden.flatten(0, 1) whose output predicts a counted token.
    targets: (N,) the predicted token ids.
    seq: (N,) the sequence each belongs to, in 0..B-1, non-decreasing.
    counts: (B,) counted tokens per sequence.
    """
    index: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    counts: torch.Tensor


def _select_rows(hidden: torch.Tensor, labels):
    """(rows (N, H), seq, targets, counts, B) for `labels` given as (B, T) token labels or as a
    Selection."""
    if isinstance(labels, Selection):
        return (hidden.flatten(0, 1)[labels.index], labels.seq, labels.targets, labels.counts,
                labels.counts.numel())
    seq, pos, targets, counts = _completion_rows(hidden, labels)
    return hidden[seq, pos], seq, targets, counts, hidden.shape[0]


def _per_sequence(per_row: torch.Tensor, seq: torch.Tensor, counts: torch.Tensor,
                  batch_size: int, average_log_prob: bool) -> torch.Tensor:
    """Sum (or mean) per-row values into (B,); rows without counted tokens give 0."""
    out = per_row.new_zeros(batch_size).index_add(0, seq, per_row)
    if average_log_prob:
        out = out / counts.clamp(min=1).to(out.dtype)
    return out


def _check_chunks(chunk_size: int, vocab_chunk_size: int = 1) -> None:
    if int(chunk_size) < 1 or int(vocab_chunk_size) < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_size={chunk_size}, "
                         f"vocab_chunk_size={vocab_chunk_size}")


def kept_rows(chunk_size: int, *tensors: Optional[torch.Tensor]) -> int:
    """TokenLogpFunction's keep_rows: chunk_size when a backward will come (grad enabled and
    an input needs it), else 0 (reference, evaluation: nothing saved for a backward)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return int(chunk_size) if needs_grad else 0


def _row_logps(hidden, weight, labels, bias, chunk_size: int, wpo: bool = False):
    """(per-row target log-probs (N,), per-row WPO log-weights (N,) or None, seq (N,), counts (B,),
    B) of the completion rows (labels: (B, T) or a Selection), through the chunked kernel."""
    _check_chunks(chunk_size)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    rows, seq, targets, counts, b = _select_rows(hidden, labels)
    per_row, wpo_rows = TokenLogpFunction.apply(rows, weight, bias, targets, int(chunk_size), wpo,
                                                kept_rows(chunk_size, rows, weight, bias))
    return per_row, (wpo_rows if wpo else None), seq, counts, b


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
        labels: (B, T) token ids, -100 where ignored; or a Selection (packing.py).
        bias: optional (V,) output-layer bias.
        average_log_prob: mean over counted tokens instead of the sum.
        chunk_size: positions per chunk.

    Returns:
        (B,) log-probs in float32 (float64 if any input is float64); 0 for a row with no counted token.
    """
    per_row, _, seq, counts, b = _row_logps(hidden, weight, labels, bias, chunk_size)
    return _per_sequence(per_row, seq, counts, b, average_log_prob)


def _rank_in_sequence(seq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(N,) 0-based index of each completion row among its sequence's rows (rows are ordered by
    sequence, then position, as `_completion_rows` returns them)."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(seq.numel(), device=seq.device) - starts[seq]


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
        labels: (B, T) token ids, -100 where ignored; or a Selection (packing.py).
        policy_bias, reference_bias: optional (V,) biases.
        average_log_prob: means over counted positions instead of sums.
        chunk_size: positions per chunk.
        vocab_chunk_size: vocabulary columns per chunk.

    Returns:
        (logps_margin, position_kl, logps), each (B,), as `tdpo_get_batch_logps`.
    """
    _check_chunks(chunk_size, vocab_chunk_size)
    if policy_weight.shape[0] != reference_weight.shape[0]:
        raise ValueError("policy and reference vocabularies differ: "
                         f"{policy_weight.shape[0]} vs {reference_weight.shape[0]}")
    if policy_hidden.dtype != policy_weight.dtype:
        policy_hidden = policy_hidden.to(policy_weight.dtype)
    reference_hidden = reference_hidden.detach().to(reference_weight.dtype)
    if reference_hidden.shape[:2] != policy_hidden.shape[:2]:
        raise ValueError(f"reference_hidden {tuple(reference_hidden.shape)} does not match the "
                         f"policy's {tuple(policy_hidden.shape)}")
    rows, seq, targets, counts, b = _select_rows(policy_hidden, labels)
    ref_rows = _select_rows(reference_hidden, labels)[0]
    logp, ref_logp, kl = TokenKLFunction.apply(
        rows, ref_rows, policy_weight, reference_weight.detach(), policy_bias,
        None if reference_bias is None else reference_bias.detach(), targets,
        int(chunk_size), int(vocab_chunk_size))
    return (_per_sequence(logp - ref_logp, seq, counts, b, average_log_prob),
            _per_sequence(kl, seq, counts, b, average_log_prob),
            _per_sequence(logp, seq, counts, b, average_log_prob))


# ---------------------------------------------------------------------------
# From a model: its backbone, its output layer, and the kernels above
# ---------------------------------------------------------------------------

def output_layer(model):
    """(weight (V, H), bias (V,) or None) of a causal LM's output projection."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, input_ids, attention_mask, position_ids=None, **image_inputs) -> torch.Tensor:
    """Final hidden states (B, T, H) after the last norm, without applying the output layer, times
    the model's logit_scale when it has one, so that hidden @ weight.T are the model's logits.
    `attention_mask` is (B, T), or a 4D mask with `position_ids` (B, T) (packing.py's layouts);
    `image_inputs` a vision-language model's pixel_values etc. (vision.py)."""
    backbone = getattr(model, model.base_model_prefix)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra, **image_inputs,
                      **vision.token_inputs(model, input_ids, image_inputs)).last_hidden_state
    scale = logit_scale(model)
    # (s h) W^T = s (h W^T) without a bias; with one, has_logit_transform sends the model to the
    # full-logits path instead
    return hidden if scale == 1.0 else hidden * scale


# Set (to True) on a model whose chunked log-probs differ from its own forward's (the trainer's
# start-up check, chunked_logps_error): its log-probs then come from its full logits.
FULL_LOGITS_ATTR = "score_from_full_logits"


def logit_scale(model) -> float:
    """The factor a model multiplies its output layer's logits by: Cohere's `logit_scale`,
    Granite's 1 / `logits_scaling` (transformers' CohereForCausalLM, GraniteForCausalLM); 1.0 for
    a plain linear head."""
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None) or 1.0
    divisor = getattr(cfg, "logits_scaling", None) or 1.0
    return float(scale) / float(divisor)


def has_logit_transform(model) -> bool:
    """Whether the model's log-probs must come from its own full logits, because the chunked
    kernels cannot apply what its output layer does: soft-capping (Gemma-2/3's
    `final_logit_softcapping`: cap * tanh(logits / cap)), a logit scale on a head with a bias, or
    a head the start-up check found to differ (FULL_LOGITS_ATTR). A logit scale alone is applied
    in the chunked path (hidden_states)."""
    if getattr(model, FULL_LOGITS_ATTR, False):
        return True
    if getattr(model.config, "final_logit_softcapping", None):
        return True
    return logit_scale(model) != 1.0 and output_layer(model)[1] is not None


def full_logits(model, input_ids, attention_mask, position_ids=None, **image_inputs) -> torch.Tensor:
    """(B, T, V) float32 logits from the model's own forward (every transform of its head)."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    return model(input_ids=input_ids, attention_mask=attention_mask, **extra, **image_inputs,
                 **vision.token_inputs(model, input_ids, image_inputs)).logits.float()


class SideLogps(NamedTuple):
    """One side's (B,) values from one pass: log-probs (sums, or per-token means), LD-DPO's
    public part in the same units (or None), WPO's summed log-weights, detached (or None)."""
    logps: torch.Tensor
    public: Optional[torch.Tensor] = None
    wpo_logweight: Optional[torch.Tensor] = None


def side_logps(per_row: torch.Tensor, selection: Selection, average_log_prob: bool,
               public_tokens: Optional[torch.Tensor] = None,
               wpo_rows: Optional[torch.Tensor] = None) -> SideLogps:
    """Per-row values of a Selection summed per sequence; with average_log_prob the sums (and the
    public part) divided by the sequence's counted tokens; public_tokens: (B,) LD-DPO's shared
    length (min of the pair's completion lengths, Liu et al. 2024, arXiv 2409.06411)."""
    seq, counts, b = selection.seq, selection.counts, selection.counts.numel()
    total = _per_sequence(per_row, seq, counts, b, average_log_prob)
    public = None
    if public_tokens is not None:
        first = _rank_in_sequence(seq, counts) < public_tokens.to(seq.device)[seq]
        public = _per_sequence(torch.where(first, per_row, torch.zeros_like(per_row)), seq, counts,
                               b, average_log_prob)
    wpo = None if wpo_rows is None else _per_sequence(wpo_rows, seq, counts, b, False).detach()
    return SideLogps(total, public, wpo)


def selected_rows(logits: torch.Tensor, selection: Selection, wpo: bool = False):
    """(per-row target log-probs (N,), WPO log-weights (N,) or None) of a Selection of rows of
    full (R, L, V) logits, as the chunked kernel gives them."""
    log_probs = logits.flatten(0, 1)[selection.index].log_softmax(-1)
    per_row = log_probs.gather(1, selection.targets[:, None]).squeeze(1)
    return per_row, (per_row - torch.logsumexp(2 * log_probs, -1)) if wpo else None


def selected_token_kl(logits: torch.Tensor, reference_logits: torch.Tensor,
                      selection: Selection) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tdpo_get_batch_logps`'s per-row (policy log-prob, reference log-prob, KL(ref || policy))
    of a Selection of rows of full (R, L, V) logits."""
    pol = logits.flatten(0, 1)[selection.index].log_softmax(-1)
    ref = reference_logits.flatten(0, 1)[selection.index].log_softmax(-1)
    idx = selection.targets[:, None]
    return pol.gather(1, idx).squeeze(1), ref.gather(1, idx).squeeze(1), _position_kl(ref, pol)


def chunked_logps_error(model, chunked: Callable, input_ids, attention_mask, labels,
                        **image_inputs) -> float:
    """Largest difference between `chunked()`, a model's per-token mean log-probs (B,) from the
    chunked output layer, and the same from the model's own forward; no gradient."""
    with torch.no_grad():
        own = get_batch_logps(full_logits(model, input_ids, attention_mask, **image_inputs), labels, True)
        return (chunked().float().to(own.device) - own).abs().max().item()
