"""The training loop (BasicTrainer) and its multi-process variants.

One loop serves every loss: the loss registry entry says which log-probs a step needs (per-sequence,
per-token with position KL, with or without a reference) and turns them into a loss and metrics.
Subclasses only change how models are placed, gradients clipped, state gathered and saved.
"""
import contextlib
import gc
import hashlib
import inspect
import json
import math
import os
import shutil
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import tqdm
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               parallelize_module)
from omegaconf import DictConfig, OmegaConf

import losses
import preference_datasets
from utils import (ConfigError, all_gather_cat, default_cache_dir, get_rng_state, rank0_print,
                   safe_torch_load, save_hf_format, set_rng_state)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stopped being finite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- log-probs

def output_layer(model):
    """(weight (V, H), bias (V,) or None) of a causal LM's output projection."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states (B, T, H) after the last norm, without applying the output layer."""
    backbone = getattr(model, model.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _has_logit_transform(model) -> bool:
    # Models that scale or soft-cap logits after the output layer need the plain path.
    cfg = model.config
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


def sequence_logps(model, input_ids, attention_mask, labels, average_log_prob: bool,
                   chunk_size: int) -> torch.Tensor:
    """Per-sequence log-probs (B,) of the label tokens. The output layer is applied only at
    completion positions, in chunks, so no (B x T x V) logits tensor is ever built."""
    if _has_logit_transform(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return losses.get_batch_logps(logits.float(), labels, average_log_prob)
    hidden = hidden_states(model, input_ids, attention_mask)
    weight, bias = output_layer(model)
    return losses.completion_logps(hidden.to(weight.device), weight, labels.to(weight.device), bias,
                                   average_log_prob, chunk_size)


def token_level_logps(policy, reference, input_ids, attention_mask, labels, average_log_prob: bool,
                      chunk_size: int):
    """(logps_margin, position_kl, logps), each (B,), for TDPO, streamed over the vocabulary."""
    hidden = hidden_states(policy, input_ids, attention_mask)
    with torch.no_grad():
        ref_hidden = hidden_states(reference, input_ids, attention_mask)
    weight, bias = output_layer(policy)
    ref_weight, ref_bias = output_layer(reference)
    device = weight.device
    return losses.completion_token_kl(
        hidden.to(device), ref_hidden.to(device).to(hidden.dtype), weight,
        ref_weight.to(device).to(weight.dtype), labels.to(device), bias,
        None if ref_bias is None else ref_bias.to(device), average_log_prob, chunk_size)


# ----------------------------------------------------------------------------- batches

def slice_batch(batch: Dict, start: int, end: int, device) -> Dict:
    """Rows [start, end) of a collated batch, tensors moved to `device` and trimmed of the columns
    that are padding in every row of the slice."""
    out = {}
    for key, value in batch.items():
        out[key] = value[start:end]
    for prefix in ("chosen", "rejected", "prompt"):
        mask_key = f"{prefix}_attention_mask"
        if mask_key in out and torch.is_tensor(out[mask_key]) and out[mask_key].numel():
            length = int(out[mask_key].sum(dim=1).max().item())
            for suffix in ("input_ids", "attention_mask", "labels"):
                key = f"{prefix}_{suffix}"
                if key in out:
                    out[key] = out[key][:, :max(length, 1)]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def batch_size_of(batch: Dict) -> int:
    return len(batch["chosen_input_ids"])


def mean_metrics(metrics: Dict[str, List[float]]) -> Dict[str, float]:
    return {k: sum(v) / len(v) for k, v in metrics.items() if len(v)}


def split_metric_name(name: str, split: str) -> str:
    """'rewards/chosen' -> 'rewards_train/chosen' (the DPO repository's naming)."""
    group, _, rest = name.partition("/")
    return f"{group}_{split}/{rest}"


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt", "trainer_state.pt")


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES)


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the most examples seen; LATEST wins ties (it ends the run)."""
    best, best_key = None, None
    for path in run_dir.glob("*"):
        if path.name == "LATEST" or path.name.startswith("step-"):
            if not is_complete_checkpoint(path):
                continue
            state = safe_torch_load(str(path / "trainer_state.pt"), "checkpoint")
            key = (state["example_counter"], path.name == "LATEST")
            if best_key is None or key > best_key:
                best, best_key = path, key
    return best


def atomic_replace_dir(tmp: Path, final: Path):
    """Move a fully written directory into place so a crash never leaves a half checkpoint under
    the final name."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ----------------------------------------------------------------------------- reference cache
# precompute_ref_log_probs=true: the reference scores every sequence once; the log-probs are kept
# on disk (reused by any run with the same reference weights and the same tokenised sequences) and
# looked up by a hash of each sequence, so no reference model stays in memory during training.

REFERENCE_CACHE_VERSION = 1


class ReferenceCacheMiss(RuntimeError):
    """A batch holds a sequence whose reference log-prob was not precomputed."""


def reference_cache_dir() -> Path:
    return default_cache_dir() / "ref-logps"


def model_fingerprint(model) -> str:
    """Hash of a model's config and every weight's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def sequence_keys(batch: Dict, side: str) -> List[bytes]:
    """16-byte hash per row of a side's token ids and labels, padding excluded (a sequence gets
    the same key however its batch was padded)."""
    ids, mask, labels = (batch[f"{side}_{k}"].detach().cpu()
                         for k in ("input_ids", "attention_mask", "labels"))
    keys = []
    for row_ids, row_mask, row_labels in zip(ids, mask.bool(), labels):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(row_ids[row_mask].to(torch.int32).numpy().tobytes())
        digest.update(row_labels[row_mask].to(torch.int32).numpy().tobytes())
        keys.append(digest.digest())
    return keys


def reference_cache_path(fingerprint: str, keys) -> Path:
    """The cache file for these reference weights and exactly this set of sequences."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"v{REFERENCE_CACHE_VERSION}|{fingerprint}|".encode())
    for key in sorted(keys):
        digest.update(key)
    return reference_cache_dir() / f"ref-logps-{digest.hexdigest()}.pt"


