"""Sampling completions from a model: samples.jsonl during training (the policy's and the
reference's) and evaluate.py's win-rate samples. Prompts are left-padded, so that every row of a
batch continues at the same column.
"""
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import tqdm

import parallel
import vision


def left_padded(rows: Sequence[Sequence[int]], pad_token_id: int):
    """(input_ids, attention_mask), each (B, W) int64: token rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def sample_records(policy, reference, batches: Iterable[Dict], n: int,
                   take: Callable[[Dict, int], Dict], sample: Callable, step: int) -> List[dict]:
    """samples.jsonl's records for the first `n` prompts of `batches`: {"step", "prompt", "policy",
    "reference"} (reference None when the reference cannot generate).

    Args:
        policy: the policy.
        reference: the run's references.Reference (it generates with its own model, if any).
        batches: collated batches, each with a "prompt" list.
        n: how many prompts to sample for.
        take: (batch, k) -> its first k rows, on the device.
        sample: (model, batch) -> one decoded completion per prompt (sample_texts).
        step: examples seen, recorded with every sample.
    """
    records, n_left = [], n
    for batch in batches:
        if n_left <= 0:
            break
        part = take(batch, min(n_left, len(batch["chosen_input_ids"])))
        policy_text = sample(policy, part)
        reference_text = reference.generate(sample, part) or [None] * len(policy_text)
        for prompt, p, r in zip(part["prompt"], policy_text, reference_text):
            records.append({"step": step, "prompt": prompt, "policy": p, "reference": r})
        n_left -= len(policy_text)
    return records


def sample_texts(model, batch: Dict, tokenizer, max_length: int, device, context,
                 gather: bool = False) -> List[str]:
    """One sampled completion per prompt of a collated batch, decoded; sampled inside
    `context()` (the tensor-parallel trainer seeds it). gather: an FSDP model's weights are
    gathered for the whole generation (parallel.gathered_for_generation)."""
    rows = [ids[mask.bool()] for ids, mask in zip(batch["prompt_input_ids"],
                                                  batch["prompt_attention_mask"])]
    ids, mask = (t.to(device) for t in left_padded(rows, tokenizer.pad_token_id))
    with context(), torch.no_grad(), parallel.gathered_for_generation(model, gather) as gathered:
        # a vision-language model's prompts with their images (one prompt per row, in order)
        images = vision.batch_inputs(batch, device=device)
        # gathered: no forward communicates, so each process may stop at its own last token
        synced = {"synced_gpus": False} if gathered else {}
        out = model.generate(input_ids=ids, attention_mask=mask, max_length=max_length,
                             do_sample=True, pad_token_id=tokenizer.pad_token_id, **images,
                             **vision.token_inputs(model, ids, images), **synced)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def sample_token_ids(model, tokenizer, prompt_ids: Sequence[Sequence[int]], n_samples: int,
                     generation: dict, batch_size: int, device,
                     images: Optional[Sequence[dict]] = None, synced_gpus: bool = False,
                     progress: bool = True) -> List[List[int]]:
    """n_samples sampled completions per prompt, prompt-major (P * n_samples lists of token ids,
    each ending at and including the first EOS, or max_new_tokens long if none came). Batched,
    left-padded, with the KV cache; a VLM's prompts with their `images` (each prompt's image
    inputs, vision.py). synced_gpus: the model is sharded over ranks (FSDP), which must run the
    same number of forwards, so each keeps stepping until every rank's rows ended."""
    from transformers import GenerationConfig
    # top_k=0: no top-k cut-off, so with temperature 1 and top_p 1 the samples come from pi itself.
    config = GenerationConfig(do_sample=True, top_k=0, use_cache=True, **generation,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rows = [list(p) for p in prompt_ids for _ in range(n_samples)]
    pictures = [one for one in images for _ in range(n_samples)] if images else []
    samples = []
    for start in tqdm.tqdm(range(0, len(rows), batch_size), desc="Sampling", leave=False,
                           disable=not progress):
        ids, mask = (t.to(device) for t in left_padded(rows[start:start + batch_size], tokenizer.pad_token_id))
        images = vision.concat(pictures[start:start + batch_size], device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 synced_gpus=synced_gpus, **images, **vision.token_inputs(model, ids, images))
        samples.extend(_until_eos(seq.tolist(), tokenizer.eos_token_id)
                       for seq in out[:, ids.shape[1]:])
    return samples


def _until_eos(tokens: List[int], eos_id: int) -> List[int]:
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens
