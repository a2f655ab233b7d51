"""Sequences laid out for one forward pass: each prompt once per pair, several pairs per row.

The DPO repository (and TRL) run every prompt twice, once before the chosen and once before the
rejected response, and pad every sequence of a batch to the longest. Here a pair is one segment
`prompt + chosen + rejected`: the rejected tokens attend to the prompt and to themselves but not to
the chosen tokens, and their position ids restart where the prompt ends, so each response sees
exactly the context it has on its own (share_prompt). Segments are then packed into as few rows as
a per-row token budget allows, attention block-diagonal between segments (packing). The
log-probs are those of the usual layout (tests/test_packing.py checks it per model family); only
the work on repeated prompts and on padding is gone.

    lay_out(batch, sides, ...) -> [Layout]      where every token goes: one packed Layout, or the
                                                usual layout (plain_layout: one per side, each
                                                sequence in its own right-padded row, 2D mask)
    Layout.forward_kwargs(model)                input_ids (position_ids, a 4D mask) for a forward
    model_logps / token_kl                      a model's per-sequence log-probs on a layout

A Layout gives each scored side a logps.Selection (which hidden rows predict which tokens), which
the chunked output-layer kernels in logps.py take in place of (B, T) labels.
"""
import dataclasses
import inspect
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import logps
import moe
import vision

# Branch numbers of a segment's tokens: the prompt (trunk) and the responses.
TRUNK = 0
BRANCH = {"chosen": 1, "rejected": 2}
# Attention implementations that take our mask: a 4D boolean / additive mask, or a BlockMask.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")


@dataclasses.dataclass
class Segment:
    """One packed unit: `trunk` token ids, then each (side, response ids) branch after it. A
    pair with a shared prompt has two branches; a sequence on its own is all trunk."""
    pair: int
    trunk: List[int]
    branches: List[Tuple[str, List[int]]]
    labels: Dict[str, List[int]]  # side -> the side's (B, T) labels row, trimmed
    row: int = 0
    start: int = 0
    length: int = dataclasses.field(init=False)  # tokens: the trunk and every branch

    def __post_init__(self):
        self.length = len(self.trunk) + sum(len(ids) for _, ids in self.branches)

    def skipped(self, side: str) -> int:
        """Tokens between the trunk and `side`'s branch (the branches laid out before it)."""
        skip = 0
        for name, ids in self.branches:
            if name == side:
                break
            skip += len(ids)
        return skip


