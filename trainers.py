"""The training loop (BasicTrainer) and its multi-process variants.

One loop serves every loss: the loss registry entry says which log-probs a step needs (per-sequence,
per-token with position KL, with or without a reference) and turns them into a loss and metrics. The
reference log-probs come from a references.Reference, whatever its kind; checkpoints are written by
checkpoints.py; the multi-process trainers only say how the models are sharded (parallel.py) and
how their full state is gathered.
"""
import contextlib
import functools
import inspect
import json
import math
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import tqdm
from torch.distributed.device_mesh import init_device_mesh
from omegaconf import DictConfig, OmegaConf

import checkpoints
import logps
import losses
import moe
import parallel
import preference_datasets
import references
from utils import (ConfigError, broadcast_object, check_state_dict, get_rng_state, rank0_print,
                   save_hf_format, set_rng_state, start_wandb)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stopped being finite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM stopped training after a step; a checkpoint was saved.

    Attributes:
        signum: the signal received (train.py exits with 128 + signum, as the shell would).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


# ----------------------------------------------------------------------------- the trainer

class SingleProcessPlacement:
    """Where BasicTrainer's models live and how their state is read: the hooks the multi-process
    trainers override (placing and sharding models, clipping, full state dicts, gathering). Uses
    the trainer's config, device, policy, optimizer and ranks."""

    # Whether the processes split each batch between them (data parallelism). train.py reads it
    # too, to check that batch sizes divide before any trainer is built.
    splits_batch = True

    def setup_device(self) -> torch.device:
        """The device models go to (and, for the multi-process trainers, the process group)."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def place(self, model):
        """Naive layer split over several GPUs, else the one device."""
        if torch.cuda.device_count() > 1:
            return parallel.dispatch_across_gpus(model)
        return model.to(self.device)

    def place_policy(self, model):
        model = self.place(model)
        if self.config.activation_checkpointing:
            parallel.enable_activation_checkpointing(model)
        # Inputs go where the embeddings are (the first GPU of a layer split).
        self.device = model.get_input_embeddings().weight.device
        return model

    def place_reference(self, model):
        """(placed model, hook run before each use of it, or None)."""
        return self.place(model), None

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

    @property
    def autocast_dtype(self):
        """The dtype forward passes compute in under torch.autocast (mixed_precision), or None."""
        return MIXED_PRECISION_DTYPES.get(self.config.mixed_precision)

    def autocast(self):
        """Forward passes run in this context: torch.autocast to mixed_precision's dtype (the
        float32 master weights stay as they are), or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def policy_logps(self, fn, *args):
        """Run fn(*args), a computation that calls the policy's backbone and output layer."""
        return fn(*args)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor over the data-parallel ranks."""
        return self.ranks.gather(values)


class BasicTrainer(SingleProcessPlacement):
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
        # Hashed before placing moves or shards it: the reference cache is keyed by it.
        fingerprint = (references.model_fingerprint(reference_model)
                       if config.precompute_ref_log_probs and reference_model is not None else None)
        # Hooks on the backbone that collect an MoE router's load-balancing loss (else inert).
        self.router_loss = moe.RouterLoss(policy, config.router_aux_loss_coef)
        self.device = self.setup_device()
        self.policy = self.place_policy(policy)
        self.ranks = parallel.Ranks(rank, world_size, self.splits_batch, self.device)
        self.reference = self.build_reference(reference_model, fingerprint)
        self.example_counter = 0
        self.batch_counter = 0
        self.run_log = RunLog(self.run_dir, rank, config)
        self.eval_batches = self.build_eval_batches()
        self.check_output_layers()

    def check_output_layers(self):
        """Before training: the chunked output layer must give each model's own log-probs (those
        of its forward) on two evaluation sequences. A model whose head it does not reproduce (not
        a plain linear layer, an unknown transform) is scored from its full logits from then on,
        with one warning line; known transforms (soft-capping, logit scales) are handled anyway."""
        if not self.eval_batches:
            return
        batch = slice_batch(self.eval_batches[0], 0, 2, self.device)
        ids, mask, labels = (batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        chunk = self.config.logps_chunk_size
        models = {"policy": self.policy, "reference model": self.reference.model}
        differ = {}
        for role, model in models.items():
            if model is None or logps.has_logit_transform(model):
                continue
            chunked = functools.partial(self.policy_logps if model is self.policy else _call,
                                        logps.sequence_logps, model, ids, mask, labels, True, chunk)
            error = logps.chunked_logps_error(model, chunked, ids, mask, labels)
            # every rank must take the same path (NaN counts as a difference)
            if self.ranks.any_rank(not error <= chunked_logps_tolerance(model)):
                setattr(model, logps.FULL_LOGITS_ATTR, True)
                differ[role] = error
        if differ:
            names = " and the ".join(differ)
            rank0_print(f"warning: the {names}'s output layer is not a plain linear layer (log-probs "
                        "from hidden states x output weight differ from its own forward's by "
                        f"{max(differ.values()):.3g} per token); scoring from full logits instead "
                        "(exact, but more memory: batch x length x vocabulary)")

    def build_reference(self, model, fingerprint) -> references.Reference:
        """The reference kind the config asks for (references.build_reference decides)."""
        c = self.config
        return references.build_reference(
            self.policy, model, self.place_reference, self.loss.needs_reference(self.loss_args),
            c.logps_chunk_size, c.precompute_ref_log_probs, fingerprint, self.ranks,
            (c.ref_model_mixup_alpha, c.ref_model_sync_steps) if c.sync_ref_model else None,
            {"model": c.model.name_or_path or f"from_config ({c.model.from_config.model_type})",
             "archive": c.model.archive, "merge_archive": c.lora.merge_archive})

    # -- data --------------------------------------------------------------------------------------

    def data_iterator(self, split: str, **kwargs):
        c = self.config
        paths = {name: c.dataset_paths.get(name) for name in c.datasets
                 if name in c.dataset_paths}
        return preference_datasets.get_batch_iterator(
            list(c.datasets), self.tokenizer, split=split, max_length=c.max_length,
            max_prompt_length=c.max_prompt_length, sft_mode=not self.loss.paired, seed=self.seed,
            silent=self.rank != 0, cache_dir=None, paths=paths, **kwargs)

    def build_eval_batches(self) -> List[Dict]:
        c = self.config
        n = dict(n_examples=c.n_eval_examples) if c.n_eval_examples else dict(n_epochs=1)
        return list(self.data_iterator("test", batch_size=c.eval_batch_size, shuffle=False, **n))

    def train_iterator(self, skip_batches=None):
        c = self.config
        # n_examples, when set, takes precedence over n_epochs (see config.yaml).
        length = dict(n_examples=c.n_examples) if c.n_examples else dict(n_epochs=c.n_epochs)
        skip = self.batch_counter if skip_batches is None else skip_batches
        return self.data_iterator("train", batch_size=c.batch_size, shuffle=True, **length,
                                  group_by_length=c.group_by_length, skip_batches=skip)

    def scored_batches(self):
        """(global batch, micro-batches per batch) for every batch that training (the whole
        schedule, from the first batch, whatever a resume skips) and evaluation will score."""
        for batch in self.train_iterator(skip_batches=0):
            yield batch, self.config.gradient_accumulation_steps
        for batch in self.eval_batches:
            yield batch, 1

    def rank_slice(self, batch: Dict, part: int, n_parts: int) -> Dict:
        """This rank's share of micro-batch `part` of `n_parts` of a global batch."""
        size = batch_size_of(batch)
        per_micro = size // n_parts
        per_rank = per_micro // self.ranks.data_parallel_size
        start = part * per_micro + self.ranks.data_rank * per_rank
        return slice_batch(batch, start, start + per_rank, self.device)

    # -- one batch -----------------------------------------------------------------------------

    @property
    def sides(self):
        """The responses a step scores: chosen and rejected, or only the SFT target."""
        return ("chosen", "rejected") if self.loss.paired else ("chosen",)

    def batch_logps(self, batch: Dict) -> Dict[str, torch.Tensor]:
        """The log-probs the loss asks for, keyed as losses.LossSpec.compute expects: (B,) tensors
        policy_{side}, reference_{side} (when the loss needs a reference), {side}_margin and
        {side}_position_kl (token-level losses) and {side}_tokens (counted completion tokens)."""
        spec, args, chunk = self.loss, self.loss_args, self.config.logps_chunk_size
        average = spec.average_log_prob(args)
        public, wpo = spec.sequence_parts(args)
        if public or wpo:  # LD-DPO / WPO: their parts come from the same chunked pass
            reference = self.reference if spec.needs_reference(args) else None
            return logps.pair_parts(self.policy, reference, batch, average, chunk, public, wpo)
        out = {}
        for side in self.sides:
            ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
            if spec.token_level:
                margin, kl, policy = logps.token_level_logps(self.policy, self.reference, ids, mask,
                                                             labels, average, chunk)
                out.update({f"{side}_margin": margin, f"{side}_position_kl": kl})
            else:
                policy = logps.sequence_logps(self.policy, ids, mask, labels, average, chunk)
                if spec.needs_reference(args):
                    out[f"reference_{side}"] = self.reference.sequence_logps(batch, side, average)
            out[f"policy_{side}"] = policy
            out[f"{side}_tokens"] = logps.completion_token_counts(labels, policy.dtype).to(policy.device)
        return out

    def batch_loss(self, batch: Dict, train: bool):
        """(scalar loss, {metric name: list of floats}) for one micro-batch on this rank."""
        with self.autocast(), self.router_loss.collecting():
            logps_ = self.policy_logps(self.batch_logps, batch)
        loss, metrics = self.loss.compute(logps_, self.loss_args, self.loss_state,
                                          gather=self.gather, train=train,
                                          generator=self.loss_generator, rank=self.ranks.data_rank)
        loss, router_metrics = self.router_loss.add_to(loss)  # MoE models only (moe.py)
        split = "train" if train else "eval"
        out = {f"{name}/{split}": self.gather(value.detach().float().reshape(1)).cpu().tolist()
               for name, value in router_metrics.items()}
        for name, value in metrics.items():
            values = self.gather(value.detach().float().reshape(-1).to(self.device))
            out[split_metric_name(name, split)] = values.cpu().tolist()
        out[f"loss/{split}"] = self.gather(loss.detach().float().reshape(1)).cpu().tolist()
        return loss, out

    def train_step(self, batch: Dict) -> Dict[str, float]:
        """One optimizer update over a global batch, with gradient accumulation."""
        start = time.time()
        self.policy.train()
        n_micro = self.config.gradient_accumulation_steps
        metrics = defaultdict(list)
        for part in range(n_micro):
            loss, micro_metrics = self.batch_loss(self.rank_slice(batch, part, n_micro), train=True)
            loss = loss / n_micro
            (self.loss_scaler.scale(loss) if self.loss_scaler else loss).backward()
            for k, v in micro_metrics.items():
                metrics[k].extend(v)
        grad_norm = self.step_optimizer(metrics["loss/train"])
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.reference.after_step(self.policy)
        self.batch_counter += 1
        self.example_counter += batch_size_of(batch)
        out = mean_metrics(metrics)
        out.update({"grad_norm": grad_norm,
                    "examples_per_second": batch_size_of(batch) / (time.time() - start),
                    "counters/examples": self.example_counter,
                    "counters/updates": self.batch_counter})
        return out

    def step_optimizer(self, loss_values: List[float]) -> float:
        """Clip the accumulated gradient and take the optimizer step; returns the gradient norm.
        Under fp16 loss scaling the gradient is unscaled first, and a step whose gradient
        overflowed is skipped (the scaler lowers its scale) instead of counting as divergence."""
        if self.loss_scaler is None:
            grad_norm = self.clip_gradient()
            self.check_finite(loss_values, grad_norm)
            self.optimizer.step()
            return grad_norm
        self.loss_scaler.unscale(self.policy.parameters())
        grad_norm = self.clip_gradient()
        finite = self.loss_scaler.update(grad_norm)
        self.check_finite(loss_values, grad_norm if finite else 0.0)
        if finite:
            self.optimizer.step()
        return grad_norm

    def check_finite(self, loss_values: List[float], grad_norm: float):
        if not all(math.isfinite(v) for v in loss_values) or not math.isfinite(grad_norm):
            # Relaunching this run would diverge again, and lr & co. may not change within it:
            # point at the checkpoint to continue from in a new run directory, if there is one.
            good = checkpoints.newest_checkpoint(self.run_dir) if self.run_dir.is_dir() else None
            fix = "lower lr, raise warmup_steps or lower max_grad_norm"
            where = (f"the last good checkpoint is {good}; {fix} and continue from it with "
                     f"resume_from={good} local_run_dir=NEW_DIR" if good is not None else
                     f"no checkpoint was saved before it; {fix} and start again")
            raise TrainingDiverged(
                f"training diverged at {self.example_counter} examples (loss {loss_values}, "
                f"grad_norm {grad_norm}); {where}")

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, float]:
        """Metrics over the evaluation set (and samples when sample_during_eval), logged; the
        weights must still be finite."""
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
        eval_metrics = mean_metrics(metrics)
        # Never save weights whose evaluation loss is not finite over the last good checkpoint.
        self.check_finite([eval_metrics["loss/eval"]], 0.0)
        eval_metrics.update({"counters/examples": self.example_counter,
                             "counters/updates": self.batch_counter})
        self.run_log.metrics(eval_metrics, self.example_counter)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()
                            if k.startswith(("loss/", "rewards_eval/accuracies", "rewards_eval/margins",
                                             "logps_eval/chosen")))
        rank0_print(f"eval after {self.example_counter} examples: {summary}")
        while self.next_eval <= self.example_counter:
            self.next_eval += self.config.eval_every
        return eval_metrics

    def write_samples(self):
        """Sample from the policy (and reference) for the first n_eval_model_samples eval prompts;
        appended to samples.jsonl in the run directory."""
        records, n_left = [], self.config.n_eval_model_samples
        for batch in self.eval_batches:
            if n_left <= 0:
                break
            part = slice_batch(batch, 0, min(n_left, batch_size_of(batch)), self.device)
            sample = functools.partial(sample_completions, tokenizer=self.tokenizer,
                                       max_length=self.config.max_length, device=self.device,
                                       context=self.generation_context)
            policy_text = sample(self.policy, part)
            reference_text = self.reference.generate(sample, part) or [None] * len(policy_text)
            for prompt, p, r in zip(part["prompt"], policy_text, reference_text):
                records.append({"step": self.example_counter, "prompt": prompt, "policy": p,
                                "reference": r})
            n_left -= len(policy_text)
        self.run_log.samples(records, self.example_counter)

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, name: str, metrics: Dict[str, float], finished: bool = False) -> Optional[Path]:
        """Write {run_dir}/{name}/ atomically: policy, optimizer, scheduler (and whatever the
        reference keeps) and the trainer state needed to resume exactly, plus the resolved config
        (and Hugging Face files for LATEST). debug=true saves nothing.

        Returns:
            The checkpoint's path, or None under debug=true.
        Raises:
            checkpoints.CheckpointWriteError: on every rank, when rank 0 could not write it (the
                partial write is removed, the previous checkpoints are untouched).
        """
        if self.config.debug:
            return None
        rng = self.rng_states()
        sharded = self.config.checkpoint_format == "sharded"
        if sharded:  # every rank writes its own shards of policy and optimizer, nothing gathered
            checkpoints.save_sharded(self.run_dir, name,
                                     parallel.sharded_states(self.policy, self.optimizer),
                                     self.rank, self.ranks.barrier)
        # The reference says what of the policy is kept (LoRA: the adapter only). Sharded
        # checkpoints gather the whole policy only for the exports of the last one.
        policy_state = self.policy_state_dict() if not sharded or finished else None
        states = {} if sharded else {"policy.pt": self.reference.policy_state(policy_state),
                                     "optimizer.pt": self.optimizer_state_dict()}
        reference_states = self.reference.checkpoint_states()  # every rank: may gather shards
        error = None
        if self.rank == 0:
            states["scheduler.pt"] = self.scheduler.state_dict()
            states.update(reference_states)

            def write_extras(tmp: Path):
                OmegaConf.save(self.config, tmp / "config.yaml", resolve=True)
                if finished and self.config.save_hf_format:
                    save_hf_format(self.policy, self.reference.plain_policy_state(policy_state),
                                   self.tokenizer, tmp)
                if finished:
                    self.reference.write_exports(tmp, policy_state)

            try:
                final = checkpoints.write_checkpoint(
                    self.run_dir, name, states, self.example_counter, metrics,
                    self.trainer_state(finished, rng), write_extras, started=sharded)
                checkpoints.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
                rank0_print(f"saved checkpoint to {final}")
            except Exception as e:
                error = e
        if self.ranks.distributed:  # the other ranks must not wait for a save that failed
            message = broadcast_object(None if error is None else str(error))
            if message is not None and error is None:
                error = checkpoints.CheckpointWriteError(message)
        if error is not None:
            raise error
        self.ranks.barrier()
        return self.run_dir / name

    def rng_states(self) -> List[dict]:
        """Every rank's RNG state (CPU generators and its own device's), indexed by rank."""
        own = get_rng_state(self.device)
        if not self.ranks.distributed:
            return [own]
        states = [None] * self.world_size
        dist.all_gather_object(states, own)
        return states

    def trainer_state(self, finished: bool, rng: List[dict]) -> dict:
        return {"example_counter": self.example_counter, "batch_counter": self.batch_counter,
                "next_eval": self.next_eval, "finished": finished, "rng": rng,
                "loss_generator": self.loss_generator.get_state(),
                "loss_state": dict(self.loss_state), "wandb_run_id": self.run_log.wandb_run_id}

    def restore(self, path: Path) -> bool:
        """Load a checkpoint written by `save`; returns whether that run had already finished.

        Raises:
            checkpoints.DamagedCheckpoint: a file could not be read (nothing was loaded).
            ConfigError: the weights do not fit the model (nothing was loaded).
        """
        states, state = self.read_for_restore(path)
        if checkpoints.is_sharded(path):
            loaded = parallel.sharded_states(self.policy, self.optimizer)
            checkpoints.load_sharded(path, loaded)
            parallel.load_sharded_states(self.policy, self.optimizer, loaded)
        else:
            self.load_policy_state_dict(states["policy.pt"])
            optimizer_state = states["optimizer.pt"]  # {} on ranks that did not read it
            self.load_optimizer_state_dict(with_current_kernels(self.optimizer, optimizer_state)
                                           if optimizer_state else optimizer_state)
        self.scheduler.load_state_dict(states["scheduler.pt"])
        self.reference.load_checkpoint_states(
            {k: v for k, v in states.items() if k not in checkpoints.STATE_FILES})
        self.example_counter = state["example_counter"]
        self.batch_counter = state["batch_counter"]
        self.next_eval = state["next_eval"]
        self.loss_state.update(state["loss_state"])
        self.loss_generator.set_state(state["loss_generator"])
        set_rng_state(checkpoints.rng_state_for_rank(state["rng"], self.rank), self.device)
        self.run_log.wandb_run_id = state["wandb_run_id"]
        return state["finished"]

    def read_for_restore(self, path: Path) -> Tuple[dict, dict]:
        """(states, trainer state) of a checkpoint, "policy.pt" already the full state to load
        (reference.policy_state_to_load) and checked against the model. With several processes
        only rank 0 reads the full policy and optimizer states (loading sends each rank its
        shard; the other ranks get {}), and every rank gets rank 0's verdict.

        Raises:
            checkpoints.DamagedCheckpoint, ConfigError: on every rank, as restore says.
        """
        sharded = checkpoints.is_sharded(path)
        big = () if sharded else ("policy.pt", "optimizer.pt")
        names = tuple(n for n in checkpoints.STATE_FILES
                      if n != "policy.pt" and n != "optimizer.pt" or n in big and self.rank == 0)
        out, error = None, None
        try:
            states, state = checkpoints.read_checkpoint(path, names)
            if sharded:
                check_state_dict(self.policy, checkpoints.sharded_policy_shapes(path),
                                 f"checkpoint {path / checkpoints.SHARDED_DIR}")
            else:
                states.setdefault("policy.pt", {})
                states.setdefault("optimizer.pt", {})
                # every rank: the reference may gather shards to complete the saved state
                states["policy.pt"] = self.reference.policy_state_to_load(states["policy.pt"],
                                                                          self.policy)
                if self.rank == 0:
                    check_state_dict(self.policy, states["policy.pt"],
                                     f"checkpoint {path / 'policy.pt'}")
            out = states, state
        except ConfigError as e:
            error = e
        if self.ranks.distributed:
            verdict = broadcast_object(None if error is None else (type(error).__name__, str(error)))
            if verdict is not None and error is None:
                kind = (checkpoints.DamagedCheckpoint if verdict[0] == "DamagedCheckpoint"
                        else ConfigError)
                error = kind(verdict[1])
        if error is not None:
            raise error
        return out

    def resume(self) -> Tuple[Optional[Path], bool]:
        """Restore resume_from, else the newest checkpoint of the run that loads, skipping damaged
        ones with one warning each. Returns (the checkpoint, whether its run had finished), or
        (None, False) to start from scratch.

        Raises:
            checkpoints.DamagedCheckpoint: resume_from is damaged, or no checkpoint is intact.
        """
        candidates = checkpoints.resume_candidates(self.config.resume_from, self.run_dir)
        for path in candidates:
            try:
                finished = self.restore(path)
            except checkpoints.DamagedCheckpoint as e:
                if self.config.resume_from:
                    raise
                rank0_print(f"warning: skipping damaged checkpoint {path}: {e}")
                continue
            if not self.config.resume_from:
                for bad, problem in checkpoints.damaged_newer_than(self.run_dir,
                                                                   self.example_counter):
                    rank0_print(f"warning: checkpoint {bad} is damaged ({problem}); "
                                f"resuming from {path} instead")
            return path, finished
        if candidates:
            raise checkpoints.no_intact_checkpoint(self.run_dir, [(p, "unreadable")
                                                                  for p in candidates])
        return None, False

    # -- the loop ----------------------------------------------------------------------------------

    def build_optimizer(self):
        c = self.config
        self.optimizer = build_torch_optimizer(getattr(torch.optim, c.optimizer),
                                               list(self.policy.parameters()), c.lr)
        # Linear warmup, then constant (DPO repository).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (c.warmup_steps + 1)))
        # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range
        self.loss_scaler = LossScaler(self.optimizer) if c.mixed_precision == "fp16" else None

    def begin(self) -> bool:
        """Optimizer, resume, logs, reference and wandb ready; False when the run already ended."""
        self.build_optimizer()
        self.next_eval = 0 if self.config.do_first_eval else self.config.eval_every
        resume, finished = self.resume()
        if resume is not None:
            rank0_print(f"resuming from {resume} at {self.example_counter} examples "
                        f"({self.batch_counter} updates)")
            if finished:
                rank0_print(f"run in {self.run_dir} already finished; nothing to do")
                return False
        self.run_log.truncate(resume is not None, self.example_counter)
        self.prepare_reference()
        self.run_log.start_wandb()
        return True

    def prepare_reference(self):
        self.reference.prepare(self.scored_batches, self.rank_slice, self.sides)

    def train(self):
        """Train until the data runs out, evaluating (and saving) every eval_every examples.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the step under way was finished and
                saved as step-{examples} (ranks agree on the step to stop after).
        """
        if not self.begin():
            return
        with InterruptFlag() as interrupt:
            last_log = 0.0
            progress = tqdm.tqdm(self.train_iterator(), desc="Training", disable=self.rank != 0,
                                 initial=self.batch_counter)
            for batch in progress:
                if self.example_counter >= self.next_eval:
                    eval_metrics = self.evaluate()
                    if self.example_counter > 0:  # the first evaluation has nothing new to save
                        self.save(f"step-{self.example_counter}", eval_metrics)
                metrics = self.train_step(batch)
                if time.time() - last_log >= self.config.minimum_log_interval_secs:
                    self.run_log.metrics(metrics, self.example_counter)
                    last_log = time.time()
                    progress.set_postfix(loss=f"{metrics['loss/train']:.4f}")
                if self.ranks.any_rank(interrupt.signum is not None):
                    self.stop_interrupted(interrupt.signum or signal.SIGTERM)
            eval_metrics = self.evaluate()
            self.save("LATEST", eval_metrics, finished=True)
        return eval_metrics

    def stop_interrupted(self, signum: int):
        """Save the state after the step just taken and stop (see train)."""
        path = self.save(f"step-{self.example_counter}", {})
        where = (f"checkpoint at {path}, relaunch the same command to resume" if path is not None
                 else "no checkpoint saved (debug=true)")
        raise TrainingInterrupted(f"interrupted at step {self.example_counter} "
                                  f"({self.batch_counter} updates), {where}", signum)


class InterruptFlag:
    """While entered (in the main thread), SIGINT and SIGTERM only set `signum`, so the loop can
    finish its step and save before stopping. A repeat more than REPEAT_SECS after the first
    stops at once (the previous checkpoint stays the newest complete one); a repeat sooner is the
    same signal delivered twice (Ctrl-C reaches torchrun and its workers, and torchrun passes it
    on again) and is ignored."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECS = 2.0

    def __enter__(self):
        self.signum, self.first_at, self.previous = None, None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
        elif time.monotonic() - self.first_at > self.REPEAT_SECS:
            raise TrainingInterrupted("interrupted again before the checkpoint was saved; "
                                      "relaunch the same command to resume from the newest "
                                      "complete checkpoint", signum)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def sample_completions(model, batch: Dict, tokenizer, max_length: int, device, context) -> List[str]:
    """Sampled completions for a batch's prompts (left-padded for generation), decoded; sampled
    inside `context()` (the tensor-parallel trainer seeds it)."""
    ids, mask = left_padded_prompts(batch, tokenizer.pad_token_id)
    with context(), torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_length=max_length, do_sample=True,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def left_padded_prompts(batch: Dict, pad_token_id: int):
    """(input_ids, attention_mask), each (B, W): a batch's prompts left-padded for generation."""
    rows = [ids[mask.bool()] for ids, mask in zip(batch["prompt_input_ids"],
                                                  batch["prompt_attention_mask"])]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


class RunLog:
    """metrics.jsonl, samples.jsonl and wandb of a run; only rank 0 writes.

    Args:
        run_dir: the run directory.
        rank: this process's rank.
        config: the resolved config (wandb settings; sent to wandb with the run).
    """

    def __init__(self, run_dir: Path, rank: int, config: DictConfig):
        self.run_dir, self.rank, self.config = run_dir, rank, config
        # debug=true: "no checkpoints or wandb" (the DPO repository's config)
        self.wandb = config.wandb.enabled and not config.debug and rank == 0
        self.wandb_run_id = None

    def metrics(self, metrics: Dict[str, float], step: int):
        """Append to metrics.jsonl and send the same keys to wandb."""
        if self.rank == 0:
            self.append("metrics.jsonl", [metrics])
        if self.wandb:
            import wandb
            wandb.log(metrics, step=step)

    def samples(self, records: List[dict], step: int):
        if self.rank != 0 or not records:
            return
        self.append("samples.jsonl", records)
        if self.wandb:
            import wandb
            table = wandb.Table(columns=["step", "prompt", "policy", "reference"],
                                data=[[r["step"], r["prompt"], r["policy"], r["reference"]]
                                      for r in records])
            wandb.log({"samples": table}, step=step)

    def append(self, name: str, records: List[dict]):
        with open(self.run_dir / name, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def truncate(self, resumed: bool, example_counter: int):
        """Drop log lines written after the checkpoint being resumed (all of them when starting
        from scratch), so metrics.jsonl and samples.jsonl read as one uninterrupted run."""
        if self.rank != 0:
            return
        for name, key in (("metrics.jsonl", "counters/examples"), ("samples.jsonl", "step")):
            path = self.run_dir / name
            if path.exists():
                kept, unreadable = [], 0
                for line in path.read_text(errors="replace").splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill mid-write
                        unreadable += 1
                        continue
                    if resumed and record[key] <= example_counter:
                        kept.append(line)
                if resumed and unreadable:
                    rank0_print(f"warning: dropped {unreadable} unreadable line(s) of {path} "
                                "(a write cut short, e.g. by a kill)")
                path.write_text("".join(l + "\n" for l in kept))
        checkpoints.remove_partial_writes(self.run_dir)  # left by a crash during a save

    def start_wandb(self):
        """Start (or, with the saved run id, resume) the wandb run: online with credentials,
        offline into RUN/wandb/ without them; never a prompt (utils.start_wandb)."""
        if not self.wandb:
            return
        run = start_wandb(self.config.wandb.entity, self.config.wandb.project,
                          OmegaConf.to_container(self.config, resolve=True), self.run_dir,
                          self.config.exp_name, self.wandb_run_id)
        self.wandb_run_id = run.id


# mixed_precision: the dtype forward and backward compute in (master weights stay float32)
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018, "Mixed Precision Training",
    section 3.3; the defaults of torch.amp.GradScaler): the loss is multiplied by a power of two
    before backward, so that small gradients do not flush to zero in float16, and the gradients
    are divided by it again before clipping. A step whose gradient is not finite is skipped and
    the scale halved; after GROWTH_INTERVAL finite steps in a row it doubles. The scale and the
    count live in the optimizer's first param group, so every trainer saves and restores them
    with the optimizer state (torch's GradScaler keeps per-device overflow flags, which disagree
    between ranks under sharding; the global gradient norm from clip_gradient does not).

    Args:
        optimizer: the policy's optimizer.
    """
    INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 16, 2000

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.group.setdefault("loss_scale", self.INIT_SCALE)
        self.group.setdefault("loss_scale_good_steps", 0)

    @property
    def group(self) -> dict:
        # looked up each time: optimizer.load_state_dict replaces the param group dicts
        return self.optimizer.param_groups[0]

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.group["loss_scale"]

    def unscale(self, parameters):
        inverse = 1.0 / self.group["loss_scale"]  # exact: the scale is a power of two
        with torch.no_grad():
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(inverse)

    def update(self, grad_norm: float) -> bool:
        """Adjust the scale after a step's gradient norm; returns whether to take the step."""
        group = self.group
        if not math.isfinite(grad_norm):
            group["loss_scale"] /= 2
            group["loss_scale_good_steps"] = 0
            rank0_print(f"fp16: gradient overflow, step skipped; loss scale now {group['loss_scale']:g}")
            return False
        group["loss_scale_good_steps"] += 1
        if group["loss_scale_good_steps"] >= self.GROWTH_INTERVAL:
            group["loss_scale"] *= 2
            group["loss_scale_good_steps"] = 0
        return True


