"""The training loop (BasicTrainer) and its multi-process variants.

One loop serves every loss: the loss registry entry says which log-probs a step needs (per-sequence,
per-token with position KL, with or without a reference) and turns them into a loss and metrics.
Subclasses only change how models are placed, gradients clipped, state gathered and saved.
"""
import contextlib
import json
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import tqdm
from omegaconf import DictConfig, OmegaConf

import losses
import preference_datasets
from utils import (ConfigError, all_gather_cat, get_rng_state, rank0_print, safe_torch_load,
                   set_rng_state)


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
            self.policy.gradient_checkpointing_enable()
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

    @property
    def data_parallel_size(self) -> int:
        """Processes that split each batch between them (1 under tensor parallelism, where every
        rank sees the same data)."""
        return self.world_size

    @property
    def data_rank(self) -> int:
        return self.rank

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

    def reference_logps(self, batch: Dict, side: str, average: bool) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(self.reference_model, batch[f"{side}_input_ids"],
                                  batch[f"{side}_attention_mask"], batch[f"{side}_labels"],
                                  average, self.config.logps_chunk_size)

    def batch_logps(self, batch: Dict) -> Dict[str, torch.Tensor]:
        """The log-probs the loss asks for, keyed as losses.LossSpec.compute expects."""
        spec, args, chunk = self.loss, self.loss_args, self.config.logps_chunk_size
        average = spec.average_log_prob(args)
        sides = ("chosen", "rejected") if spec.paired else ("chosen",)
        out = {}
        for side in sides:
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
        self.load_optimizer_state_dict(safe_torch_load(str(path / "optimizer.pt"), "resume checkpoint")["state"])
        self.scheduler.load_state_dict(safe_torch_load(str(path / "scheduler.pt"), "resume checkpoint")["state"])
        self.example_counter = state["example_counter"]
        self.batch_counter = state["batch_counter"]
        self.next_eval = state["next_eval"]
        self.loss_state.update(state["loss_state"])
        self.loss_generator.set_state(state["loss_generator"])
        set_rng_state(state["rng"])
        self.wandb_run_id = state["wandb_run_id"]
        self.truncate_metrics_log()
        return state["finished"]

    def truncate_metrics_log(self):
        """Drop lines logged after the checkpoint being resumed, so metrics.jsonl reads as one run."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [l for l in lines if json.loads(l).get("counters/examples", 0) <= self.example_counter]
        path.write_text("".join(l + "\n" for l in kept))

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
        self.optimizer = getattr(torch.optim, c.optimizer)(self.policy.parameters(), lr=c.lr)
        # Linear warmup, then constant (DPO repository).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (c.warmup_steps + 1)))

    def train(self):
        """Train until the data runs out, evaluating every eval_every examples."""
        c = self.config
        self.build_optimizer()
        self.next_eval = 0 if c.do_first_eval else c.eval_every
        resume = self.find_resume_checkpoint()
        if resume is not None:
            finished = self.restore(resume)
            rank0_print(f"resuming from {resume} at {self.example_counter} examples "
                        f"({self.batch_counter} updates)")
            if finished:
                rank0_print(f"run in {self.run_dir} already finished; nothing to do")
                return
        if self.reference_model is not None:
            self.reference_model.eval()
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


def save_hf_format(model, state_dict: Dict[str, torch.Tensor], tokenizer, out_dir: Path):
    """config.json + safetensors weights + tokenizer, loadable with from_pretrained anywhere."""
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    from safetensors.torch import save_file
    # Tied weights share storage; safetensors refuses shared tensors, so store distinct copies of
    # what the model does not tie on load.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tensors = {k: v.contiguous().clone() for k, v in state_dict.items()
               if not (k in tied and model.config.tie_word_embeddings)}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