@dataclasses.dataclass
class Layout:
    """Where every token of a micro-batch goes.

    input_ids, position_ids: (R, L) the packed rows.
    segment: (R, L) segment number of each token (-1 for padding); branch: (R, L) its branch.
    selections: side -> logps.Selection of that side's scored tokens, pairs in batch order.
    n_pairs: B; tokens: real tokens laid out.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    selections: Dict[str, logps.Selection]
    n_pairs: int
    tokens: int
    # attention masks made so far, by dtype ("flex": the BlockMask)
    masks: dict = dataclasses.field(default_factory=dict)
    # the usual layout (plain_layout): the batch's own (B, T) mask, no position ids
    plain_mask: Optional[torch.Tensor] = None
    # a vision-language model's image inputs for these rows (vision.batch_inputs), else {}
    image_inputs: dict = dataclasses.field(default_factory=dict)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.input_ids.numel()

    def allowed(self) -> torch.Tensor:
        """(R, L, L) bool, [r, q, k]: query q may attend to key k. Same segment, causal, and k in
        the trunk or in q's own branch; a padding token sees itself only (no empty row: NaN).
        Built in place: a few (R, L, L) booleans at most, even for long rows."""
        seg, br = self.segment, self.branch
        length = seg.shape[1]
        out = seg[:, :, None] == seg[:, None, :]
        out &= (seg >= 0)[:, :, None]
        out &= torch.ones(length, length, dtype=torch.bool, device=seg.device).tril_()
        out &= (br[:, None, :] == TRUNK) | (br[:, None, :] == br[:, :, None])
        out |= torch.eye(length, dtype=torch.bool, device=seg.device)
        return out

    def attention_mask(self, model):
        """The 4D mask `model`'s attention implementation takes: additive (0 or the dtype's
        lowest value) for SDPA and eager attention, a BlockMask for FlexAttention (masked blocks
        are skipped, not computed). Made once per dtype and shared by every layer and model: a
        boolean mask would be converted to an additive one by every SDPA call, and each copy
        kept for backward (4 bytes per query-key pair per layer)."""
        kind = model.config._attn_implementation
        dtype = next(model.parameters()).dtype
        key = "flex" if kind == "flex_attention" else dtype
        if key not in self.masks:
            if kind == "flex_attention":
                self.masks[key] = self.block_mask()
            else:
                blocked = self.allowed().logical_not_()[:, None]
                self.masks[key] = torch.zeros(blocked.shape, dtype=dtype,
                                              device=blocked.device).masked_fill_(
                    blocked, torch.finfo(dtype).min)
        return self.masks[key]

    def block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask
        seg, br = self.segment, self.branch

        def mask_mod(b, h, q, k):
            same = (seg[b, q] == seg[b, k]) & (seg[b, q] >= 0) & (k <= q)
            return (same & ((br[b, k] == TRUNK) | (br[b, k] == br[b, q]))) | (q == k)

        rows, length = seg.shape
        return create_block_mask(mask_mod, rows, None, length, length, device=seg.device)

    def forward_kwargs(self, model) -> dict:
        """The backbone's inputs: the rows, their position ids and attention_mask(model); the
        rows and their (B, T) mask for the usual layout."""
        if self.plain_mask is not None:
            return {"input_ids": self.input_ids, "attention_mask": self.plain_mask, **self.image_inputs}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask(model),
                "position_ids": self.position_ids, **self.image_inputs}


# ----------------------------------------------------------------------------- building

def _trimmed_rows(batch: Dict, side: str) -> List[Tuple[List[int], List[int]]]:
    """(token ids, labels) of each of `side`'s sequences, padding cut off (one copy of the batch
    to the host, not one per row)."""
    lengths = batch[f"{side}_attention_mask"].sum(-1).tolist()
    ids, labels = batch[f"{side}_input_ids"].tolist(), batch[f"{side}_labels"].tolist()
    return [(row_ids[:n], row_labels[:n]) for row_ids, row_labels, n in zip(ids, labels, lengths)]


def _pair_segments(b: int, seqs: Dict[str, Tuple[List[int], List[int]]], prompt_length: Optional[int]
                   ) -> List[Segment]:
    """The segments of pair b from its trimmed sequences (side -> (ids, labels)): one with the
    prompt shared when `prompt_length` is given (share_prompt) and the prompt is a common prefix
    of both sequences, else one per side."""
    labels = {side: seq[1] for side, seq in seqs.items()}
    if prompt_length is not None and len(seqs) == 2:
        p, (c_ids, _), (r_ids, _) = prompt_length, seqs["chosen"], seqs["rejected"]
        if 0 < p <= min(len(c_ids), len(r_ids)) and c_ids[:p] == r_ids[:p]:
            return [Segment(b, c_ids[:p], [("chosen", c_ids[p:]), ("rejected", r_ids[p:])],
                            labels)]
    return [Segment(b, seq[0], [], {side: labels[side]}) for side, seq in seqs.items()]


def _assign_rows(segments: List[Segment], pack: bool, row_tokens: Optional[int]) -> int:
    """Set each segment's row and start: one per row, or first-fit decreasing into rows of
    `row_tokens` (None: the longest segment, so no row is longer than the longest sequence); a
    budget below the longest segment is raised to it (rows are that wide anyway). Returns the
    number of rows."""
    if not pack:
        for i, s in enumerate(segments):
            s.row, s.start = i, 0
        return len(segments)
    budget = max(row_tokens or 0, max(s.length for s in segments))
    fill: List[int] = []
    for s in sorted(segments, key=lambda s: -s.length):  # stable: ties keep batch order
        row = next((r for r, used in enumerate(fill) if used + s.length <= budget), len(fill))
        if row == len(fill):
            fill.append(0)
        s.row, s.start = row, fill[row]
        fill[row] += s.length
    return len(fill)


def _repeated(values, sizes: np.ndarray) -> np.ndarray:
    """values[i] repeated sizes[i] times: a per-part value for each token of the part."""
    return np.repeat(np.asarray(values, dtype=np.int64), sizes)


def _within(sizes: np.ndarray) -> np.ndarray:
    """Each token's number within its part, for consecutive parts of `sizes` tokens."""
    return np.arange(int(sizes.sum())) - _repeated(np.cumsum(sizes) - sizes, sizes)