def _call(fn, *args):
    return fn(*args)


def chunked_logps_tolerance(model) -> float:
    """How far (per token, in nats) the chunked output layer may be from the model's own forward:
    float32 rounding of differently blocked products, or half-precision rounding."""
    dtype = model.get_output_embeddings().weight.dtype
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


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


# ----------------------------------------------------------------------------- multi-process

class ShardedTrainer(BasicTrainer):
    """What FSDP and tensor parallelism share: one process per device in a process group, a device
    mesh over all ranks, mixed-layout gradient clipping, and full state dicts gathered to rank 0
    (in the plain model's layout, so checkpoints load into a plain model and resume anywhere)."""

    def setup_device(self) -> torch.device:
        parallel.ensure_process_group()
        device = parallel.local_device()
        self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return device

    def clip_gradient(self) -> float:
        return parallel.clip_grad_norm_mixed(self.policy.parameters(), self.config.max_grad_norm)

    def policy_state_dict(self) -> Dict[str, torch.Tensor]:
        return parallel.full_model_state(self.policy)

    def load_policy_state_dict(self, state: Dict[str, torch.Tensor]):
        parallel.load_full_model_state(self.policy, state)

    def optimizer_state_dict(self) -> dict:
        return parallel.full_optimizer_state(self.policy, self.optimizer)

    def load_optimizer_state_dict(self, state: dict):
        parallel.load_full_optimizer_state(self.policy, self.optimizer, state)


