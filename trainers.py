"""The training loop (BasicTrainer) and its multi-process variants.

One loop serves every loss: the loss registry entry says which log-probs a step needs (per-sequence,
per-token with position KL, with or without a reference) and turns them into a loss and metrics. The
reference log-probs come from a references.Reference, whatever its kind; scoring.py asks for the
log-probs, optim.py steps the optimizer, checkpoints.py saves and restores; the multi-process
trainers only say how the models are sharded (parallel.py) and how their full state is gathered.
"""
import contextlib
import functools
import itertools
import json
import math
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import tqdm
from torch.distributed.device_mesh import init_device_mesh
from omegaconf import DictConfig, OmegaConf

import checkpoints
import losses
import moe
import online
import optim
import packing
import parallel
import preference_datasets
import ref_cache
import references
import rewards
import sampling
import scoring
from utils import call, rank0_print, save_hf_format, start_wandb


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


def check_finite(loss_values: List[float], grad_norm: float, step: int, run_dir: Path):
    """Raise TrainingDiverged, naming the checkpoint to continue from, unless every loss value and
    the gradient norm are finite (`step`: examples seen)."""
    if not all(math.isfinite(v) for v in loss_values) or not math.isfinite(grad_norm):
        where = checkpoints.how_to_continue(
            run_dir, "lower lr, raise warmup_steps or lower max_grad_norm")
        raise TrainingDiverged(f"training diverged at {step} examples (loss {loss_values}, "
                               f"grad_norm {grad_norm}); {where}")


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


def gathered_metrics(loss: torch.Tensor, metrics: Dict[str, torch.Tensor],
                     router_metrics: Dict[str, torch.Tensor], split: str, gather, device,
                     extra: Dict[str, float]) -> Dict[str, List[float]]:
    """{metric name: every data-parallel rank's values} for one micro-batch: the loss entry's
    metrics ((B,) or scalar tensors, named by split_metric_name), an MoE router's ("{name}/{split}"),
    the loss ("loss/{split}") and `extra` (named as given); `gather` concatenates a 1-D tensor
    over the ranks."""
    values = {f"{name}/{split}": value.reshape(1) for name, value in router_metrics.items()}
    values.update({split_metric_name(name, split): value.reshape(-1) for name, value in metrics.items()})
    values[f"loss/{split}"] = loss.reshape(1)
    values.update({name: torch.tensor([float(value)]) for name, value in extra.items()})
    return gather_together({k: v.detach().float().to(device) for k, v in values.items()}, gather)


def gather_together(values: Dict[str, torch.Tensor], gather) -> Dict[str, List[float]]:
    """{name: every rank's values, rank after rank} for 1-D tensors of any lengths, in two gathers
    (their lengths, then all their values at once) instead of two per tensor: on a small model an
    FSDP step's time goes to the number of collectives more than to their size."""
    names = list(values)
    flat = torch.cat([values[name] for name in names])
    lengths = gather(torch.tensor([float(values[name].numel()) for name in names], device=flat.device))
    everything, at = gather(flat).cpu().tolist(), 0
    out = {name: [] for name in names}
    for rank_lengths in lengths.view(-1, len(names)).long().tolist():
        for name, n in zip(names, rank_lengths):
            out[name].extend(everything[at:at + n])
            at += n
    return out


def base_model_source(m: DictConfig) -> Dict[str, str]:
    """{"model": the model's name} as a LoRA adapter records it (base_model_name_or_path): the hub
    name, also when the weights came from the packaged GGUF copy that stands for it
    (model.offline_gguf; the copy's file is then under "gguf"), so that
    AutoPeftModelForCausalLM.from_pretrained(adapter) finds the base as for a hub-loaded run."""
    copy = m.offline_gguf
    if copy is not None and m.gguf_file == copy.file and m.name_or_path is not None:
        return {"model": copy.hub_name, "gguf": os.path.join(m.name_or_path, m.gguf_file)}
    return {"model": m.name_or_path or f"from_config ({m.from_config.model_type})"}


def eval_summary(metrics: Dict[str, float]) -> str:
    """The evaluation metrics printed after each evaluation: loss, accuracy, margin, chosen logps."""
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                     if k.startswith(("loss/", "rewards_eval/accuracies", "rewards_eval/margins",
                                      "logps_eval/chosen")))


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

    def build_ranks(self, rank: int, world_size: int) -> parallel.Ranks:
        """This process's place among the ranks (after setup_device)."""
        return parallel.Ranks(rank, world_size, self.splits_batch, self.device)

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

    @property
    def policy_logps(self):
        """How a computation that calls the policy's backbone and output layer runs:
        policy_logps(fn, *args) -> fn(*args), here directly (utils.call, no frame of its own)."""
        return call

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor over the data-parallel ranks."""
        return self.ranks.gather(values)


class BasicTrainer(SingleProcessPlacement):
    """Single-process training on CPU or one GPU; with several visible GPUs the model's layers are
    split across them (the DPO repository's naive model parallelism)."""

    def __init__(self, policy, config: DictConfig, seed: int, run_dir: str, reference_model=None,
                 rank: int = 0, world_size: int = 1, tokenizer=None, processor=None):
        self.config, self.seed, self.rank, self.world_size = config, seed, rank, world_size
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's (vision.build_processor), else None
        self.loss_args = {k: v for k, v in OmegaConf.to_container(config.loss).items() if k != "name"}
        self.loss = losses.get_loss(OmegaConf.to_container(config.loss))
        self.loss_state = self.loss.init_state()
        self.loss_generator = torch.Generator().manual_seed(seed)
        # Hashed before placing moves or shards it: the reference cache is keyed by it. Rank 0's
        # hash for every rank (under FSDP the other ranks' models are on the meta device, no data).
        fingerprint = (parallel.rank0_value(ref_cache.weights_hash, reference_model)
                       if config.precompute_ref_log_probs and reference_model is not None else None)
        # Hooks on the backbone that collect an MoE router's load-balancing loss (else inert).
        self.router_loss = moe.RouterLoss(policy, config.router_aux_loss_coef)
        self.device = self.setup_device()
        self.policy = self.place_policy(policy)
        self.ranks = self.build_ranks(rank, world_size)
        self.reference = self.build_reference(reference_model, fingerprint)
        self.example_counter = 0
        self.batch_counter = 0
        self.run_log = RunLog(self.run_dir, rank, config)
        self.eval_batches = self.build_eval_batches()
        self.uses_layout = False  # set by check_models
        self.check_models()
        self.batch_source = self.build_batch_source()

    def check_models(self):
        """Before training: score each model from its full logits where the chunked output layer
        does not reproduce its forward on two evaluation sequences (scoring.check_output_layers),
        then decide whether batches are laid out with shared prompts / packed rows
        (scoring.check_layout)."""
        if not self.eval_batches:
            return
        c, rows = self.config, slice_batch(self.eval_batches[0], 0, 2, self.device)
        scoring.check_output_layers(self.policy, self.reference.model, self.policy_logps, rows,
                                    c.logps_chunk_size, self.ranks.any_rank)
        public, wpo = self.loss.sequence_parts(self.loss_args)
        if (c.share_prompt or c.packing) and not (public or wpo):  # per-token parts: usual rows
            self.uses_layout = scoring.check_layout(
                self.policy, self.reference.model, self.policy_logps, rows, self.sides,
                self.build_layout, c.max_length, c.logps_chunk_size, self.ranks.any_rank,
                self.loss.token_level)

    def build_layout(self, batch: Dict) -> packing.Layout:
        """The micro-batch laid out as the config says (packing.build_layout)."""
        c = self.config
        return packing.build_layout(batch, self.sides, c.share_prompt, c.packing,
                                    c.packing_row_tokens)

    def lay_out(self, batch: Dict):
        """The forwards that score a micro-batch (packing.lay_out): the config's layout where
        check_models kept it, else the usual one."""
        c, kept = self.config, self.uses_layout
        return packing.lay_out(batch, self.sides, c.share_prompt and kept, c.packing and kept,
                               c.packing_row_tokens)

    def build_reference(self, model, fingerprint) -> references.Reference:
        """The reference kind the config asks for (references.build_reference decides)."""
        c = self.config
        return references.build_reference(
            self.policy, model, self.place_reference, c.logps_chunk_size,
            c.precompute_ref_log_probs, fingerprint, self.ranks,
            reference_sync(c),
            {**base_model_source(c.model), "archive": c.model.archive,
             "merge_archive": c.lora.merge_archive})

    def build_batch_source(self):
        """The data's batches as they are, or (online.enabled) batches of the policy's own answers
        ranked by the `reward` judge (online.OnlineBatches)."""
        c = self.config
        if not c.online.enabled:
            return online.OfflineBatches()
        reward = OmegaConf.to_container(c.reward)
        context = rewards.RewardContext(self.policy, self.reference.model, self.tokenizer, self.device,
                                        OmegaConf.to_container(c.loss), c.eval_batch_size,
                                        c.model.trust_remote_code)
        scorer = rewards.REWARDS[reward.pop("name")].build(reward, context)
        return online.OnlineBatches(
            self.policy, self.tokenizer, scorer,
            {**OmegaConf.to_container(c.online), "gather": self.gathers_for_generation()},
            lambda batch: self.rank_slice(batch, 0, 1), self.ranks, self.autocast,
            c.gradient_accumulation_steps * self.ranks.data_parallel_size,
            (c.max_length, c.max_prompt_length), self.seed, self.run_dir)

    # -- data --------------------------------------------------------------------------------------

    def data_iterator(self, split: str, **kwargs):
        c = self.config
        paths = {name: c.dataset_paths.get(name) for name in c.datasets
                 if name in c.dataset_paths}
        return preference_datasets.get_batch_iterator(
            list(c.datasets), self.tokenizer, split=split, max_length=c.max_length,
            max_prompt_length=c.max_prompt_length, sft_mode=not self.loss.paired, seed=self.seed,
            silent=self.rank != 0, cache_dir=None, paths=paths,
            unpaired_weights=self.loss.unpaired_weights(self.loss_args), processor=self.processor,
            **kwargs)

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

    def length_setting(self) -> str:
        """How long this run trains, as set: 'n_examples=N' or 'n_epochs=N'."""
        c = self.config
        return f"n_examples={c.n_examples}" if c.n_examples else f"n_epochs={c.n_epochs}"

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
        """The responses a step scores: chosen and rejected, or only the SFT target (the entry says)."""
        return self.loss.sides(self.loss_args)

    def batch_loss(self, batch: Dict, train: bool, generator: Optional[torch.Generator] = None):
        """(scalar loss, {metric name: list of floats}) for one micro-batch on this rank; the
        loss draws from `generator` (None: training's, loss_generator)."""
        layouts = self.lay_out(batch)
        with self.autocast(), self.router_loss.collecting():
            logps_ = self.policy_logps(scoring.batch_logps, self.policy, self.reference, batch,
                                       layouts, self.loss, self.loss_args,
                                       self.config.logps_chunk_size)
        generator = self.loss_generator if generator is None else generator
        loss, metrics = self.loss.compute(logps_, self.loss_args, self.loss_state,
                                          gather=self.gather, train=train,
                                          generator=generator, rank=self.ranks.data_rank)
        loss, router_metrics = self.router_loss.add_to(loss)  # MoE models only (moe.py)
        extra = {}
        if train:  # token positions the policy's forward computed, and the padding among them
            computed = sum(layout.input_ids.numel() for layout in layouts)
            extra = {"tokens/padding_fraction": 1.0 - sum(layout.tokens for layout in layouts) / computed,
                     "tokens/computed": computed}
        return loss, gathered_metrics(loss, metrics, router_metrics, "train" if train else "eval",
                                      self.gather, self.device, extra)

    def train_step(self, batch: Dict) -> Dict[str, float]:
        """One optimizer update over a global batch, with gradient accumulation.

        The path of one micro-batch, data to loss (five frames from here to the kernel):
            batch_loss: packing.lay_out(batch) -> [Layout] (the usual layout: one per side,
                each sequence in its own right-padded row; or shared prompts / packed rows);
                it calls scoring.batch_logps through policy_logps, which adds no frame (under
                FSDP, torch's forward hooks of the policy's root run around it)
            scoring.batch_logps: per Layout, packing.model_logps(policy) (or packing.token_kl
                for TDPO) and reference.layout_logps -> the loss's log-probs
            packing.model_logps: the backbone's hidden states, then the chunked output layer
                (logps.TokenLogpFunction) at the scored positions only
            self.loss.compute(log-probs) -> loss and metrics (losses.py)
        """
        start = time.time()
        if batch_size_of(batch) == 0:
            return self.no_update(batch)
        self.policy.train()
        n_micro = self.config.gradient_accumulation_steps
        metrics = defaultdict(list)
        for part in range(n_micro):
            loss, micro_metrics = self.batch_loss(self.rank_slice(batch, part, n_micro), train=True)
            loss = loss / n_micro
            (self.loss_scaler.scale(loss) if self.loss_scaler else loss).backward()
            for k, v in micro_metrics.items():
                metrics[k].extend(v)
        grad_norm = optim.clip_and_step(self.optimizer, self.loss_scaler, self.clip_gradient,
                                        self.policy.parameters,
                                        functools.partial(check_finite, metrics["loss/train"],
                                                          step=self.example_counter,
                                                          run_dir=self.run_dir))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = mean_metrics(metrics)
        out.update({"grad_norm": grad_norm, **self.count_batch(batch),
                    "examples_per_second": batch_size_of(batch) / (time.time() - start),
                    # examples of this batch whose prompt / responses tokenisation cut short
                    "data/truncated_prompts": sum(batch["prompt_truncated"]),
                    "data/truncated_responses": sum(batch["response_truncated"])})
        return out

    def count_batch(self, batch: Dict) -> Dict[str, int]:
        """After a batch: the reference follows (TR-DPO), the counters advance; returns them."""
        self.reference.after_step(self.policy)
        self.batch_counter += 1
        self.example_counter += self.batch_source.examples_in(batch)
        return {"counters/examples": self.example_counter, "counters/updates": self.batch_counter}

    def no_update(self, batch: Dict) -> Dict[str, float]:
        """A batch of no pairs (online: every prompt's answers tied): nothing to learn, no
        optimizer step; the data and the counters move on."""
        return self.count_batch(batch)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, float]:
        """Metrics over the evaluation set (and samples when sample_during_eval), logged; the
        weights must still be finite.

        Its random draws (the samples, beta-DPO's pair selection) are seeded by the run's seed and
        the examples seen, the same on every rank, and leave training's RNG states as they were:
        an evaluation neither depends on the ones before it nor changes training, so a finished
        run extended to more examples (it evaluated where it stopped) trains on exactly as one
        run of the new length, and do_first_eval or eval_every do not change the weights."""
        self.policy.eval()
        seed = self.seed + self.example_counter
        generator = torch.Generator().manual_seed(seed)
        metrics = defaultdict(list)
        with parallel.seeded_rng(seed, self.device):
            for batch in tqdm.tqdm(self.eval_batches, desc="Computing eval metrics",
                                   disable=self.rank != 0, leave=False):
                with torch.no_grad():
                    _, batch_metrics = self.batch_loss(self.rank_slice(batch, 0, 1), train=False,
                                                       generator=generator)
                for k, v in batch_metrics.items():
                    metrics[k].extend(v)
            if self.config.sample_during_eval:
                self.write_samples()
        eval_metrics = mean_metrics(metrics)
        # Never save weights whose evaluation loss is not finite over the last good checkpoint.
        check_finite([eval_metrics["loss/eval"]], 0.0, self.example_counter, self.run_dir)
        eval_metrics.update({"counters/examples": self.example_counter,
                             "counters/updates": self.batch_counter})
        self.run_log.metrics(eval_metrics, self.example_counter)
        rank0_print(f"eval after {self.example_counter} examples: {eval_summary(eval_metrics)}")
        while self.next_eval <= self.example_counter:
            self.next_eval += self.config.eval_every
        return eval_metrics

    def write_samples(self):
        """Sample from the policy (and reference) for the first n_eval_model_samples eval prompts;
        appended to samples.jsonl in the run directory."""
        sample = functools.partial(sampling.sample_texts, tokenizer=self.tokenizer,
                                   max_length=self.config.max_length, device=self.device,
                                   context=self.generation_context, gather=self.gathers_for_generation())
        records = sampling.sample_records(
            self.policy, self.reference, self.eval_batches, self.config.n_eval_model_samples,
            lambda batch, n: slice_batch(batch, 0, n, self.device), sample, self.example_counter)
        self.run_log.samples(records, self.example_counter)

    def gathers_for_generation(self) -> bool:
        """Whether generation gathers an FSDP model's weights once (gather_for_generation); not
        under FSDP x TP, whose tensor-parallel forwards communicate at every step anyway."""
        return self.config.gather_for_generation and self.config.tensor_parallel_size == 1

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
        return checkpoints.save_training(
            self.run_dir, name, self.checkpoint_parts(), self.ranks, self.example_counter, metrics,
            functools.partial(self.trainer_state, finished),
            functools.partial(self.write_extras, finished), self.config.keep_checkpoints,
            self.config.checkpoint_format == "sharded", finished)

    def checkpoint_parts(self) -> checkpoints.TrainingParts:
        return checkpoints.TrainingParts(
            self.policy, self.optimizer, self.scheduler, self.reference, self.policy_state_dict,
            self.optimizer_state_dict, self.load_policy_state_dict, self.load_optimizer_state_dict)

    def write_extras(self, finished: bool, tmp: Path, policy_state: Optional[dict]):
        """Into checkpoint directory `tmp` being written: the resolved config and, for the run's
        last checkpoint, the Hugging Face files (save_hf_format) and the reference's exports."""
        OmegaConf.save(self.config, tmp / "config.yaml", resolve=True)
        if finished and self.config.save_hf_format:
            save_hf_format(self.policy, self.reference.plain_policy_state(policy_state),
                           self.processor or self.tokenizer, tmp)
        if finished:
            self.reference.write_exports(tmp, policy_state)

    def trainer_state(self, finished: bool, rng: List[dict]) -> dict:
        return {"example_counter": self.example_counter, "batch_counter": self.batch_counter,
                "next_eval": self.next_eval, "finished": finished, "rng": rng,
                "loss_generator": self.loss_generator.get_state(),
                "loss_state": dict(self.loss_state), "wandb_run_id": self.run_log.wandb_run_id,
                "batch_source": self.batch_source.state()}

    def restore(self, path: Path) -> bool:
        """Load a checkpoint written by `save`; returns whether that run had already finished.

        Raises:
            checkpoints.DamagedCheckpoint: a file could not be read (nothing was loaded).
            ConfigError: the weights do not fit the model (nothing was loaded).
        """
        state = checkpoints.restore_training(path, self.checkpoint_parts(), self.ranks)
        optim.set_base_lr(self.optimizer, self.scheduler, self.config.lr)
        for counter in ("example_counter", "batch_counter", "next_eval"):
            setattr(self, counter, state[counter])
        self.loss_state.update(state["loss_state"])
        self.loss_generator.set_state(state["loss_generator"])
        self.run_log.wandb_run_id = state["wandb_run_id"]
        self.batch_source.load_state(state.get("batch_source"))  # absent before online training
        return state["finished"]

    # -- the loop ----------------------------------------------------------------------------------

    def build_optimizer(self):
        c = self.config
        # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range
        self.optimizer, self.scheduler, self.loss_scaler = optim.build(
            getattr(torch.optim, c.optimizer), list(self.policy.parameters()), c.lr,
            c.warmup_steps, loss_scaling=c.mixed_precision == "fp16")

    def begin(self) -> Optional[Iterator[Dict]]:
        """Optimizer, resume, logs, reference and wandb ready; returns the training batches still
        to come, or None when the run already ended."""
        self.build_optimizer()
        self.next_eval = 0 if self.config.do_first_eval else self.config.eval_every
        resume, finished = checkpoints.resume(self.config.resume_from, self.run_dir, self.restore,
                                              lambda: self.example_counter)
        batches = self.train_iterator()  # after the restore: it skips the batches already trained
        if resume is not None:
            rank0_print(f"resuming from {resume} at {self.example_counter} examples "
                        f"({self.batch_counter} updates)")
            # A finished run relaunched with a larger n_examples or n_epochs trains on: the data
            # schedule only grows, so the batches it has not seen yet come next, as they would
            # have in one run of the new length.
            first = next(batches, None) if finished else None
            if finished and first is None:
                rank0_print(f"run in {self.run_dir} already finished; nothing to do")
                return None
            if finished:
                rank0_print(f"training further than the finished run, to {self.length_setting()}")
                batches = itertools.chain([first], batches)
        self.run_log.truncate(resume is not None, self.example_counter)
        self.prepare_reference()
        self.run_log.start_wandb()
        return batches

    def prepare_reference(self):
        self.reference.prepare(self.scored_batches, self.rank_slice, self.sides)

    def train(self):
        """Train until the data runs out, evaluating (and saving) every eval_every examples.

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the step under way was finished and
                saved as step-{examples} (ranks agree on the step to stop after).
        """
        data = self.begin()
        if data is None:
            return
        with InterruptFlag() as interrupt:
            last_log = 0.0
            batches = self.batch_source.wrap(data, self.batch_counter)
            progress = tqdm.tqdm(batches, desc="Training", disable=self.rank != 0,
                                 initial=self.batch_counter)
            for batch in progress:
                if self.example_counter >= self.next_eval:
                    eval_metrics = self.evaluate()
                    if self.example_counter > 0:  # the first evaluation has nothing new to save
                        self.save(f"step-{self.example_counter}", eval_metrics)
                metrics = {**self.train_step(batch), **self.batch_source.metrics()}
                if time.time() - last_log >= self.config.minimum_log_interval_secs:
                    self.run_log.metrics(metrics, self.example_counter)
                    last_log = time.time()
                    progress.set_postfix(loss=f"{metrics.get('loss/train', math.nan):.4f}")
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
                path.write_text("".join(line + "\n" for line in kept))
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


