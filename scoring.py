"""What a training step scores: the log-probs a loss's registry entry asks for, from the policy
and the reference, and the start-up check that decides, per model, whether they come from the
chunked output layer or from full logits (logps.py computes both).

Nothing here reads the config or knows about trainers: the trainer passes its models, its loss
entry and arguments, and the hook that runs a policy computation (FSDP runs it inside a forward).
"""
import functools
import math
from typing import Callable, Dict, Sequence

import torch

import logps
import losses
import packing
import vision
from utils import call, rank0_print


def batch_logps(policy, reference, batch: Dict, layouts, spec, args: dict,
                chunk_size: int) -> losses.BatchLogps:
    """The log-probs the loss asks for (losses.BatchLogps), one forward per model and Layout.

    Args:
        policy: the placed policy.
        reference: the run's references.Reference.
        batch: this rank's micro-batch, on the device.
        layouts: the batch's packing.lay_out.
        spec: the loss's losses.LossSpec; args: its arguments.
        chunk_size: logps_chunk_size.
    """
    average = spec.average_log_prob(args)
    public, wpo = spec.sequence_parts(args)
    shared = packing.shared_tokens(batch) if public else None
    out, parts = {}, {}  # BatchLogps fields, and those of its LD-DPO public part
    for layout in layouts:
        if spec.token_level:
            for side, (margin, kl, policy_logps) in packing.token_kl(
                    policy, reference, layout, average, chunk_size).items():
                out.update({side: policy_logps, f"{side}_margin": margin, f"{side}_kl": kl})
        else:
            found = {"": packing.model_logps(policy, layout, average, chunk_size, shared, wpo)}
            if spec.needs_reference(args):
                found["reference_"] = reference.layout_logps(batch, layout, average, shared)
            for model, sides in found.items():
                for side, values in sides.items():
                    out[model + side], parts[model + side] = values.logps, values.public
                    if wpo and not model:
                        out[f"{side}_wpo"] = values.wpo_logweight
        for side, selection in layout.selections.items():
            out[f"{side}_tokens"] = selection.counts.to(out[side])
    out.update(example_inputs(policy, batch, spec, chunk_size))
    return losses.BatchLogps(**out, public=losses.BatchLogps(**parts) if public else None)


def example_inputs(policy, batch: Dict, spec, chunk_size: int) -> Dict[str, torch.Tensor]:
    """The BatchLogps fields some entries read beside the completions' log-probs: KTO's `label`,
    and for ORPO (spec.prompt_nll) the policy's summed log-probs of each prompt's tokens after its
    first, `prompt`, with their count `prompt_tokens` (its NLL covers prompt and completion): one
    more forward, of the prompts alone, in their own padded rows."""
    out = {}
    if "label" in batch:
        out["label"] = batch["label"]
    if spec.prompt_nll:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        rows = {"prompt_input_ids": ids, "prompt_attention_mask": mask,
                "prompt_labels": ids.masked_fill(mask == 0, logps.IGNORE_INDEX),
                **_images_of(batch)}
        layout = packing.plain_layout(rows, "prompt")
        out["prompt"] = packing.model_logps(policy, layout, False, chunk_size)["prompt"].logps
        out["prompt_tokens"] = layout.selections["prompt"].counts.to(out["prompt"])
    return out