def _fill_rows(segments: List[Segment], n_rows: int, length: int):
    """(input_ids, position_ids, segment, branch) as (R, L) int64 numpy arrays; padding is token 0
    (valid in any vocabulary, and masked out). Filled at once from the segments' tokens in
    order (trunk, then each branch): one numpy operation per array, not per segment."""
    ids, pos = np.zeros((n_rows, length), dtype=np.int64), np.zeros((n_rows, length), dtype=np.int64)
    seg, br = np.full((n_rows, length), -1, dtype=np.int64), np.zeros((n_rows, length), dtype=np.int64)
    parts = []  # (token ids, branch number, position of the first) of each trunk and branch
    for s in segments:
        parts.append((s.trunk, TRUNK, 0))
        parts.extend((branch, BRANCH[side], len(s.trunk)) for side, branch in s.branches)
    sizes = np.array([len(tokens) for tokens, _, _ in parts], dtype=np.int64)
    lengths = np.array([s.length for s in segments], dtype=np.int64)
    # each token's place in the rows: its segment's first column, then one after another
    at = _repeated([s.row * length + s.start for s in segments], lengths) + _within(lengths)
    ids.reshape(-1)[at] = np.fromiter(itertools.chain.from_iterable(tokens for tokens, _, _ in parts),
                                     dtype=np.int64, count=len(at))
    pos.reshape(-1)[at] = _within(sizes) + _repeated([first for _, _, first in parts], sizes)
    seg.reshape(-1)[at] = _repeated(range(len(segments)), lengths)
    br.reshape(-1)[at] = _repeated([number for _, number, _ in parts], sizes)
    return ids, pos, seg, br


def _selection(segments: List[Segment], side: str, n_pairs: int, length: int,
               device) -> logps.Selection:
    """`side`'s scored tokens: the token at sequence position t+1 with a label is predicted by the
    hidden state at the row column holding position t. Computed for every sequence at once, in
    pair order: position t of a sequence lies at its segment's start + t in the trunk and
    further by the branches laid out before `side`'s after it."""
    held = sorted((s for s in segments if side in s.labels), key=lambda s: s.pair)
    sizes = np.array([len(s.labels[side]) for s in held], dtype=np.int64)
    t = _within(sizes)  # position within the sequence
    labels = np.fromiter(itertools.chain.from_iterable(s.labels[side] for s in held), dtype=np.int64,
                         count=len(t))
    following = np.append(labels[1:], logps.IGNORE_INDEX)[:len(t)]  # the label position t predicts
    scored = (t < _repeated(sizes, sizes) - 1) & (following != logps.IGNORE_INDEX)
    after_trunk = np.where(t >= _repeated([len(s.trunk) for s in held], sizes),
                           _repeated([s.skipped(side) for s in held], sizes), 0)
    index = _repeated([s.row * length + s.start for s in held], sizes) + t + after_trunk
    pairs = _repeated([s.pair for s in held], sizes)[scored]
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)  # noqa: E731
    return logps.Selection(as_tensor(index[scored]), as_tensor(following[scored]), as_tensor(pairs),
                           as_tensor(np.bincount(pairs, minlength=n_pairs)))