def reference_sync(c: DictConfig):
    """(alpha, optimizer steps) of a reference that follows the policy, or None: TR-DPO's
    (sync_ref_model), or iterative DPO's hard copy at each round's start (online.reference_follows)."""
    if c.sync_ref_model:
        return c.ref_model_mixup_alpha, c.ref_model_sync_steps
    if c.online.enabled and c.online.reference_follows:
        return 1.0, c.online.generate_every
    return None


# mixed_precision: the dtype forward and backward compute in (master weights stay float32)
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- multi-process

class ShardedTrainer(BasicTrainer):
    """What FSDP and tensor parallelism share: one process per device in a process group, a device
    mesh over all ranks, mixed-layout gradient clipping, and full state dicts gathered to rank 0
    (in the plain model's layout, so checkpoints load into a plain model and resume anywhere)."""

    def setup_device(self) -> torch.device:
        parallel.ensure_process_group()
        device = parallel.local_device()
        self.mesh = self.device_mesh(device)
        return device

    def device_mesh(self, device: torch.device):
        """The device mesh the model is placed on: one dimension over all ranks."""
        return init_device_mesh(device.type, (dist.get_world_size(),))

    def clip_gradient(self) -> float:
        return parallel.clip_grad_norm_mixed(self.policy.parameters(), self.config.max_grad_norm)

    def same_samples_on_every_rank(self):
        """Sampling under tensor parallelism: every rank must sample the same tokens: the
        row-wise layers all-reduce at each step, so ranks that diverged would mix different
        sequences (or wait on each other forever)."""
        return parallel.seeded_rng(self.seed + self.example_counter, self.device)

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
    batch_size / (gradient_accumulation_steps x world_size) examples per micro-batch. With
    tensor_parallel_size=T (FSDP x TP) each block is first split over T consecutive ranks, which
    share their micro-batch: world_size / T data-parallel ranks split the batch.

    Log-probs come from the backbone's hidden states and the output layer's weight, never from the
    model's own forward, so FSDP's root pre-forward hook would not gather the root unit. The
    policy's whole log-prob computation therefore runs as a registered forward method of the root
    (parallel.fsdp_shard), so FSDP gathers the root parameters before it, keeps them for backward
    and reduce-scatters their gradients after it exactly as for a plain forward. The reference
    model has no backward: its root is gathered explicitly before each use and resharded after
    the step."""

    # FSDP casts the parameters itself (MixedPrecisionPolicy), so no autocast on top
    autocast_dtype = None

    def device_mesh(self, device: torch.device):
        replicate, tp = self.config.fsdp_replicate, self.config.tensor_parallel_size
        if tp > 1:
            # FSDP x TP (torchtitan's layout): tp is the fastest-varying dimension, so each
            # tensor-parallel group is consecutive ranks (one node, fast links) and FSDP shards
            # across the groups.
            dp = dist.get_world_size() // tp
            rank0_print(f"FSDP x TP: {dp} data-parallel groups x {tp} tensor-parallel ranks (each block "
                        "split within a group's ranks and sharded across the groups)")
            return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        if replicate == 1:
            return super().device_mesh(device)
        # HSDP (torchtitan's data_parallel_replicate_degree): 2D, replicate x shard
        shards = dist.get_world_size() // replicate
        rank0_print(f"HSDP: {replicate} replicas x {shards} shards (each block sharded within a "
                    "replica's processes)")
        return init_device_mesh(device.type, (replicate, shards), mesh_dim_names=("replicate", "shard"))

    def place_policy(self, model):
        dtype = MIXED_PRECISION_DTYPES.get(self.config.mixed_precision)
        if self.config.activation_checkpointing:
            parallel.enable_activation_checkpointing(model)
        return self.shard(model, parallel.fsdp_mixed_precision(dtype))

    def place_reference(self, model):
        # Inference only, in its own dtype, as the DPO repository shards it.
        model = self.shard(model, {})
        return model, model.unshard  # unshard is a no-op while gathered

    def shard(self, model, mixed_precision: dict):
        """The model sharded over the mesh; under FSDP x TP split over its "tp" dimension first,
        then sharded over "dp". With several processes only rank 0 built the weights
        (train.build_models builds the other ranks' models on the meta device): each rank takes
        its shards from rank 0."""
        tp = self.config.tensor_parallel_size > 1
        return parallel.fsdp_shard(model, self.mesh["dp"] if tp else self.mesh,
                                   self.config.model.block_name, mixed_precision,
                                   from_rank0=self.world_size > 1,
                                   tp_mesh=self.mesh["tp"] if tp else None)

    def build_ranks(self, rank: int, world_size: int) -> parallel.Ranks:
        # FSDP x TP: a tensor-parallel group's ranks see the same micro-batch; metrics and
        # global-batch losses are gathered over the "dp" dimension only.
        tp = self.config.tensor_parallel_size
        if tp == 1:
            return super().build_ranks(rank, world_size)
        return parallel.Ranks(rank, world_size, True, self.device, tp, self.mesh["dp"].get_group())

    def generation_context(self):
        if self.config.tensor_parallel_size == 1:
            return super().generation_context()
        return self.same_samples_on_every_rank()

    @property
    def policy_logps(self):
        # inside the policy's root forward, so that FSDP's hooks gather and free its weights
        return self.policy.run_in_forward

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

    def check_models(self):
        try:
            super().check_models()
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
        return self.same_samples_on_every_rank()