def check_layout(policy, reference_model, policy_logps: Callable, batch: Dict,
                 sides: Sequence[str], build_layout: Callable, max_length: int, chunk_size: int,
                 any_rank: Callable[[bool], bool], token_level: bool) -> bool:
    """Before training: whether the models can score packing.py's layouts (share_prompt,
    packing). Each must take a custom 4D attention mask, and the policy (and a reference of
    another class) must give the usual layout's log-probs on `batch`; otherwise one warning line
    and the usual layout from then on.

    Args:
        policy, reference_model (or None), policy_logps, chunk_size, any_rank: as
            check_output_layers.
        batch: a few evaluation rows, on the device; sides: the scored sides.
        build_layout: batch -> packing.Layout, with the run's settings.
        max_length: the longest sequence (for models with a sliding window).
        token_level: the loss needs per-token KL (TDPO).
    """
    reason, batch = None, _short_pairs(batch, sides, CHECK_TOKENS // 2)
    for role, model in {"policy": policy, "reference model": reference_model}.items():
        why = None if model is None else packing.unsupported_reason(model, max_length,
                                                                     token_level)
        if why is not None:
            reason = f"the {role} cannot take it: {why}"
            break
    if reason is None:
        layout = build_layout(batch)
        checked = {"policy": (policy, policy_logps)}
        if reference_model is not None and type(reference_model) is not type(policy):
            checked["reference model"] = (reference_model, call)
        for role, (model, run) in checked.items():
            try:
                error = run(_layout_error, model, batch, layout, sides, chunk_size)
            except Exception as e:  # a model that cannot take the mask at all: the usual layout
                error, failure = math.nan, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            else:
                failure = f"{error:.3g} per token"
            if any_rank(not error <= chunked_logps_tolerance(model)):
                reason = f"the {role}'s log-probs on it differ from the usual layout's ({failure})"
                break
    if reason is not None:
        rank0_print(f"warning: share_prompt/packing are off: {reason}; every sequence is scored "
                    "in its own padded row instead (the prompt runs once per response)")
    return reason is None


def _layout_error(model, batch: Dict, layout, sides: Sequence[str], chunk_size: int) -> float:
    """Largest difference of per-token mean log-probs between a layout and the usual rows."""
    with torch.no_grad():
        packed = packing.model_logps(model, layout, True, chunk_size)
        return max((packed[side].logps - _usual_logps(model, batch, chunk_size, side)
                    ).abs().max().item() for side in sides)


def check_output_layers(policy, reference_model, policy_logps: Callable, batch: Dict,
                        chunk_size: int, any_rank: Callable[[bool], bool]):
    """Before training: the chunked output layer must give each model's own log-probs (those of
    its forward) on the chosen sequences of `batch`. A model whose head it does not reproduce (not
    a plain linear layer, an unknown transform) is marked to be scored from its full logits from
    then on (logps.FULL_LOGITS_ATTR), with one warning line; known transforms (soft-capping, logit
    scales) are handled anyway.

    Args:
        policy: the placed policy; reference_model: the reference's model, or None.
        policy_logps: (fn, *args) -> fn(*args), run the way the trainer runs policy computations.
        batch: a few evaluation rows, on the device.
        chunk_size: logps_chunk_size.
        any_rank: parallel.Ranks.any_rank (every rank must take the same path).
    """
    rows = _check_tokens(batch)
    ids, mask, labels = (rows[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    differ, error = {}, None
    for role, model in {"policy": policy, "reference model": reference_model}.items():
        if model is None or logps.has_logit_transform(model):
            continue
        if model is not policy and type(model) is type(policy) and error is not None:
            # The same architecture as the policy, so the same head: the policy's verdict holds,
            # and a reference that is only read from a cache never has to run.
            bad = "policy" in differ
        else:
            chunked = functools.partial(policy_logps if model is policy else call,
                                        _usual_logps, model, rows, chunk_size)
            error = logps.chunked_logps_error(model, chunked, ids, mask, labels,
                                              **vision.batch_inputs(rows, device=ids.device))
            # every rank must take the same path (NaN counts as a difference)
            bad = any_rank(not error <= chunked_logps_tolerance(model))
        if bad:
            setattr(model, logps.FULL_LOGITS_ATTR, True)
            differ[role] = error
    if differ:
        names = " and the ".join(differ)
        rank0_print(f"warning: the {names}'s output layer is not a plain linear layer (log-probs "
                    "from hidden states x output weight differ from its own forward's by "
                    f"{max(differ.values()):.3g} per token); scoring from full logits instead "
                    "(exact, but more memory: batch x length x vocabulary)")


# Tokens per row the output-layer check scores: the model's own forward builds full
# (rows x tokens x vocabulary) logits, which for long sequences and large vocabularies would be
# the run's largest allocation (2 x 8k x 150k floats: 10 GB).
CHECK_TOKENS = 64


def _check_tokens(batch: Dict) -> Dict:
    """chosen_input_ids / _attention_mask / _labels of the first CHECK_TOKENS tokens of the chosen
    rows, every real token scored: any tokens show whether the chunked head is the model's. Rows
    with images are kept whole (cutting image tokens would part them from their images)."""
    n = batch["chosen_input_ids"].shape[1] if "image_inputs" in batch else CHECK_TOKENS
    ids, mask = (batch[f"chosen_{k}"][:, :n] for k in ("input_ids", "attention_mask"))
    return {"chosen_input_ids": ids, "chosen_attention_mask": mask,
            "chosen_labels": ids.masked_fill(mask == 0, logps.IGNORE_INDEX), **_images_of(batch)}


def _images_of(batch: Dict) -> Dict:
    """{"image_inputs": the batch's} for a batch with images (vision.py), else {}."""
    return {"image_inputs": batch["image_inputs"]} if "image_inputs" in batch else {}


def _usual_logps(model, batch: Dict, chunk_size: int, side: str = "chosen") -> torch.Tensor:
    """(B,) per-token mean log-probs of `side` in the usual layout (packing.plain_layout)."""
    return packing.model_logps(model, packing.plain_layout(batch, side), True,
                               chunk_size)[side].logps


def _short_pairs(batch: Dict, sides: Sequence[str], n: int) -> Dict:
    """`batch` with each row cut to the last n tokens of its prompt (all of it when the batch has
    images: its image tokens stay with its images) and the first n of each response (labels
    kept), so that a start-up check costs the same whatever max_length is."""
    rows = {f"{side}_{k}": [] for side in sides for k in ("input_ids", "attention_mask", "labels")}
    rows["prompt_attention_mask"] = []
    for b in range(len(batch[f"{sides[0]}_input_ids"])):
        p = int(batch["prompt_attention_mask"][b].sum()) if "prompt_attention_mask" in batch else 0
        start = 0 if "image_inputs" in batch else max(p - n, 0)
        rows["prompt_attention_mask"].append(torch.ones(p - start, dtype=torch.long))
        for side in sides:
            end = min(int(batch[f"{side}_attention_mask"][b].sum()), p + n)
            for key in ("input_ids", "attention_mask", "labels"):
                rows[f"{side}_{key}"].append(batch[f"{side}_{key}"][b, start:end].cpu())
    device = batch[f"{sides[0]}_input_ids"].device
    return {**{key: torch.nn.utils.rnn.pad_sequence(
                values, batch_first=True,
                padding_value=logps.IGNORE_INDEX if key.endswith("labels") else 0).to(device)
               for key, values in rows.items()}, **_images_of(batch)}


def chunked_logps_tolerance(model) -> float:
    """How far (per token, in nats) the chunked output layer may be from the model's own forward:
    float32 rounding of differently blocked products, or half-precision rounding."""
    dtype = model.get_output_embeddings().weight.dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