def build_layout(batch: Dict, sides: Sequence[str], share_prompt: bool, pack: bool,
                 row_tokens: Optional[int]) -> Layout:
    """Lay a collated micro-batch out as packed rows.

    Args:
        batch: right-padded {side}_input_ids / _attention_mask / _labels (B, T_side) and
            prompt_attention_mask (B, T_prompt), on the device the layout is built for.
        sides: ('chosen', 'rejected'), or ('chosen',) for SFT.
        share_prompt: one segment per pair with the prompt once (pairs whose sequences do not
            start with the same prompt tokens are laid out as two segments).
        pack: several segments per row (else one per row).
        row_tokens: per-row token budget when packing; None: the micro-batch's longest segment.
    """
    device = batch[f"{sides[0]}_input_ids"].device
    n_pairs = len(batch[f"{sides[0]}_input_ids"])
    rows = {side: _trimmed_rows(batch, side) for side in sides}
    share = share_prompt and "prompt_attention_mask" in batch
    prompts = batch["prompt_attention_mask"].sum(-1).tolist() if share else [None] * n_pairs
    segments = [s for b in range(n_pairs)
                for s in _pair_segments(b, {side: rows[side][b] for side in sides}, prompts[b])]
    n_rows = _assign_rows(segments, pack, row_tokens)
    length = max(s.start + s.length for s in segments)
    arrays = [torch.from_numpy(a).to(device) for a in _fill_rows(segments, n_rows, length)]
    # every segment holds its pair's prompt, so its images, in the rows' order
    in_rows = [s.pair for s in sorted(segments, key=lambda s: (s.row, s.start))]
    return Layout(*arrays, {side: _selection(segments, side, n_pairs, length, device)
                            for side in sides},
                  n_pairs, sum(s.length for s in segments),
                  image_inputs=vision.batch_inputs(batch, in_rows, device))


def shared_tokens(batch: Dict) -> torch.Tensor:
    """(B,) LD-DPO's public length of each pair: min(chosen, rejected) completion tokens."""
    counts = [(batch[f"{side}_labels"][:, 1:] != logps.IGNORE_INDEX).sum(-1)
              for side in ("chosen", "rejected")]
    return torch.minimum(*counts)


def padding_fraction(batch: Dict, sides: Sequence[str]) -> float:
    """The fraction of padding tokens when each side is run as its own right-padded batch."""
    masks = [batch[f"{side}_attention_mask"] for side in sides]
    return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def plain_layout(batch: Dict, side: str) -> Layout:
    """The usual layout of one side (the DPO repository's): each sequence in its own row, right
    padded, with the batch's own (B, T) attention mask."""
    ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
    labels = batch[f"{side}_labels"].to(ids.device)
    seq, pos = (labels[:, 1:] != logps.IGNORE_INDEX).nonzero(as_tuple=True)
    # position t of row b predicts labels[b, t + 1]: the order _completion_rows gives
    selection = logps.Selection(seq * ids.shape[1] + pos, labels[:, 1:][seq, pos], seq,
                                (labels[:, 1:] != logps.IGNORE_INDEX).sum(-1))
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)
    return Layout(ids, None, torch.where(mask.bool(), rows, -1), torch.zeros_like(ids),
                  {side: selection}, len(ids), int(mask.sum()), plain_mask=mask,
                  image_inputs=vision.batch_inputs(batch, device=ids.device))


def lay_out(batch: Dict, sides: Sequence[str], share_prompt: bool, pack: bool,
            row_tokens: Optional[int]) -> List[Layout]:
    """The forwards that score a micro-batch: one build_layout with share_prompt or pack, else
    one plain_layout per side."""
    if share_prompt or pack:
        return [build_layout(batch, sides, share_prompt, pack, row_tokens)]
    return [plain_layout(batch, side) for side in sides]


# ----------------------------------------------------------------------------- scoring

def model_states(model, layout: Layout, full: bool = False) -> torch.Tensor:
    """(R, L, H) final hidden states of `model` on the layout's rows, or (full) its (R, L, V)
    float32 logits; an MoE router's loss counts the real tokens (moe.token_mask), each once."""
    fn = logps.full_logits if full else logps.hidden_states
    with moe.token_mask((layout.segment >= 0).long()):
        return fn(model, **layout.forward_kwargs(model))