def save_reference_cache(path: Path, entries: Dict[bytes, tuple], dtype: torch.dtype):
    keys = sorted(entries)
    data = {"version": REFERENCE_CACHE_VERSION,
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(-1, 16),
            "sum": torch.tensor([entries[k][0] for k in keys], dtype=dtype),
            "mean": torch.tensor([entries[k][1] for k in keys], dtype=dtype)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def load_reference_cache(path: Path):
    """({sequence key: (sum, mean)}, dtype), or None when the file is missing or unreadable."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != REFERENCE_CACHE_VERSION:
            return None
        keys = [bytes(row) for row in data["keys"].numpy()]
        entries = dict(zip(keys, zip(data["sum"].tolist(), data["mean"].tolist())))
        return entries, data["sum"].dtype
    except FileNotFoundError:
        return None
    except Exception as e:  # damaged: computed again and rewritten
        rank0_print(f"precompute_ref_log_probs: ignoring unreadable cache {path} "
                    f"({type(e).__name__}: {e})")
        return None


# ----------------------------------------------------------------------------- the trainer

class BasicTrainer:
    """Single-process training on CPU or one GPU; with several visible GPUs the model's layers are
    split across them (the DPO repository's naive model parallelism)."""

    def __init__(self, policy, config: DictConfig, seed: int, run_dir: str, reference_model=None,
                 rank: int = 0, world_size: int = 1, tokenizer=None):
        self.config, self.seed, self.rank, self.world_size = config, seed, rank, world_size
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.loss_args = {k: v for k, v in OmegaConf.to_container(config.loss).items() if k != "name"}
        self.loss = losses.get_loss(OmegaConf.to_container(config.loss))
        self.loss_state = self.loss.init_state()
        self.loss_generator = torch.Generator().manual_seed(seed)
        self.policy = policy
        self.reference_model = reference_model
        # Hashed before setup_models moves or shards it: the reference cache is keyed by it.
        self.reference_cache = None
        self.reference_fingerprint = (model_fingerprint(reference_model)
                                      if config.precompute_ref_log_probs and reference_model is not None
                                      else None)
        self.setup_models()
        self.example_counter = 0
        self.batch_counter = 0
        self.wandb_run_id = None
        self.eval_batches = self.build_eval_batches()

    # -- hooks the distributed trainers override -------------------------------------------------

    def setup_models(self):
        """Place policy and reference on devices (naive layer split over several GPUs)."""
        n_gpus = torch.cuda.device_count()
        for name in ("policy", "reference_model"):
            model = getattr(self, name)
            if model is None:
                continue
            if n_gpus > 1:
                model = dispatch_across_gpus(model)
            else:
                model = model.to("cuda" if n_gpus == 1 else "cpu")
            setattr(self, name, model)
        if self.config.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        self.device = self.policy.get_input_embeddings().weight.device

    def clip_gradient(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                              self.config.max_grad_norm).item()

    def policy_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state)

    def load_policy_state_dict(self, state: Dict[str, torch.Tensor]):
        self.policy.load_state_dict(state)

    def generation_context(self):
        return contextlib.nullcontext()

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    # Whether the processes split each batch between them (data parallelism). train.py reads it
    # too, to check that batch sizes divide before any trainer is built.
    splits_batch = True

    @property
    def data_parallel_size(self) -> int:
        """Processes that split each batch between them."""
        return self.world_size if self.splits_batch else 1

    @property
    def data_rank(self) -> int:
        return self.rank if self.splits_batch else 0

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor over the data-parallel ranks."""
        return all_gather_cat(values) if self.data_parallel_size > 1 else values

    # -- data --------------------------------------------------------------------------------------

    def data_iterator(self, split: str, **kwargs):
        c = self.config
        paths = {name: c.dataset_paths.get(name) for name in c.datasets
                 if name in c.dataset_paths}
        return preference_datasets.get_batch_iterator(
            list(c.datasets), self.tokenizer, split=split, max_length=c.max_length,
            max_prompt_length=c.max_prompt_length, sft_mode=not self.loss.paired, seed=self.seed,
            silent=self.rank != 0, cache_dir=self.data_cache_dir(), paths=paths, **kwargs)

    def data_cache_dir(self) -> Optional[str]:
        return None

    def build_eval_batches(self) -> List[Dict]:
        c = self.config
        n = dict(n_examples=c.n_eval_examples) if c.n_eval_examples else dict(n_epochs=1)
        return list(self.data_iterator("test", batch_size=c.eval_batch_size, shuffle=False, **n))

    def train_iterator(self):
        c = self.config
        # n_examples, when set, takes precedence over n_epochs (see config.yaml).
        length = dict(n_examples=c.n_examples) if c.n_examples else dict(n_epochs=c.n_epochs)
        return self.data_iterator("train", batch_size=c.batch_size, shuffle=True, **length,
                                  group_by_length=c.group_by_length,
                                  skip_batches=self.batch_counter)

    # -- one batch -----------------------------------------------------------------------------

    @property
    def sides(self):
        """The responses a step scores: chosen and rejected, or only the SFT target."""
        return ("chosen", "rejected") if self.loss.paired else ("chosen",)

    def reference_logps(self, batch: Dict, side: str, average: bool) -> torch.Tensor:
        if self.reference_cache is not None:
            return self.cached_reference_logps(batch, side, average)
        with torch.no_grad():
            return sequence_logps(self.reference_model, batch[f"{side}_input_ids"],
                                  batch[f"{side}_attention_mask"], batch[f"{side}_labels"],
                                  average, self.config.logps_chunk_size)

    # -- precomputed reference log-probs ---------------------------------------------------------

    def cached_reference_logps(self, batch: Dict, side: str, average: bool) -> torch.Tensor:
        entries, dtype = self.reference_cache
        try:
            values = [entries[key][1 if average else 0] for key in sequence_keys(batch, side)]
        except KeyError:
            raise ReferenceCacheMiss(
                f"precompute_ref_log_probs: a {side} sequence of this batch has no precomputed "
                f"reference log-prob in {self.reference_cache_file}, which covers only the "
                "training and evaluation data this trainer was set up with; score it with the "
                "reference model (precompute_ref_log_probs=false) or rebuild the trainer") from None
        return torch.tensor(values, dtype=dtype, device=self.device)

    def reference_cache_batches(self):
        """(global batch, micro-batches per batch) for every batch that training (the whole
        schedule, from the first batch, whatever a resume skips) and evaluation will score."""
        done, self.batch_counter = self.batch_counter, 0
        try:
            train_batches = self.train_iterator()
        finally:
            self.batch_counter = done
        for batch in train_batches:
            yield batch, self.config.gradient_accumulation_steps
        for batch in self.eval_batches:
            yield batch, 1

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any: ranks must run the same forwards."""
        if not (dist.is_initialized() and self.world_size > 1):
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def merge_across_ranks(self, entries: Dict[bytes, tuple]) -> Dict[bytes, tuple]:
        if not (dist.is_initialized() and self.world_size > 1):
            return entries
        parts = [None] * self.world_size
        dist.all_gather_object(parts, entries)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def compute_reference_cache(self, n_batches: int):
        """({sequence key: (sum, mean)}, dtype): each sequence scored once, on the same
        micro-batches (so the same padding) as training and evaluation; each rank scores its own
        share, then the shares are merged."""
        self.reference_model.eval()
        entries = {}
        dtype = None
        for batch, n_parts in tqdm.tqdm(self.reference_cache_batches(), total=n_batches,
                                        desc="Scoring with the reference", disable=self.rank != 0):
            for part in range(n_parts):
                micro = self.rank_slice(batch, part, n_parts)
                for side in self.sides:
                    keys = sequence_keys(micro, side)
                    if not self.any_rank(any(k not in entries for k in keys)):
                        continue
                    sums = self.reference_logps(micro, side, average=False)
                    counts = (micro[f"{side}_labels"][:, 1:] != losses.IGNORE_INDEX).sum(-1)
                    # the same division the average=True path does, so the means are identical
                    means = sums / counts.clamp(min=1).to(sums.dtype)
                    entries.update(zip(keys, zip(sums.tolist(), means.tolist())))
                    dtype = sums.dtype
        return self.merge_across_ranks(entries), dtype

    def prepare_reference_cache(self):
        """With precompute_ref_log_probs: load the reference log-probs of all training and
        evaluation sequences from the cache file, or compute and save them, then drop the
        reference model. Called by train() before the first step; a no-op otherwise."""
        if not self.config.precompute_ref_log_probs or self.reference_cache is not None:
            return
        if self.reference_model is None or self.reference_fingerprint is None:
            raise ConfigError("precompute_ref_log_probs=true needs the trainer to be given the "
                              "reference model (train.build_models builds it)")
        needed, n_batches = set(), 0
        for batch, _ in self.reference_cache_batches():
            n_batches += 1
            for side in self.sides:
                needed.update(sequence_keys(batch, side))
        path = reference_cache_path(self.reference_fingerprint, needed)
        self.reference_cache_file = path
        loaded = load_reference_cache(path)
        if loaded is not None and needed.issubset(loaded[0]):
            rank0_print(f"precompute_ref_log_probs: loaded the reference log-probs of "
                        f"{len(needed)} sequences from {path}")
        else:
            rank0_print(f"precompute_ref_log_probs: scoring {len(needed)} sequences with the "
                        "reference model once")
            loaded = self.compute_reference_cache(n_batches)
            if self.rank == 0:
                save_reference_cache(path, *loaded)
                rank0_print(f"precompute_ref_log_probs: saved them to {path}")
            self.barrier()
        self.reference_cache = loaded
        # Training never needs the reference model again.
        self.reference_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def batch_logps(self, batch: Dict) -> Dict[str, torch.Tensor]:
        """The log-probs the loss asks for, keyed as losses.LossSpec.compute expects."""
        spec, args, chunk = self.loss, self.loss_args, self.config.logps_chunk_size
        average = spec.average_log_prob(args)
        out = {}
        for side in self.sides:
            ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
            if spec.token_level:
                margin, kl, logps = token_level_logps(self.policy, self.reference_model, ids, mask,
                                                      labels, average, chunk)
                out.update({f"{side}_margin": margin, f"{side}_position_kl": kl,
                            f"policy_{side}": logps})
                continue
            out[f"policy_{side}"] = sequence_logps(self.policy, ids, mask, labels, average, chunk)
            if spec.needs_reference(args):
                out[f"reference_{side}"] = self.reference_logps(batch, side, average)
        return out

    def batch_loss(self, batch: Dict, train: bool):
        """(scalar loss, {metric name: list of floats}) for one micro-batch on this rank."""
        logps = self.batch_logps(batch)
        loss, metrics = self.loss.compute(logps, self.loss_args, self.loss_state,
                                          gather=self.gather, train=train,
                                          generator=self.loss_generator)
        split = "train" if train else "eval"
        out = {}
        for name, value in metrics.items():
            values = self.gather(value.detach().float().reshape(-1).to(self.device))
            out[split_metric_name(name, split)] = values.cpu().tolist()
        out[f"loss/{split}"] = self.gather(loss.detach().float().reshape(1)).cpu().tolist()
        return loss, out

    def rank_slice(self, batch: Dict, part: int, n_parts: int) -> Dict:
        """This rank's share of micro-batch `part` of `n_parts` of a global batch."""
        size = batch_size_of(batch)
        per_micro = size // n_parts
        per_rank = per_micro // self.data_parallel_size
        start = part * per_micro + self.data_rank * per_rank
        return slice_batch(batch, start, start + per_rank, self.device)

    def train_step(self, batch: Dict) -> Dict[str, float]:
        """One optimizer update over a global batch, with gradient accumulation."""
        start = time.time()
        self.policy.train()
        n_micro = self.config.gradient_accumulation_steps
        metrics = defaultdict(list)
        for part in range(n_micro):
            loss, micro_metrics = self.batch_loss(self.rank_slice(batch, part, n_micro), train=True)
            (loss / n_micro).backward()
            for k, v in micro_metrics.items():
                metrics[k].extend(v)
        grad_norm = self.clip_gradient()
        self.check_finite(metrics["loss/train"], grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.batch_counter += 1
        self.example_counter += batch_size_of(batch)
        out = mean_metrics(metrics)
        out.update({"grad_norm": grad_norm,
                    "examples_per_second": batch_size_of(batch) / (time.time() - start),
                    "counters/examples": self.example_counter,
                    "counters/updates": self.batch_counter})
        return out

    def check_finite(self, loss_values: List[float], grad_norm: float):
        if not all(math.isfinite(v) for v in loss_values) or not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"training diverged at {self.example_counter} examples (loss {loss_values}, "
                f"grad_norm {grad_norm}); the last good checkpoint in {self.run_dir} is kept. "
                "Lower lr, raise warmup_steps or lower max_grad_norm")

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, float]:
        self.policy.eval()
        metrics = defaultdict(list)
        for batch in tqdm.tqdm(self.eval_batches, desc="Computing eval metrics",
                               disable=self.rank != 0, leave=False):
            with torch.no_grad():
                _, batch_metrics = self.batch_loss(self.rank_slice(batch, 0, 1), train=False)
            for k, v in batch_metrics.items():
                metrics[k].extend(v)
        if self.config.sample_during_eval:
            self.write_samples()
        return mean_metrics(metrics)

    def generate(self, model, batch: Dict) -> List[str]:
        """Sampled completions for a batch's prompts (left-padded for generation)."""
        rows = [ids[mask.bool()] for ids, mask in zip(batch["prompt_input_ids"],
                                                      batch["prompt_attention_mask"])]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        with self.generation_context(), torch.no_grad():
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 max_length=self.config.max_length, do_sample=True,
                                 pad_token_id=pad)
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def write_samples(self):
        """Sample from the policy (and reference) for the first n_eval_model_samples eval prompts;
        appended to samples.jsonl in the run directory."""
        records, n_left = [], self.config.n_eval_model_samples
        for batch in self.eval_batches:
            if n_left <= 0:
                break
            part = slice_batch(batch, 0, min(n_left, batch_size_of(batch)), self.device)
            policy_text = self.generate(self.policy, part)
            reference_text = (self.generate(self.reference_model, part)
                              if self.reference_model is not None else [None] * len(policy_text))
            for prompt, p, r in zip(part["prompt"], policy_text, reference_text):
                records.append({"step": self.example_counter, "prompt": prompt, "policy": p,
                                "reference": r})
            n_left -= len(policy_text)
        if self.rank == 0 and records:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            if self.config.wandb.enabled:
                import wandb
                table = wandb.Table(columns=["step", "prompt", "policy", "reference"],
                                    data=[[r["step"], r["prompt"], r["policy"], r["reference"]]
                                          for r in records])
                wandb.log({"samples": table}, step=self.example_counter)

    # -- logging -----------------------------------------------------------------------------------

    def log(self, metrics: Dict[str, float]):
        """Append to metrics.jsonl and send the same keys to wandb (rank 0 only)."""
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.config.wandb.enabled:
            import wandb
            wandb.log(metrics, step=self.example_counter)

    def init_wandb(self):
        if self.rank != 0 or not self.config.wandb.enabled:
            return
        import wandb
        # Online when logged in, offline otherwise; never prompt (there may be no terminal).
        os.environ.setdefault("WANDB_MODE", "online" if wandb_logged_in() else "offline")
        run = wandb.init(entity=self.config.wandb.entity, project=self.config.wandb.project,
                         config=OmegaConf.to_container(self.config, resolve=True),
                         dir=str(self.run_dir), name=self.config.exp_name,
                         id=self.wandb_run_id, resume="allow")
        self.wandb_run_id = run.id

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, name: str, metrics: Dict[str, float], finished: bool = False):
        """Write {run_dir}/{name}/ atomically: policy, optimizer, scheduler and the trainer state
        needed to resume exactly, plus the resolved config (and Hugging Face files for LATEST)."""
        policy_state = self.policy_state_dict()
        optimizer_state = self.optimizer_state_dict()
        if self.rank == 0:
            final = self.run_dir / name
            tmp = self.run_dir / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            step = self.example_counter
            for fname, state in (("policy.pt", policy_state), ("optimizer.pt", optimizer_state),
                                 ("scheduler.pt", self.scheduler.state_dict())):
                torch.save({"step_idx": step, "state": state, "metrics": metrics}, tmp / fname)
            OmegaConf.save(self.config, tmp / "config.yaml", resolve=True)
            if finished and self.config.save_hf_format:
                save_hf_format(self.policy_for_export(), policy_state, self.tokenizer, tmp)
            # Written last: its presence marks the checkpoint complete.
            torch.save(self.trainer_state(finished), tmp / "trainer_state.pt")
            atomic_replace_dir(tmp, final)
            self.prune_checkpoints()
            rank0_print(f"saved checkpoint to {final}")
        self.barrier()

    def policy_for_export(self):
        return self.policy

    def trainer_state(self, finished: bool) -> dict:
        return {"example_counter": self.example_counter, "batch_counter": self.batch_counter,
                "next_eval": self.next_eval, "finished": finished, "rng": get_rng_state(),
                "loss_generator": self.loss_generator.get_state(),
                "loss_state": dict(self.loss_state), "wandb_run_id": self.wandb_run_id}

    def prune_checkpoints(self):
        keep = self.config.keep_checkpoints
        if keep is None:
            return
        steps = sorted((p for p in self.run_dir.glob("step-*") if p.is_dir()),
                       key=lambda p: int(p.name.split("-")[1]))
        for old in steps[:max(len(steps) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, path: Path) -> bool:
        """Load a checkpoint written by `save`; returns whether that run had already finished."""
        state = safe_torch_load(str(path / "trainer_state.pt"), "resume checkpoint")
        self.load_policy_state_dict(safe_torch_load(str(path / "policy.pt"), "resume checkpoint")["state"])
        self.load_optimizer_state_dict(with_current_kernels(
            self.optimizer, safe_torch_load(str(path / "optimizer.pt"), "resume checkpoint")["state"]))
        self.scheduler.load_state_dict(safe_torch_load(str(path / "scheduler.pt"), "resume checkpoint")["state"])
        self.example_counter = state["example_counter"]
        self.batch_counter = state["batch_counter"]
        self.next_eval = state["next_eval"]
        self.loss_state.update(state["loss_state"])
        self.loss_generator.set_state(state["loss_generator"])
        set_rng_state(state["rng"])
        self.wandb_run_id = state["wandb_run_id"]
        return state["finished"]

    def truncate_logs(self):
        """Drop log lines written after the checkpoint being resumed (all of them when starting
        from scratch), so metrics.jsonl and samples.jsonl read as one uninterrupted run."""
        if self.rank != 0:
            return
        for name, key in (("metrics.jsonl", "counters/examples"), ("samples.jsonl", "step")):
            path = self.run_dir / name
            if path.exists():
                lines = path.read_text().splitlines()
                kept = [l for l in lines if self.resumed and json.loads(l)[key] <= self.example_counter]
                path.write_text("".join(l + "\n" for l in kept))
        for stale in list(self.run_dir.glob(".tmp-*")) + list(self.run_dir.glob(".old-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash during a save

    def find_resume_checkpoint(self) -> Optional[Path]:
        if self.config.resume_from:
            path = Path(self.config.resume_from)
            if not is_complete_checkpoint(path):
                raise ConfigError(f"resume_from={path} is not a complete checkpoint directory "
                                  f"(it must hold {', '.join(CHECKPOINT_FILES)})")
            return path
        return newest_checkpoint(self.run_dir) if self.run_dir.exists() else None

    # -- the loop ----------------------------------------------------------------------------------

    def build_optimizer(self):
        c = self.config
        self.optimizer = build_torch_optimizer(getattr(torch.optim, c.optimizer),
                                               list(self.policy.parameters()), c.lr)
        # Linear warmup, then constant (DPO repository).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (c.warmup_steps + 1)))

    def train(self):
        """Train until the data runs out, evaluating every eval_every examples."""
        c = self.config
        self.build_optimizer()
        self.next_eval = 0 if c.do_first_eval else c.eval_every
        resume = self.find_resume_checkpoint()
        self.resumed = resume is not None
        if resume is not None:
            finished = self.restore(resume)
            rank0_print(f"resuming from {resume} at {self.example_counter} examples "
                        f"({self.batch_counter} updates)")
            if finished:
                rank0_print(f"run in {self.run_dir} already finished; nothing to do")
                return
        self.truncate_logs()
        if self.reference_model is not None:
            self.reference_model.eval()
        self.prepare_reference_cache()
        self.init_wandb()
        last_log, metrics = 0.0, {}
        progress = tqdm.tqdm(self.train_iterator(), desc="Training", disable=self.rank != 0,
                             initial=self.batch_counter)
        for batch in progress:
            if self.example_counter >= self.next_eval:
                self.evaluate_and_save(first=self.example_counter == 0)
            metrics = self.train_step(batch)
            if time.time() - last_log >= c.minimum_log_interval_secs:
                self.log(metrics)
                last_log = time.time()
                progress.set_postfix(loss=f"{metrics[f'loss/train']:.4f}")
        eval_metrics = self.evaluate_and_save(first=False, final=True)
        return eval_metrics

    def evaluate_and_save(self, first: bool, final: bool = False):
        eval_metrics = self.evaluate()
        # Never save weights whose evaluation loss is not finite over the last good checkpoint.
        self.check_finite([eval_metrics["loss/eval"]], 0.0)
        eval_metrics.update({"counters/examples": self.example_counter,
                             "counters/updates": self.batch_counter})
        self.log(eval_metrics)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()
                            if k.startswith(("loss/", "rewards_eval/accuracies", "rewards_eval/margins",
                                             "logps_eval/chosen")))
        rank0_print(f"eval after {self.example_counter} examples: {summary}")
        while self.next_eval <= self.example_counter:
            self.next_eval += self.config.eval_every
        if final:
            self.save("LATEST", eval_metrics, finished=True)
        elif not first:
            self.save(f"step-{self.example_counter}", eval_metrics)
        return eval_metrics


def build_torch_optimizer(optimizer_class, params: List[torch.nn.Parameter], lr: float):
    """The optimizer with its fused kernel where it has one for these parameters (plain float32
    or float64 tensors on CPU or CUDA): one pass per tensor instead of one per arithmetic step,
    e.g. AdamW on 2 CPU cores for a 20M-parameter model takes 15 ms per step instead of 56.
    Sharded (DTensor) or low-precision parameters keep the default implementation."""
    fusable = ("fused" in inspect.signature(optimizer_class).parameters and all(
        type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.float64)
        for p in params))
    if fusable:
        try:
            return optimizer_class(params, lr=lr, fused=True)
        except (RuntimeError, ValueError):  # a combination this torch has no fused kernel for
            pass
    return optimizer_class(params, lr=lr)


def with_current_kernels(optimizer, state: dict) -> dict:
    """A saved optimizer state whose param groups keep this optimizer's kernel choice (fused,
    foreach): that depends on the parameters at hand (e.g. DTensors under tensor parallelism),
    not on the trainer that wrote the checkpoint."""
    groups = [dict(saved, **{k: current[k] for k in ("fused", "foreach") if k in current})
              for saved, current in zip(state["param_groups"], optimizer.param_groups)]
    return dict(state, param_groups=groups)


def dispatch_across_gpus(model):
    """Split a model's layers evenly across the visible GPUs (the DPO repository's naive model
    parallelism, through accelerate's device map)."""
    try:
        import accelerate
    except ImportError:
        raise ConfigError("BasicTrainer on several GPUs splits the layers with accelerate: "
                          "pip install accelerate, or use trainer=FSDPTrainer")
    device_map = accelerate.infer_auto_device_map(
        model, max_memory=accelerate.utils.get_balanced_memory(model),
        no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    return accelerate.dispatch_model(model, device_map=device_map)


def wandb_logged_in() -> bool:
    try:
        import wandb
        return bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    except Exception:
        return False


# --- multi-process trainers ---
# FSDPTrainer shards with PyTorch's FSDP2 (`fully_shard`); TensorParallelTrainer splits the block
# projections with PyTorch's native tensor parallelism (DeviceMesh + `parallelize_module`). Both run
# one process per device under torchrun (train.py also spawns them itself over several local GPUs)
# and as a single process with a one-rank process group.

# Full state dicts gathered to rank 0 on the CPU (the other ranks take part and get {}).
FULL_STATE_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank loads the same full state from disk and keeps its own shard of it.
FULL_STATE_LOAD = StateDictOptions(full_state_dict=True)


def ensure_process_group():
    """A single process (e.g. `python train.py trainer=FSDPTrainer` on one device) still needs a
    process group for the mesh; an in-memory store needs no port."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def local_device() -> torch.device:
    # utils.init_distributed has already selected this rank's GPU.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def find_blocks(model, block_name: str) -> List[torch.nn.Module]:
    # By class name, including base classes: FSDP2 swaps a sharded module's class for a subclass.
    blocks = [m for m in model.modules()
              if any(c.__name__ == block_name for c in type(m).__mro__)]
    if not blocks:
        classes = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__
                          or "Block" in type(m).__name__})
        raise ConfigError(f"model.block_name={block_name}: {type(model).__name__} has no module of "
                          f"that class; candidates: {', '.join(classes) or 'none'}")
    return blocks


def enable_activation_checkpointing(model):
    """Recompute each block in backward. Transformers checkpoints exactly its decoder layers (the
    blocks); the non-reentrant variant is the one that composes with FSDP2's and DTensor's hooks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def clip_grad_norm_mixed(parameters, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters that may be DTensors on different meshes or
    placements mixed with plain tensors (which clip_grad_norm_ refuses to combine).

    Squared norms are summed per group of identical layout: a sharded group's local sums are added
    over its mesh, a replicated group (or plain tensors, identical on every rank) counts once. The
    clip coefficient is clip_grad_norm_'s."""
    groups = defaultdict(list)
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            groups[(g.device_mesh, tuple(g.placements))].append(g.to_local())
        else:
            groups[None].append(g)
    total = None
    for key, grads in groups.items():
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        sq = norms.square().sum()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_shard():
                    dist.all_reduce(sq, group=mesh.get_group(dim))
                elif not placement.is_replicate():
                    raise RuntimeError(f"cannot clip gradients with placement {placement}")
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        return 0.0
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for grads in groups.values():
            for g in grads:  # a DTensor's local tensor: scaling it scales the DTensor
                g.mul_(coef.to(g.device))
    return norm.item()


class FSDPTrainer(BasicTrainer):
    """Fully sharded data parallelism with FSDP2: every `model.block_name` block is its own FSDP
    unit, the rest (embeddings, final norm, output layer) forms the root unit; each rank trains on
    batch_size / (gradient_accumulation_steps x world_size) examples per micro-batch."""

    def setup_models(self):
        ensure_process_group()
        self.device = local_device()
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        mp_name = self.config.model.fsdp_policy_mp
        # Compute in the low-precision dtype, reduce gradients in float32 and keep float32 sharded
        # parameters for the optimizer (the FSDP2 tutorial's mixed-precision recipe,
        # docs.pytorch.org/tutorials/intermediate/FSDP_tutorial.html).
        mp = (dict(param_dtype=getattr(torch, mp_name), reduce_dtype=torch.float32)
              if mp_name else {})
        if self.config.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        self.policy = fsdp_shard(self.policy, mesh, self.config.model.block_name, mp)
        if self.reference_model is not None:
            # Inference only, in its own dtype, as the DPO repository shards it.
            self.reference_model = fsdp_shard(self.reference_model, mesh,
                                              self.config.model.block_name, {})

    # BasicTrainer computes log-probs from the backbone's hidden states and the output layer's
    # weight, never calling the model's own forward, so FSDP's root pre-forward hook would not
    # gather the root unit (embeddings, final norm, output layer). The policy's whole log-prob
    # computation therefore runs as a registered forward method of the root (fsdp_shard), so FSDP
    # gathers the root parameters before it, keeps them for backward and reduce-scatters their
    # gradients after it exactly as for a plain forward; the weight handed to
    # losses.completion_logps is the gathered full tensor, whose gradient FSDP reduces into the
    # shard. The reference model has no backward: its root is gathered explicitly for the step and
    # resharded after it.
    def batch_logps(self, batch: Dict) -> Dict[str, torch.Tensor]:
        self.gather_reference_root()  # token-level losses use its output layer directly
        return self.policy.run_in_forward(super().batch_logps, batch)

    def reference_logps(self, batch: Dict, side: str, average: bool) -> torch.Tensor:
        self.gather_reference_root()  # also called alone, to precompute reference log-probs
        return super().reference_logps(batch, side, average)

    def gather_reference_root(self):
        if self.reference_model is not None:
            self.reference_model.unshard()  # a no-op while it is gathered

    def train_step(self, batch: Dict) -> Dict[str, float]:
        try:
            return super().train_step(batch)
        finally:
            self.reshard_roots()

    def evaluate(self) -> Dict[str, float]:
        try:
            return super().evaluate()
        finally:
            self.reshard_roots()

    def reshard_roots(self):
        # Without a backward (evaluation, the reference) FSDP keeps a root unit gathered after
        # forward; free it once the step is over.
        for model in (self.policy, self.reference_model):
            if model is not None:
                model.reshard()

    def clip_gradient(self) -> float:
        return clip_grad_norm_mixed(self.policy.parameters(), self.config.max_grad_norm)

    def policy_state_dict(self) -> Dict[str, torch.Tensor]:
        return get_model_state_dict(self.policy, options=FULL_STATE_SAVE)

    def load_policy_state_dict(self, state: Dict[str, torch.Tensor]):
        set_model_state_dict(self.policy, state, options=FULL_STATE_LOAD)

    def optimizer_state_dict(self) -> dict:
        state = get_optimizer_state_dict(self.policy, self.optimizer, options=FULL_STATE_SAVE)
        return optimizer_state_by_index(self.policy, state) if state else state

    def load_optimizer_state_dict(self, state: dict):
        state = optimizer_state_by_name(self.policy, state)
        set_optimizer_state_dict(self.policy, self.optimizer, state, options=FULL_STATE_LOAD)


def fsdp_shard(model, mesh, block_name: str, mixed_precision: dict):
    """fully_shard each block, then the root; registers `run_in_forward` on the root."""
    for block in find_blocks(model, block_name):
        fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(**mixed_precision))
    # The root's inputs are token ids, or (run_in_forward) a batch whose float tensors, if any,
    # must keep their precision; the blocks cast their own inputs.
    fully_shard(model, mesh=mesh,
                mp_policy=MixedPrecisionPolicy(**mixed_precision, cast_forward_inputs=False))
    model.run_in_forward = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "run_in_forward")
    # FSDP picks its root as the first unit to run forward; run the root once now so that a later
    # direct call of the backbone or a block cannot claim that role.
    with torch.no_grad():
        model.run_in_forward(lambda: None)
    model.reshard()
    return model


def _call(module, fn, *args, **kwargs):
    """A model method that runs `fn`; registered as an FSDP forward method (see FSDPTrainer)."""
    return fn(*args, **kwargs)


def optimizer_state_by_index(model, state: dict) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's full form) keyed by parameter
    index instead, as a plain optimizer.state_dict() is, so checkpoints resume across trainers."""
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {"state": {index[name]: v for name, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]])
                             for g in state["param_groups"]]}


def optimizer_state_by_name(model, state: dict) -> dict:
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                             for g in state["param_groups"]]}


class TensorParallelTrainer(BasicTrainer):
    """Tensor parallelism over all ranks: the attention and MLP projections of every block are
    split column- then row-wise (Megatron-LM's layout), everything else is replicated. Every rank
    sees the same data, so the batch is not split between ranks and metrics are not gathered."""

    splits_batch = False

    def setup_models(self):
        ensure_process_group()
        self.device = local_device()
        self.mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for name in ("policy", "reference_model"):
            model = getattr(self, name)
            if model is not None:
                setattr(self, name, tensor_parallelize(model.to(self.device), self.mesh,
                                                       self.config.model.block_name))
        if self.config.activation_checkpointing:
            enable_activation_checkpointing(self.policy)

    def clip_gradient(self) -> float:
        return clip_grad_norm_mixed(self.policy.parameters(), self.config.max_grad_norm)

    def generation_context(self):
        # Every rank must sample the same tokens: the row-wise layers all-reduce at each step, so
        # ranks that diverged would mix different sequences (or wait on each other forever).
        return seeded_rng(self.seed + self.example_counter, self.device)

    def policy_state_dict(self) -> Dict[str, torch.Tensor]:
        state = get_model_state_dict(self.policy, options=FULL_STATE_SAVE)
        return {k: unfuse_columns(self.policy, k, v) for k, v in state.items()}

    def load_policy_state_dict(self, state: Dict[str, torch.Tensor]):
        state = {k: fuse_columns(self.policy, k, v) for k, v in state.items()}
        set_model_state_dict(self.policy, state, options=FULL_STATE_LOAD)

    def optimizer_state_dict(self) -> dict:
        state = get_optimizer_state_dict(self.policy, self.optimizer, options=FULL_STATE_SAVE)
        if not state:
            return state
        state["state"] = {name: {k: unfuse_columns(self.policy, name, v) for k, v in s.items()}
                          for name, s in state["state"].items()}
        return optimizer_state_by_index(self.policy, state)

    def load_optimizer_state_dict(self, state: dict):
        state = optimizer_state_by_name(self.policy, state)
        state["state"] = {name: {k: fuse_columns(self.policy, name, v) for k, v in s.items()}
                          for name, s in state["state"].items()}
        set_optimizer_state_dict(self.policy, self.optimizer, state, options=FULL_STATE_LOAD)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# Which projections of a block are split how. Llama and GPT-NeoX (and most decoder models) carry
# their plan in transformers' config.base_model_tp_plan ("layers.*.self_attn.q_proj": "colwise",
# ...); GPT-2 has none (its projections are transformers' Conv1D, weights stored in x out, and its
# query/key/value projection is fused), so it gets its own.
GPT2_BLOCK_PLAN = {"attn.c_attn": "colwise_qkv", "attn.c_proj": "rowwise",
                   "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}


def block_tp_plan(model) -> Dict[str, str]:
    """{path inside a block: 'colwise' | 'rowwise' | 'colwise_qkv'}."""
    cfg = model.config
    if cfg.model_type == "gpt2":
        return dict(GPT2_BLOCK_PLAN)
    plan = getattr(cfg, "base_model_tp_plan", None) or {}
    block_plan = {}
    for path, kind in plan.items():
        if "*." not in path:
            continue  # not inside a block (embeddings, norms); those stay replicated
        if kind not in ("colwise", "rowwise"):
            raise ConfigError(f"trainer=TensorParallelTrainer: {cfg.model_type}'s tensor-parallel "
                              f"plan shards {path} as {kind!r}; only colwise/rowwise are supported")
        block_plan[path.split("*.", 1)[1]] = kind
    if not block_plan:
        raise ConfigError(f"trainer=TensorParallelTrainer has no tensor-parallel plan for "
                          f"model_type={cfg.model_type} (supported: llama, gpt_neox, gpt2 and "
                          "models whose transformers config has a base_model_tp_plan); use "
                          "trainer=FSDPTrainer")
    return block_plan


def tensor_parallelize(model, mesh, block_name: str):
    """Split each block's projections over `mesh` (after Megatron-LM: query/key/value, gate/up and
    fc column-wise, the output projections row-wise, so each block needs one all-reduce in
    attention and one in the MLP; docs.pytorch.org/tutorials/intermediate/TP_tutorial.html)."""
    tp = mesh.size()
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ConfigError(f"trainer=TensorParallelTrainer: {heads} attention heads "
                          f"({kv_heads} key/value heads) cannot be split over {tp} processes")
    plan = block_tp_plan(model)
    for block in find_blocks(model, block_name):
        styles = {}
        for path, kind in plan.items():
            module = block.get_submodule(path)
            # The split dimension: output features column-wise, input features row-wise
            # (nn.Linear stores its weight out x in, Conv1D in x out).
            out_dim = 1 if type(module).__name__ == "Conv1D" else 0
            size = module.weight.shape[1 - out_dim if kind == "rowwise" else out_dim]
            if size % tp:
                raise ConfigError(f"trainer=TensorParallelTrainer: {path} has {size} features, "
                                  f"not divisible by {tp} processes")
            styles[path] = tp_style(module, kind)
        parallelize_module(block, mesh, styles)
        if cfg.model_type == "gpt2":
            # GPT-2 splits the fused projection's output at split_size; each rank now holds its
            # own heads' query/key/value, each split_size / tp wide.
            block.attn.split_size //= tp
    # The split parameters were scattered from rank 0; the replicated ones must be identical too.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=0)
    return model


def tp_style(module, kind: str) -> ParallelStyle:
    if type(module).__name__ == "Conv1D":
        return Conv1DParallel(kind)
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    raise ConfigError(f"tensor-parallel style {kind!r} needs a Conv1D module")


class Conv1DParallel(ParallelStyle):
    """Column- or row-wise split of transformers' Conv1D (y = x @ W + b with W stored in x out),
    which torch's ColwiseParallel / RowwiseParallel do not accept (nn.Linear and nn.Embedding
    only). 'colwise_qkv' splits a fused [query | key | value] output so that each rank gets its
    own heads of all three: the columns are reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] before
    an ordinary Shard; the reordering is undone in full state dicts (unfuse_columns)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def _apply(self, module, device_mesh):
        tp = device_mesh.size()
        rowwise = self.kind == "rowwise"

        def partition(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                data = param.data
                if rowwise:
                    placement = Shard(0) if pname == "weight" else Replicate()
                else:
                    dim = 1 if pname == "weight" else 0
                    placement = Shard(dim)
                    if self.kind == "colwise_qkv":
                        order = fused_column_order(data.shape[dim], 3, tp)
                        data = data.index_select(dim, order)
                        mod._tp_fused_columns = (3, tp)
                dt = distribute_tensor(data, mesh, [placement], src_data_rank=self.src_data_rank)
                mod.register_parameter(pname, torch.nn.Parameter(
                    dt, requires_grad=param.requires_grad))

        def prepare_input(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Shard(-1) if rowwise else Replicate()],
                                       run_check=False)
            return x

        def prepare_output(mod, output, mesh):
            want = Replicate() if rowwise else Shard(output.ndim - 1)
            if tuple(output.placements) != (want,):
                output = output.redistribute(placements=[want])
            return output.to_local()

        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


def fused_column_order(width: int, parts: int, tp: int) -> torch.Tensor:
    """Column order [part 0 of rank 0, part 1 of rank 0, ..., part 0 of rank 1, ...] for a width
    made of `parts` equal parts, each split over `tp` ranks."""
    return torch.arange(width).view(parts, tp, width // (parts * tp)).transpose(0, 1).reshape(-1)


def _fused_module(model, name: str):
    module_name, _, pname = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None, None
    fused = getattr(module, "_tp_fused_columns", None)
    return (fused, (1 if pname == "weight" else 0)) if fused else (None, None)


def unfuse_columns(model, name: str, tensor):
    """The plain model's layout of a full tensor (state or optimizer state) of parameter `name`."""
    fused, dim = _fused_module(model, name)
    if fused is None or not torch.is_tensor(tensor) or tensor.ndim <= dim:
        return tensor
    order = fused_column_order(tensor.shape[dim], *fused)
    return tensor.index_select(dim, torch.argsort(order))


def fuse_columns(model, name: str, tensor):
    fused, dim = _fused_module(model, name)
    if fused is None or not torch.is_tensor(tensor) or tensor.ndim <= dim:
        return tensor
    return tensor.index_select(dim, fused_column_order(tensor.shape[dim], *fused))