class FSDPTrainer(ShardedTrainer):
    """Fully sharded data parallelism with FSDP2: every `model.block_name` block is its own FSDP
    unit, the rest (embeddings, final norm, output layer) forms the root unit; each rank trains on
    batch_size / (gradient_accumulation_steps x world_size) examples per micro-batch.

    Log-probs come from the backbone's hidden states and the output layer's weight, never from the
    model's own forward, so FSDP's root pre-forward hook would not gather the root unit. The
    policy's whole log-prob computation therefore runs as a registered forward method of the root
    (parallel.fsdp_shard), so FSDP gathers the root parameters before it, keeps them for backward
    and reduce-scatters their gradients after it exactly as for a plain forward. The reference
    model has no backward: its root is gathered explicitly before each use and resharded after
    the step."""

    # FSDP casts the parameters itself (MixedPrecisionPolicy), so no autocast on top
    autocast_dtype = None

    def place_policy(self, model):
        # mixed_precision, or model.fsdp_policy_mp, its older FSDP-only name (train.py refuses
        # the two when they disagree)
        legacy = self.config.model.fsdp_policy_mp
        dtype = (MIXED_PRECISION_DTYPES.get(self.config.mixed_precision)
                 or (getattr(torch, legacy) if legacy else None))
        if self.config.activation_checkpointing:
            parallel.enable_activation_checkpointing(model)
        return parallel.fsdp_shard(model, self.mesh, self.config.model.block_name,
                                   parallel.fsdp_mixed_precision(dtype))

    def place_reference(self, model):
        # Inference only, in its own dtype, as the DPO repository shards it.
        model = parallel.fsdp_shard(model, self.mesh, self.config.model.block_name, {})
        return model, model.unshard  # unshard is a no-op while gathered

    def policy_logps(self, fn, *args):
        return self.policy.run_in_forward(fn, *args)

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

    def check_output_layers(self):
        try:
            super().check_output_layers()
        finally:
            self.reshard_roots()

    def reshard_roots(self):
        # Without a backward (evaluation, the reference) FSDP keeps a root unit gathered after
        # forward; free it once the step is over.
        for model in (self.policy, self.reference.model):
            if model is not None:
                model.reshard()


class TensorParallelTrainer(ShardedTrainer):
    """Tensor parallelism over all ranks: the attention and MLP projections of every block are
    split column- then row-wise (Megatron-LM's layout), everything else is replicated. Every rank
    sees the same data, so the batch is not split between ranks and metrics are not gathered."""

    splits_batch = False

    def place(self, model):
        return parallel.tensor_parallelize(model.to(self.device), self.mesh,
                                           self.config.model.block_name)

    def generation_context(self):
        # Every rank must sample the same tokens: the row-wise layers all-reduce at each step, so
        # ranks that diverged would mix different sequences (or wait on each other forever).
        return parallel.seeded_rng(self.seed + self.example_counter, self.device)