def model_logps(model, layout: Layout, average: bool, chunk_size: int,
                public_tokens: Optional[torch.Tensor] = None, wpo: bool = False,
                states: Optional[torch.Tensor] = None) -> Dict[str, logps.SideLogps]:
    """{side: logps.SideLogps} from one forward of `model` over the layout (or its `states`,
    model_states): (B,) log-probs of the label tokens, LD-DPO's public part (public_tokens) and
    WPO's log-weights (wpo). The output layer runs chunked (logps.TokenLogpFunction), or on the
    model's full logits when its head transforms them (logps.has_logit_transform)."""
    full = logps.has_logit_transform(model)
    if states is None:
        states = model_states(model, layout, full)
    weight, bias = logps.output_layer(model)
    states = states if full else states.to(weight.device, weight.dtype)
    out = {}
    for side, sel in layout.selections.items():
        if full:
            per_row, wpo_rows = logps.selected_rows(states, sel, wpo)
        else:
            rows = states.flatten(0, 1)[sel.index]
            per_row, wpo_rows = logps.TokenLogpFunction.apply(
                rows, weight, bias, sel.targets, int(chunk_size), wpo,
                logps.kept_rows(chunk_size, rows, weight, bias))
        out[side] = logps.side_logps(per_row, sel, average, public_tokens,
                                     wpo_rows if wpo else None)
    return out


def token_kl(policy, reference, layout: Layout, average: bool, chunk_size: int,
             vocab_chunk_size: int = 8192) -> Dict[str, Tuple[torch.Tensor, ...]]:
    """{side: (logps_margin, position_kl, logps)}, each (B,), for TDPO (logps.tdpo_get_batch_logps)
    from one forward of the policy and one of the reference over the layout, streamed over the
    vocabulary (logps.TokenKLFunction); from full logits when a head transforms them."""
    ref_model = reference.model
    full = logps.has_logit_transform(policy) or (ref_model is not None
                                                 and logps.has_logit_transform(ref_model))
    states = model_states(policy, layout, full)
    with torch.no_grad():
        ref_states = reference.layout_states(layout, full)
    weight, bias = logps.output_layer(policy)
    ref_weight, ref_bias = (w if w is None else w.detach().to(weight.device)
                            for w in reference.output_layer())
    states, ref_states = states.to(weight.device), ref_states.to(weight.device)
    if not full:
        states, ref_states = states.to(weight.dtype), ref_states.to(states.dtype).to(weight.dtype)
        ref_weight = ref_weight.to(weight.dtype)
    out = {}
    for side, sel in layout.selections.items():
        if full:
            logp, ref_logp, kl = logps.selected_token_kl(states, ref_states.to(states), sel)
        else:
            logp, ref_logp, kl = logps.TokenKLFunction.apply(
                states.flatten(0, 1)[sel.index], ref_states.flatten(0, 1)[sel.index], weight,
                ref_weight, bias, ref_bias, sel.targets, int(chunk_size), int(vocab_chunk_size))
        out[side] = tuple(logps.side_logps(x, sel, average).logps
                          for x in (logp - ref_logp, kl, logp))
    return out


def unsupported_reason(model, max_position: int, token_level: bool) -> Optional[str]:
    """Why `model` cannot take a layout (None when it can): an attention implementation without
    arbitrary masks, per-token KL from full logits (token_level: TDPO), or a sliding window
    shorter than a sequence (the layout's mask does not apply the window)."""
    kind = model.config._attn_implementation
    if kind not in MASKED_ATTENTION:
        return f"its attention implementation {kind!r} takes no custom mask (use sdpa or eager)"
    backbone = getattr(model, model.base_model_prefix)
    if (getattr(model.config, "alibi", False)
            or "position_ids" not in inspect.signature(type(backbone).forward).parameters):
        # BLOOM, MPT, Falcon with alibi: position biases come from a (B, T) mask, no restart
        return "it takes no position ids (its ALiBi biases are built from a (B, T) mask)"
    if hasattr(backbone, "get_rope_index"):  # Qwen2-VL and kin
        return ("its image tokens take multimodal rotary positions (M-RoPE) that it computes from "
                "the (B, T) rows itself")
    if token_level and logps.has_logit_transform(model):
        return "its per-token KL comes from full logits (a transformed output layer)"
    window = getattr(model.config, "sliding_window", None)
    if window and getattr(model.config, "use_sliding_window", True) and window < max_position:
        return f"its sliding window ({window}) is shorter than max_length ({max_position})"
    return None
