"""Entry point: `python -u train.py model=... datasets=[...] loss=... [key=value ...]`.

Validates the whole config before any model is built, writes the resolved config to the run
directory, builds the tokenizer, the policy and (when the loss needs one) the reference model, and
hands them to the trainer named by `trainer`. Multi-process trainers run under torchrun.
"""
import cpu_env  # noqa: F401  (bitwise-reproducible MKL: before torch loads it)

import copy
import gc
import os
import difflib
import math
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import checkpoints
import losses
import parallel
import preference_datasets
import rewards
import trainers
import utils
import vision
from utils import ConfigError

utils.register_resolvers()
# Training frees and re-allocates the same memory every step: keep it in the process instead of
# page-faulting it back each time (utils.keep_freed_memory; MALLOC_* or GLIBC_TUNABLES opts out).
utils.keep_freed_memory()

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")
TRAINERS = ("BasicTrainer", "FSDPTrainer", "TensorParallelTrainer")


# ----------------------------------------------------------------------------- validation

_require = utils.require  # every check below


def _positive_int(config, key: str, allow_none: bool = False):
    value = OmegaConf.select(config, key)
    if value is None and allow_none:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{key}={value!r} must be a positive integer")


def _number(config, key: str, low=None, strict_low=False):
    value = OmegaConf.select(config, key)
    _require(isinstance(value, (int, float)) and not isinstance(value, bool),
             f"{key}={value!r} must be a number")
    _require(math.isfinite(value), f"{key}={value!r} must be a finite number")
    if low is not None:
        bad = value <= low if strict_low else value < low
        _require(not bad, f"{key}={value!r} must be {'>' if strict_low else '>='} {low}")


def _flag(config, key: str):
    value = OmegaConf.select(config, key)
    _require(isinstance(value, bool), f"{key}={value!r} must be true or false")


# transformers' attention implementations (None: its default for the model)
ATTENTION_IMPLEMENTATIONS = (None, "sdpa", "eager", "flex_attention", "flash_attention_2",
                             "flash_attention_3")


def validate_config(config: DictConfig, world_size: int):
    """Refuse a bad config with one line naming the key, the value and what is allowed."""
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}; "
                          f"pass them on the command line, e.g. {missing[0]}=...")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                "max_prompt_length", "eval_every", "n_eval_model_samples", "logps_chunk_size"):
        _positive_int(config, key)
    _require(config.attn_implementation in ATTENTION_IMPLEMENTATIONS,
             f"attn_implementation={config.attn_implementation!r} must be one of "
             f"{', '.join(map(str, ATTENTION_IMPLEMENTATIONS))}")
    for key in ("n_epochs", "n_examples", "n_eval_examples", "keep_checkpoints",
                "packing_row_tokens"):
        _positive_int(config, key, allow_none=True)
    _require(config.n_epochs is not None or config.n_examples is not None,
             "n_epochs and n_examples are both null; set one of them")
    _number(config, "lr", 0, strict_low=True)
    _number(config, "max_grad_norm", 0, strict_low=True)
    _number(config, "minimum_log_interval_secs", 0)
    _require(isinstance(config.warmup_steps, int) and config.warmup_steps >= 0,
             f"warmup_steps={config.warmup_steps!r} must be a non-negative integer")
    # The data order is drawn with NumPy, whose seeds must be non-negative.
    _require(isinstance(config.seed, int) and not isinstance(config.seed, bool) and config.seed >= 0,
             f"seed={config.seed!r} must be a non-negative integer")
    for key in ("do_first_eval", "sample_during_eval", "activation_checkpointing", "debug",
                "group_by_length", "precompute_ref_log_probs", "save_hf_format", "wandb.enabled", "plot",
                "share_prompt", "packing", "gather_for_generation",
                "model.trust_remote_code"):
        _flag(config, key)
    _require(config.max_prompt_length < config.max_length,
             f"max_prompt_length={config.max_prompt_length} must be less than "
             f"max_length={config.max_length}")
    _require(config.trainer in TRAINERS,
             f"trainer={config.trainer} is unknown; use one of {', '.join(TRAINERS)}")
    validate_batch_split(config, world_size)
    optimizer = getattr(torch.optim, str(config.optimizer), None)
    _require(isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer),
             f"optimizer={config.optimizer} is not a torch.optim optimizer class "
             "(e.g. RMSprop, Adam, AdamW, SGD)")
    validate_model_config(config.model)
    _require(not (config.model.vision and config.trainer == "TensorParallelTrainer"),
             "model.vision=true with trainer=TensorParallelTrainer is not supported (its plans shard "
             "language models only); use BasicTrainer or FSDPTrainer")
    validate_mixed_precision(config)
    validate_datasets(config)
    try:
        losses.validate_loss_args(OmegaConf.to_container(config.loss))
    except ValueError as e:
        raise ConfigError(str(e))
    validate_loss_combination(config)
    validate_reference_options(config)
    validate_online(config)
    _require(config.checkpoint_format in ("full", "sharded") and (
        config.checkpoint_format == "full" or config.trainer == "FSDPTrainer"),
        f"checkpoint_format={config.checkpoint_format} must be full, or sharded with "
        f"trainer=FSDPTrainer (trainer={config.trainer})")
    if config.resume_from is not None:
        _require(Path(config.resume_from).is_dir(),
                 f"resume_from={config.resume_from} is not a directory")


def validate_batch_split(config: DictConfig, world_size: int):
    """The batches split evenly into micro-batches and processes, and HSDP's replicas divide them."""
    validate_tensor_parallel_size(config, world_size)
    # Tensor parallelism splits the model, not the batch: every rank of a tensor-parallel group
    # sees the same rows (TensorParallelTrainer: one group of all processes).
    data_procs = (world_size // config.tensor_parallel_size
                  if getattr(trainers, config.trainer).splits_batch else 1)
    per_update = config.gradient_accumulation_steps * data_procs
    _require(config.batch_size % per_update == 0,
             f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps "
             f"({config.gradient_accumulation_steps}) x processes ({data_procs}) = {per_update}")
    _require(config.eval_batch_size % data_procs == 0,
             f"eval_batch_size={config.eval_batch_size} must be divisible by the number of "
             f"processes ({data_procs})")
    _positive_int(config, "fsdp_replicate")
    _require(config.fsdp_replicate == 1 or (config.trainer == "FSDPTrainer"
                                             and world_size % config.fsdp_replicate == 0),
             f"fsdp_replicate={config.fsdp_replicate} needs trainer=FSDPTrainer and a number of processes "
             f"it divides (trainer={config.trainer}, {world_size} processes)")


def validate_tensor_parallel_size(config: DictConfig, world_size: int):
    """tensor_parallel_size (FSDP x TP): FSDPTrainer only, dividing the processes, without HSDP."""
    _positive_int(config, "tensor_parallel_size")
    tp = config.tensor_parallel_size
    if tp == 1:
        return
    _require(config.trainer == "FSDPTrainer",
             f"tensor_parallel_size={tp} combines tensor parallelism with trainer=FSDPTrainer; "
             f"trainer={config.trainer} "
             + ("already splits every block over all processes: drop tensor_parallel_size"
                if config.trainer == "TensorParallelTrainer" else "runs one process: use trainer=FSDPTrainer"))
    _require(world_size % tp == 0, f"tensor_parallel_size={tp} must divide the number of processes "
             f"({world_size}); launch a multiple of {tp} processes")
    _require(config.fsdp_replicate == 1, f"tensor_parallel_size={tp} with fsdp_replicate="
             f"{config.fsdp_replicate} (a 3D mesh) is not supported; set one of them to 1")
    for bad, why in ((config.model.vision, "model.vision=true (the plans split language models only)"),
                     (config.lora.r is not None, "lora.r (use tensor_parallel_size=1 for LoRA)"),
                     (config.online.enabled, "online.enabled=true")):
        _require(not bad, f"tensor_parallel_size={tp} is not supported with {why}")


def validate_tensor_parallel_plan(config: DictConfig):
    """Under FSDP x TP, the model has a tensor-parallel plan that splits its heads over
    tensor_parallel_size ranks: checked on its transformers config, before any weights load."""
    tp, m = config.tensor_parallel_size, config.model
    if tp == 1:
        return
    if m.from_config is not None:
        import transformers
        settings = OmegaConf.to_container(m.from_config)
        try:
            model_config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
        except Exception as e:  # transformers' checks of the settings (ValueError, huggingface_hub's)
            raise ConfigError(f"model.from_config: {str(e).strip().splitlines()[-1].strip()}") from None
    else:
        model_config = utils.load_model_config(m.name_or_path, m.gguf_file, m.trust_remote_code)
    parallel.check_tensor_parallel(model_config, tp, f"tensor_parallel_size={tp}")
    # GPT-2's fused query/key/value columns are reordered per tensor-parallel rank
    # (parallel.Conv1DParallel); full state dicts undo it, torch.distributed.checkpoint would not.
    _require(model_config.model_type != "gpt2" or config.checkpoint_format == "full",
             f"tensor_parallel_size={tp} with a gpt2 model and checkpoint_format=sharded is not supported "
             "(its fused attention columns are stored reordered); use checkpoint_format=full")


def validate_model_config(model: DictConfig):
    utils.get_dtype("model.policy_dtype", model.policy_dtype)
    utils.get_dtype("model.reference_dtype", model.reference_dtype)
    _require(model.name_or_path is not None or model.from_config is not None,
             "model.name_or_path is null and model.from_config is null; set one of them")
    if model.from_config is not None:
        _require("model_type" in model.from_config,
                 "model.from_config needs a model_type (e.g. llama, gpt_neox, gpt2)")
    if model.gguf_file is not None:
        _require(model.from_config is None and model.name_or_path is not None,
                 f"model.gguf_file={model.gguf_file} needs model.name_or_path (the directory or "
                 "hub repository holding it) and model.from_config=null")
        if os.path.isdir(model.name_or_path):
            _require(os.path.isfile(os.path.join(model.name_or_path, model.gguf_file)),
                     f"model.gguf_file={model.gguf_file} is not a file in "
                     f"model.name_or_path={model.name_or_path}")
    if model.offline_gguf is not None:
        _require(set(model.offline_gguf) == {"package", "file", "install", "hub_name"},
                 f"model.offline_gguf needs exactly package, file, install and hub_name, got "
                 f"{sorted(model.offline_gguf)}")
    if model.archive is not None:
        utils.resolve_policy_file(model.archive, "model.archive")
    for key in ("vision", "freeze_vision"):
        _require(isinstance(model[key], bool), f"model.{key}={model[key]!r} must be true or false")
    if model.vision:
        _require(model.gguf_file is None, "model.vision=true: GGUF files hold language models only; set "
                 "model.gguf_file=null")
        model_type = model.from_config.model_type if model.from_config is not None else "llava"
        _require(model_type == "llava",
                 f"model.vision=true with model.from_config.model_type={model_type}: a processor is "
                 "built from a config for llava only; load another family with model.name_or_path "
                 "(see docs/vision.md)")


def validate_mixed_precision(config: DictConfig):
    mp, model = config.mixed_precision, config.model
    allowed = ", ".join(trainers.MIXED_PRECISION_DTYPES)
    _require(mp is None or mp in trainers.MIXED_PRECISION_DTYPES,
             f"mixed_precision={mp} must be null, {allowed.replace(', ', ' or ')}")
    legacy = model.get("fsdp_policy_mp")  # a model preset written for the DPO repository
    _require(legacy is None, f"model.fsdp_policy_mp={legacy} in the model preset is the older name of "
             f"mixed_precision; remove it and set mixed_precision="
             f"{LEGACY_MIXED_PRECISION.get(str(legacy), 'bf16')}")
    if mp is None:
        return
    _require(model.policy_dtype == "float32",
             f"mixed_precision={mp} keeps float32 master weights, but model.policy_dtype="
             f"{model.policy_dtype}; set model.policy_dtype=float32 (or mixed_precision=null for "
             f"pure {model.policy_dtype})")


def validate_datasets(config: DictConfig):
    _require(len(config.datasets) > 0, "datasets=[] is empty; name at least one dataset")
    registered = preference_datasets.DATASETS
    paths = {name: path for name, path in config.dataset_paths.items() if path is not None}
    for name in config.datasets:
        _require(name in registered or name in paths or _local_path_exists(name, os.path.isfile),
                 f"datasets: unknown dataset {name!r}; use one of {', '.join(sorted(registered))}, "
                 f"the path of a local {preference_datasets.SUPPORTED_FORMATS} file with "
                 "prompt/chosen/rejected columns, or prompt/completion/label for loss=kto (a {split} in "
                 "the path stands for train and test), "
                 f"or set dataset_paths.{name}=PATH")
    for name, path in paths.items():
        _require(_local_path_exists(path, os.path.exists),
                 f"dataset_paths.{name}={path} does not exist")
    # a file's format is known from its name: refuse an unreadable one now, before anything is built
    local = [("datasets", name) for name in config.datasets
             if name not in registered and name not in paths]
    local += [(f"dataset_paths.{name}", path) for name, path in paths.items()]
    for label, path in local:
        for split in ("train", "test"):
            file = str(path).replace("{split}", split)
            _require(not os.path.isfile(file) or preference_datasets.data_suffix(file) is not None,
                     f"{label}: {preference_datasets.unsupported_format_message(file)}")


def _local_path_exists(path, exists) -> bool:
    """A local path, where '{split}' stands for both the train and the test file."""
    path = str(path)
    if "{split}" not in path:
        return exists(path)
    return all(exists(path.replace("{split}", split)) for split in ("train", "test"))


def validate_loss_combination(config: DictConfig):
    spec = losses.get_loss(OmegaConf.to_container(config.loss))
    if spec.unpaired_weights(OmegaConf.to_container(config.loss)) is not None:
        for key in ("batch_size", "eval_batch_size"):
            _require(config[key] >= 2, f"{key}={config[key]}: loss={config.loss.name} needs at least 2 "
                     "examples per batch (both labels, and other examples' completions for its KL "
                     "estimate); raise it")
    if config.precompute_ref_log_probs:
        args = OmegaConf.to_container(config.loss)
        _require(spec.needs_reference(args) and not spec.token_level,
                 f"precompute_ref_log_probs=true needs a loss that scores sequences with a "
                 f"reference model; loss={config.loss.name} "
                 f"{'needs per-position reference logits' if spec.token_level else 'uses none'}")


# Modules LoRA must leave alone: log-probs read the output layer's weight directly (logps.py), so
# an adapter on it (or on the embeddings it may be tied to) would be silently skipped.
LORA_UNADAPTABLE = ("lm_head", "embed_out", "embed_tokens", "wte", "wpe")


def validate_reference_options(config: DictConfig):
    """lora.*, sync_ref_model and router_aux_loss_coef (README "LoRA", "TR-DPO", "Mixture of experts")."""
    lo = config.lora
    if lo.r is None:
        for key in ("reference_adapter", "merge_archive", "modules_to_save", "target_modules"):
            _require(lo[key] is None, f"lora.{key}={lo[key]} needs lora.r (e.g. lora.r=8); "
                     "lora.r=null trains the whole model")
    else:
        _positive_int(config, "lora.r")
        _number(config, "lora.alpha", 0, strict_low=True)
        _number(config, "lora.dropout", 0)
        _require(lo.dropout < 1, f"lora.dropout={lo.dropout} must be below 1")
        _require(config.trainer != "TensorParallelTrainer",
                 "lora.r with trainer=TensorParallelTrainer is not supported; use BasicTrainer "
                 "or FSDPTrainer")
        for key in ("target_modules", "modules_to_save"):
            names = list(lo[key] or [])
            _require(lo[key] is None or len(names) > 0, f"lora.{key}=[] is empty; use null")
            bad = [n for n in names if str(n).split(".")[-1] in LORA_UNADAPTABLE]
            _require(not bad, f"lora.{key}: {bad} cannot be adapted (log-probs read the output "
                     "layer and embeddings directly); leave them out")
        for key in ("reference_adapter", "merge_archive"):
            path = lo[key]
            _require(path is None or os.path.isfile(os.path.join(str(path), "adapter_config.json")),
                     f"lora.{key}={path} is not a PEFT adapter directory (no adapter_config.json); "
                     "pass e.g. an earlier LoRA run's LATEST/adapter")
    _flag(config, "sync_ref_model")
    _number(config, "ref_model_mixup_alpha", 0, strict_low=True)
    _require(config.ref_model_mixup_alpha <= 1,
             f"ref_model_mixup_alpha={config.ref_model_mixup_alpha} must be in (0, 1]")
    _positive_int(config, "ref_model_sync_steps")
    if config.sync_ref_model:
        _require(not config.precompute_ref_log_probs,
                 "sync_ref_model=true needs a live reference that follows the policy; "
                 "precompute_ref_log_probs=true caches a fixed one: set one of them to false")
        spec = losses.get_loss(OmegaConf.to_container(config.loss))
        _require(spec.needs_reference(OmegaConf.to_container(config.loss)),
                 f"sync_ref_model=true: loss={config.loss.name} uses no reference model")
    if config.router_aux_loss_coef is not None:
        _number(config, "router_aux_loss_coef", 0)


def validate_online(config: DictConfig):
    """online.* and the `reward` judge (docs/online.md), refused before any model loads."""
    _flag(config, "online.enabled")
    if not config.online.enabled:
        return
    o, args = config.online, OmegaConf.to_container(config.loss)
    spec = losses.get_loss(args)
    _require(spec.paired and spec.unpaired_weights(args) is None,
             f"online.enabled=true trains on pairs of the policy's answers; loss={config.loss.name} is "
             "not a paired loss: use a paired one (e.g. loss=dpo), or online.enabled=false")
    _require(isinstance(o.samples_per_prompt, int) and not isinstance(o.samples_per_prompt, bool)
             and o.samples_per_prompt >= 2, f"online.samples_per_prompt={o.samples_per_prompt!r} must be "
             "an integer >= 2 (a best and a worst answer per prompt)")
    for key in ("online.max_new_tokens", "online.generate_every"):
        _positive_int(config, key)
    _number(config, "online.temperature", 0, strict_low=True)
    _number(config, "online.top_p", 0, strict_low=True)
    _require(o.top_p <= 1, f"online.top_p={o.top_p} must be in (0, 1]")
    room = config.max_length - config.max_prompt_length
    _require(o.max_new_tokens <= room, f"online.max_new_tokens={o.max_new_tokens} does not fit in max_length - "
             f"max_prompt_length = {room}; lower it or raise max_length")
    _flag(config, "online.reference_follows")
    for bad, why in ((config.trainer == "TensorParallelTrainer", "trainer=TensorParallelTrainer"),
                     (config.precompute_ref_log_probs, "precompute_ref_log_probs=true (new answers "
                      "every step: nothing to cache)"),
                     (o.reference_follows and config.sync_ref_model, "online.reference_follows=true "
                      "with sync_ref_model=true (two ways to move the reference; pick one)"),
                     (o.reference_follows and not spec.needs_reference(args), "online.reference_follows"
                      f"=true with loss={config.loss.name}, which uses no reference")):
        _require(not bad, f"online.enabled=true is not supported with {why}")
    validate_judge(config)


def validate_judge(config: DictConfig):
    """The `reward` judge exists, has its keys, and can score the datasets' prompts."""
    try:
        rewards.check_reward_config(OmegaConf.to_container(config.reward))
    except ConfigError as e:
        raise ConfigError(f"{e} (the judge of online.enabled=true)")
    spec = rewards.REWARDS[config.reward.name]
    others = [str(d) for d in config.datasets if spec.datasets is not None and d not in spec.datasets]
    _require(not others, f"reward={spec.name} scores only the prompts of {', '.join(spec.datasets or ())}, "
             f"not those of {', '.join(others)}: use reward=reward_model, judge or implicit for them")
    _require(spec.name != "implicit" or config.reward.checkpoint is not None,
             "reward=implicit judges online answers with a trained DPO checkpoint's implicit reward: pass "
             "reward.checkpoint=RUN/LATEST (the policy being trained, against its own start, scores all "
             "its answers alike)")


# ----------------------------------------------------------------------------- building

def build_models(config: DictConfig, tokenizer):
    """The policy and, when the loss needs one, the reference model (same initial weights).

    Under trainer=FSDPTrainer with several processes only rank 0 builds them with their weights
    (and loads and checks model.archive); the other ranks build the same architectures on the
    meta device, which holds no data, and FSDPTrainer gives every rank its shards of rank 0's
    weights once sharded (parallel.fsdp_shard). A node so holds about one copy of the model at
    start-up, not one per process.

    Returns:
        (policy, reference model or None).
    """
    if config.trainer != "FSDPTrainer" or utils.world_size() == 1:
        return with_attention(config, *build_whole_models(config, tokenizer))
    return with_attention(config, *build_models_from_rank0(config, tokenizer))


def with_attention(config: DictConfig, policy, reference):
    """The models with the attention implementation `attn_implementation` names (null: keep
    transformers' choice, SDPA where the model has it)."""
    if config.attn_implementation is not None:
        for model in (policy, reference):
            if model is not None:
                try:
                    model.set_attn_implementation(config.attn_implementation)
                except (ValueError, ImportError) as e:
                    raise ConfigError(f"attn_implementation={config.attn_implementation}: "
                                      f"{str(e).splitlines()[0]}; set attn_implementation=null "
                                      "(transformers' default) or sdpa") from None
    return policy, reference


def build_models_from_rank0(config: DictConfig, tokenizer):
    """build_models under FSDP with several processes (see build_models)."""
    models, plan = (None, None), None
    if torch.distributed.get_rank() == 0:
        try:
            models = build_whole_models(config, tokenizer)
        except Exception as e:
            # the other ranks wait for the plan below: send them the reason instead of letting
            # them hang
            utils.broadcast_object({"error": str(e) if isinstance(e, ConfigError) else None})
            raise
        plan = {"configs": [None if m is None else m.config for m in models],
                "generation": [None if m is None else m.generation_config for m in models],
                "rng": utils.get_rng_state()}
    plan = utils.broadcast_object(plan)
    if torch.distributed.get_rank() == 0:
        return models
    if "error" in plan:
        raise ConfigError(plan["error"]) if plan["error"] is not None else RuntimeError(
            "rank 0 failed to build the models (its traceback says why)")
    return build_meta_models(config, plan)


def build_meta_models(config: DictConfig, plan: dict):
    """Ranks > 0 under FSDP: rank 0's architectures, LoRA layers included, on the meta device.
    No weights are read; rank 0 alone loads and checks model.archive.

    Args:
        plan: from rank 0: "configs", the policy's and reference's transformers configs (None:
            no reference); "generation", their generation configs (a reference copied from the
            policy keeps the policy's, e.g. use_cache, which its config alone would not give:
            ranks that decode differently run different tensor-parallel all-reduces); "rng",
            the RNG states after building (every rank continues from the same ones, as if it had
            built too).
    """
    m = config.model
    dtypes = (utils.get_dtype("model.policy_dtype", m.policy_dtype),
              utils.get_dtype("model.reference_dtype", m.reference_dtype))
    with torch.device("meta"):
        policy, reference = (
            None if model_config is None else utils.model_class(m.vision).from_config(
                model_config, dtype=dtype, trust_remote_code=m.trust_remote_code)
            for model_config, dtype in zip(plan["configs"], dtypes))
        if m.vision and m.freeze_vision:
            vision.freeze(policy)
        for model, generation in zip((policy, reference), plan["generation"]):
            if model is not None:
                model.generation_config = generation
                utils.disable_dropout(model)
        if reference is not None:
            reference.requires_grad_(False)
        if config.lora.r is not None:
            # peft's new layers are created on the meta device too (inside this block)
            policy = build_lora_policy(config, policy,
                                       losses.get_loss(OmegaConf.to_container(config.loss)))
    utils.set_rng_state(plan["rng"])
    return policy, reference


def build_whole_models(config: DictConfig, tokenizer):
    """build_models in one process: the models with their weights (see build_models)."""
    spec = losses.get_loss(OmegaConf.to_container(config.loss))
    m = config.model
    from_config = OmegaConf.to_container(m.from_config) if m.from_config is not None else None
    policy_dtype = utils.get_dtype("model.policy_dtype", m.policy_dtype)
    reference_dtype = utils.get_dtype("model.reference_dtype", m.reference_dtype)
    utils.set_seed(config.seed)
    policy = utils.build_model(m.name_or_path, from_config, tokenizer, policy_dtype,
                               m.trust_remote_code, gguf_file=m.gguf_file, vision=m.vision)
    utils.disable_dropout(policy)
    if m.vision and m.freeze_vision:
        utils.rank0_print(f"model.freeze_vision: {vision.freeze(policy):,} vision parameters frozen")
    reference = None
    # With LoRA the reference is the policy with its adapter off: no second model.
    if spec.needs_reference(OmegaConf.to_container(config.loss)) and config.lora.r is None:
        if from_config is not None or m.gguf_file is not None:
            # the same weights; a GGUF file would be dequantised a second time for nothing
            reference = copy.deepcopy(policy).to(reference_dtype)
        else:
            reference = utils.build_model(m.name_or_path, None, tokenizer, reference_dtype,
                                          m.trust_remote_code, vision=m.vision)
        utils.disable_dropout(reference)
        reference.requires_grad_(False)
    if m.archive is not None:
        state = checkpoints.load_policy_archive(m.archive, "model.archive")
        source = f"model.archive={m.archive}"
        for model in (policy, reference):
            if model is not None:
                utils.load_checked_state_dict(model, state, source)
        utils.rank0_print(f"loaded model.archive {utils.resolve_policy_file(m.archive)}")
    if config.lora.r is not None:
        policy = build_lora_policy(config, policy, spec)
    return policy, reference


def build_lora_policy(config: DictConfig, policy, spec):
    """The policy with lora.merge_archive merged into its weights and a fresh adapter on top (and
    the frozen reference adapter, when one is asked for or TR-DPO syncs one)."""
    import lora  # imports peft: only when lora.r is set
    lo = config.lora
    if lo.merge_archive is not None:
        policy = lora.merge_adapter(policy, lo.merge_archive)
        utils.rank0_print(f"merged lora.merge_archive {lo.merge_archive} into the base weights")
    needs_reference = spec.needs_reference(OmegaConf.to_container(config.loss))
    targets = OmegaConf.to_container(lo.target_modules) if lo.target_modules else None
    if targets is None and config.model.vision:  # the language model's projections only
        targets = vision.language_model_targets(
            lora.default_target_modules(policy.config.get_text_config().model_type))
    return lora.apply_lora(policy, lo.r, lo.alpha, lo.dropout, targets,
                           OmegaConf.to_container(lo.modules_to_save) if lo.modules_to_save else None,
                           lo.reference_adapter,
                           copy_as_reference=trainers.reference_sync(config) is not None
                           and needs_reference)


# ----------------------------------------------------------------------------- run directories

# The settings that may differ when a run is relaunched into its own local_run_dir (and resumes):
# how long to train, how to evaluate, log and checkpoint, and how the run is launched, never what
# is trained. Any other difference is refused by check_relaunch. README "Resuming" lists the same.
RESUMABLE_KEYS = (
    "n_examples", "n_epochs",  # to train longer
    "eval_every", "n_eval_examples", "n_eval_model_samples", "sample_during_eval", "wandb",
    "minimum_log_interval_secs", "keep_checkpoints", "save_hf_format", "debug", "plot",
    # where a checkpoint goes, not what is trained: resume reads whichever format is on disk
    "checkpoint_format",
    # Launch settings: the directory itself (a moved run directory keeps its old path in its
    # saved config), what names it and the wandb run (local_dirs, exp_name), the rendezvous port
    # of a single-command multi-GPU launch, the checkpoint to start from, and the trainer (all
    # three save full state dicts, so a run resumes under any of them).
    "local_run_dir", "local_dirs", "exp_name", "fsdp_port", "resume_from", "trainer",
    "fsdp_replicate", "tensor_parallel_size",  # how FSDPTrainer arranges its processes, as the trainer is
    # How a step's sequences are laid out and attended, not what is trained (the same log-probs
    # up to float rounding, tests/test_packing.py).
    "share_prompt", "packing", "packing_row_tokens", "attn_implementation",
    "gather_for_generation",  # how FSDP's processes hold the weights while sampling: the same samples
)


def check_run_dir(config: DictConfig) -> bool:
    """Before any model is built: refuse a local_run_dir that cannot hold this run, and say so
    when the run to resume has already finished and this config would train no further.

    Returns:
        True to go on and train; False when there is nothing to do (the message is printed).
    Raises:
        ConfigError: an unusable or busy directory, or a relaunch that changes what is trained.
    """
    run_dir = Path(config.local_run_dir)
    utils.check_run_dir_usable(config.local_run_dir, "local_run_dir")
    utils.check_run_dir_unlocked(run_dir, "local_run_dir")
    own = checkpoints.newest_checkpoint(run_dir) if run_dir.is_dir() else None
    saved = own / "config.yaml" if own is not None else run_dir / "config.yaml"
    if saved.is_file():
        check_relaunch(config, saved, own)
    resume = checkpoints.resume_checkpoint(config.resume_from, run_dir)
    if resume is None:
        return True
    option = f"resume_from={config.resume_from}" if config.resume_from else f"run in {run_dir}"
    state = utils.safe_torch_load(str(resume / checkpoints.TRAINER_STATE),
                                  "resume_from" if config.resume_from else "checkpoint")
    trained = state["example_counter"]
    if state["finished"] and not trains_further(config, resume / "config.yaml", trained):
        if not _verifies(resume):  # the trainer skips it with a warning and resumes before it
            return True
        utils.rank0_print(
            f"{option} is complete: {trained} examples trained, final weights in "
            f"{resume / 'policy.pt'}; to train further, relaunch with more examples, e.g. "
            f"n_examples={2 * trained}")
        return False
    return True


def _verifies(checkpoint: Path) -> bool:
    """Whether a finished checkpoint's files match their content hashes (one without a manifest,
    written before hashes, counts as matching): a damaged one is not reported complete."""
    try:
        checkpoints.verify_files(checkpoint)
    except checkpoints.DamagedCheckpoint:
        return False
    return True


def check_relaunch(config: DictConfig, saved: Path, checkpoint: Optional[Path]):
    """Refuse, in one line, a relaunch into a run directory whose run was trained with other
    settings than `config`, naming each changed key with both values and the ways out."""
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    new = OmegaConf.to_container(config, resolve=True)
    changes = utils.changed_settings(old, new, RESUMABLE_KEYS)
    if not changes:
        return
    listed = ", ".join(f"{key}: {a} -> {b}" for key, a, b in changes)
    run_dir = config.local_run_dir
    if checkpoint is not None:
        way_out = (f"start a new run in a new local_run_dir=PATH, or continue from its weights in a "
                   f"new directory with resume_from={checkpoint} local_run_dir=NEW_PATH")
    else:
        way_out = f"start a new run in a new local_run_dir=PATH, or delete {run_dir} to start over"
    raise ConfigError(f"local_run_dir={run_dir} holds a run with other settings ({listed}); "
                      f"{way_out} (only {', '.join(RESUMABLE_KEYS)} may change when a run is "
                      "relaunched in its own directory)")


def trains_further(config: DictConfig, saved: Path, trained: int) -> bool:
    """Whether `config` asks for more training than a finished run did (`trained` examples,
    its config at `saved`): a larger n_examples, or more n_epochs than it ran."""
    if config.n_examples is not None:
        return trained_examples(config.n_examples, config.batch_size) > trained
    old = OmegaConf.load(saved) if saved.is_file() else None
    return old is not None and old.n_examples is None and config.n_epochs > old.n_epochs


def trained_examples(n_examples: int, batch_size: int) -> int:
    """Examples a run with n_examples trains on: the data iterator ends after the batch that
    reaches n_examples, i.e. after ceil(n_examples / batch_size) whole batches (DPO repository)."""
    return math.ceil(n_examples / batch_size) * batch_size


def note_rounding(config: DictConfig):
    """Say, in one line, that n_examples is rounded up to whole batches (never silently)."""
    n, size = config.n_examples, config.batch_size
    if n is not None and n % size:
        total = trained_examples(n, size)
        utils.rank0_print(f"note: n_examples={n} is not a multiple of batch_size={size}; training "
                          f"on {total} examples ({total // size} batches of {size})")


def open_run_dir(config: DictConfig, rank: int) -> Optional[int]:
    """Create the run directory (rank 0, once models and data have loaded), lock it for this run
    and write the resolved config. Every rank gets rank 0's outcome, so a refusal stops all.

    Returns:
        the lock's file descriptor on rank 0 (None elsewhere); utils.unlock_run_dir releases it.
    """
    run_dir, lock, error = Path(config.local_run_dir), None, None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = utils.lock_run_dir(run_dir, "local_run_dir")
            OmegaConf.save(config, run_dir / "config.yaml", resolve=True)
        except ConfigError as e:
            error = str(e)
        except OSError as e:
            error = f"local_run_dir={run_dir} could not be written: {e.strerror or e}"
        if error is not None:
            utils.unlock_run_dir(lock)
    if torch.distributed.is_initialized():
        error = utils.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)
    utils.rank0_print(f"run directory: {run_dir}")
    return lock


def run_dir_checked_on_rank0(config: DictConfig, rank: int) -> bool:
    """check_run_dir on rank 0 only, its outcome (go on, stop, or the refusal) on every rank, so
    the processes of one launch never disagree (e.g. about a lock taken in between)."""
    outcome = None
    if rank == 0:
        try:
            outcome = check_run_dir(config)
        except ConfigError as e:
            outcome = str(e)
    if torch.distributed.is_initialized():
        outcome = utils.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise ConfigError(outcome)
    return outcome


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "LATEST").exists() or any(run_dir.glob("step-*"))


# ----------------------------------------------------------------------------- launching

def resolve_model_source(m: DictConfig):
    """Where the model comes from: the hub when reachable, else a packaged GGUF file named by
    model.offline_gguf (model=smollm2). Done before the config is saved or compared with a
    relaunched run's, so both see the source actually used."""
    offline = OmegaConf.to_container(m.offline_gguf) if m.offline_gguf is not None else None
    m.name_or_path, m.gguf_file, note = utils.resolve_model_source(m.name_or_path, m.gguf_file,
                                                                   offline)
    if note:
        utils.rank0_print(note)


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment, or a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", 0)))
    return 0, 1, 0


def run(config: DictConfig):
    rank, world_size, local_rank = distributed_env()
    if config.trainer == "BasicTrainer":
        _require(world_size == 1, "trainer=BasicTrainer runs as one process; launch it with python, "
                 "or use trainer=FSDPTrainer / TensorParallelTrainer under torchrun")
    OmegaConf.resolve(config)
    if config.trainer != "BasicTrainer" and world_size == 1 and torch.cuda.device_count() > 1:
        # The DPO repository's single-command launch: one process per local GPU.
        validate_config(config, torch.cuda.device_count())
        return spawn_local_workers(config, torch.cuda.device_count())
    validate_config(config, world_size)
    resolve_model_source(config.model)
    validate_tensor_parallel_plan(config)
    # a hub dataset that cannot be had (no network, no cached copy) is refused before any model loads
    preference_datasets.check_hub_datasets(list(config.datasets), dict(config.dataset_paths))
    if world_size > 1:
        utils.init_distributed(rank, world_size, local_rank)
        # Each rank stamped its own run directory name; all must use rank 0's.
        config.local_run_dir = utils.broadcast_object(config.local_run_dir)
    if run_dir_checked_on_rank0(config, rank):
        note_rounding(config)
        run_dir = Path(config.local_run_dir)
        created = not run_dir.exists()
        try:
            build_and_train(config, rank, world_size)
        except (ConfigError, preference_datasets.DatasetFormatError):
            # Bad input found after this launch made the run directory (data read when training
            # starts): leave nothing behind, unless a checkpoint was already saved in it.
            if created and rank == 0 and not has_checkpoint(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    if torch.distributed.is_initialized():
        # Tear the process group down together, not in each rank's interpreter shutdown: first
        # free the sharded models (reference cycles) so nothing outlives the group's threads.
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def spawn_local_workers(config: DictConfig, n_procs: int):
    """Run `config` in n_procs processes started with 'spawn' (fork would deadlock once torch has
    run), rendezvousing on config.fsdp_port or a free port. A worker's exit code becomes ours."""
    port = config.fsdp_port or free_port()
    utils.rank0_print(f"starting {n_procs} processes, one per GPU (port {port})")
    try:
        torch.multiprocessing.spawn(local_worker, args=(n_procs, port, config), nprocs=n_procs,
                                    join=True)
    except torch.multiprocessing.ProcessExitedException as e:
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)  # <0: killed by a signal


def local_worker(local_rank: int, n_procs: int, port: int, config: DictConfig):
    # The environment torchrun would set; main() then takes the ordinary multi-process path.
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(n_procs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main(config)  # hydra.main passes a given config straight through


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tokenizer(m: DictConfig):
    """(tokenizer, processor): the model's tokenizer, and for a vision model (model.vision) its
    processor (vision.build_processor), else None."""
    if m.vision and m.from_config is None:
        return vision.build_processor(m, None)
    tokenizer = utils.build_model_tokenizer(m.name_or_path, m.tokenizer_name_or_path, m.gguf_file,
                                            m.trust_remote_code)
    return vision.build_processor(m, tokenizer) if m.vision else (tokenizer, None)


def build_and_train(config: DictConfig, rank: int, world_size: int):
    m = config.model
    tokenizer, processor = build_tokenizer(m)
    policy, reference = build_models(config, tokenizer)
    trainer_class = getattr(trainers, config.trainer)
    trainer = trainer_class(policy, config, config.seed, config.local_run_dir,
                            reference_model=reference, rank=rank, world_size=world_size,
                            tokenizer=tokenizer, processor=processor)
    # The trainer owns the models now; with precompute_ref_log_probs it frees the reference.
    del policy, reference
    # Only now, with the models and the evaluation data loaded (the trainer's constructor writes
    # nothing to the run directory), so a failed start leaves no run directory behind.
    lock = open_run_dir(config, rank)
    try:
        trainer.train()
        if config.plot and rank == 0:
            import plot
            out = plot.plot_runs([config.local_run_dir], Path(config.local_run_dir) / "plot.png")
            utils.rank0_print(f"plot: {out}")
    finally:
        utils.unlock_run_dir(lock)


# ----------------------------------------------------------------------------- the command line

# Mappings whose keys are open, so `+KEY=VALUE` may add one (e.g.
# `+model.from_config.num_local_experts=4`, `+dataset_paths.mine=DIR`); anywhere else a `+` key
# would be ignored, so it is refused like an unknown key.
OPEN_MAPPINGS = ("model.from_config", "dataset_paths")
# Keys the DPO repository's command lines use under another name here.
KEY_ALIASES = {"model.block": "model.block_name"}
# The DPO repository's FSDP-only name of mixed precision: `model.fsdp_policy_mp=bfloat16` is
# mixed_precision=bf16 here (the one spelling every trainer reads).
LEGACY_MIXED_PRECISION = {"null": None, "bfloat16": "bf16", "float16": "fp16"}
# The beta-DPO repository's switch: `loss=dpo loss.mode_loss=beta_DPO` is loss=beta_dpo here
# (config/loss/beta_dpo.yaml); its default 'mean', and 'dpo', are plain DPO.
MODE_LOSSES = {"dpo": "dpo", "mean": "dpo", "beta_DPO": "beta_dpo"}


def rewrite_aliases(args: List[str]) -> List[str]:
    """The overrides with KEY_ALIASES, the DPO repository's `model.fsdp_policy_mp`
    (LEGACY_MIXED_PRECISION) and the beta-DPO repository's `loss.mode_loss` (MODE_LOSSES)
    rewritten to this repository's names.

    Raises:
        ConfigError: a mode_loss that repository does not have, or with a loss other than dpo;
            an fsdp_policy_mp that is not a dtype, or that disagrees with mixed_precision.
    """
    args = _rewrite_mixed_precision([_rewrite_alias(a) for a in args])
    modes = [a.partition("=")[2] for a in args if a.partition("=")[0] == "loss.mode_loss"]
    if not modes:
        return args
    chosen = [a.partition("=")[2] for a in args if a.partition("=")[0] == "loss"]
    if modes[-1] not in MODE_LOSSES or chosen[-1:] not in ([], ["dpo"]):
        raise ConfigError(f"loss.mode_loss={modes[-1]}: the beta-DPO repository's switch takes "
                          f"{', '.join(MODE_LOSSES)} with loss=dpo; here beta-DPO is "
                          "loss=beta_dpo (config/loss/beta_dpo.yaml)")
    rest = [a for a in args if a.partition("=")[0] not in ("loss", "loss.mode_loss")]
    return [f"loss={MODE_LOSSES[modes[-1]]}", *rest]


def _rewrite_mixed_precision(args: List[str]) -> List[str]:
    legacy = [a.partition("=")[2] for a in args if a.partition("=")[0] == "model.fsdp_policy_mp"]
    if not legacy:
        return args
    value = legacy[-1]
    _require(value in LEGACY_MIXED_PRECISION,
             f"model.fsdp_policy_mp={value} must be null, bfloat16 or float16")
    given = [a.partition("=")[2] for a in args if a.partition("=")[0] == "mixed_precision"]
    mp = LEGACY_MIXED_PRECISION[value]
    _require(mp is None or given[-1:] in ([], [mp]),
             f"mixed_precision={given[-1:] and given[-1]} and model.fsdp_policy_mp={value} disagree; "
             "set only mixed_precision (model.fsdp_policy_mp is its older name)")
    rest = [a for a in args if a.partition("=")[0] != "model.fsdp_policy_mp"]
    return rest + [f"mixed_precision={mp}"] if mp is not None and not given else rest


def check_command_line(args: List[str]) -> Tuple[List[str], List[str]]:
    """Rewrite aliases and find unknown keys among Hydra overrides, before Hydra sees them (it
    would refuse an unknown key with a traceback before main() runs).

    Args:
        args: the command-line overrides, e.g. ["model=tiny", "lr_rate=1e-3"].
    Returns:
        (the overrides with aliases rewritten, one problem line per unknown key). Anything this
        does not understand (Hydra flags, a syntax error, an unknown preset) is left to Hydra.
    """
    try:
        args = rewrite_aliases(args)
    except ConfigError as e:
        return args, [str(e)]
    if any(a.startswith("-") for a in args):
        return args, []
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    # The config groups config.yaml picks presets from (model, loss): `model=tiny` chooses one.
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=args)
        chosen = [o.input_line for o in parsed if o.key_or_group in groups]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            tree = OmegaConf.to_container(compose("config", overrides=chosen), resolve=False)
    except Exception:  # Hydra's own message says what is wrong
        return args, []
    groups &= set(tree)
    known = sorted(utils.flatten_settings(tree)) + _inner_keys(tree)
    problems = []
    for o in parsed:
        key = o.key_or_group
        if key in groups or key.split(".")[0] == "hydra" or "/" in key:
            continue
        if o.is_add() or o.is_force_add():
            if not key.startswith(tuple(m + "." for m in OPEN_MAPPINGS)) and not _has_key(tree, key):
                problems.append(f"+{key} adds a key train.py never reads; keys can be added only "
                                f"under {' or '.join(OPEN_MAPPINGS)}{_did_you_mean(key, known)}")
        elif not _has_key(tree, key):
            problems.append(f"unknown key '{key}'{_did_you_mean(key, known)}")
    return args, problems


def _rewrite_alias(arg: str) -> str:
    prefix = arg[:len(arg) - len(arg.lstrip("+~"))]
    key, sep, value = arg[len(prefix):].partition("=")
    return f"{prefix}{KEY_ALIASES.get(key, key)}{sep}{value}"


def _has_key(tree, key: str) -> bool:
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _inner_keys(tree: dict, prefix: str = "") -> List[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += [f"{prefix}{key}"] + _inner_keys(value, f"{prefix}{key}.")
    return keys


def _did_you_mean(key: str, known: List[str]) -> str:
    """'; did you mean 'lr'?' for the closest known key, or a pointer to the config files when
    nothing is close. Closeness is difflib's ratio, raised for a key with the same last part
    elsewhere (beta -> loss.beta) or one whose last part starts the other's (lr_rate -> lr)."""
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        other = candidate.rsplit(".", 1)[-1]
        ratio = difflib.SequenceMatcher(None, key, candidate).ratio()
        if other == leaf:
            return ratio + 1
        short, long = sorted((leaf, other), key=len)
        return ratio + (0.5 if len(short) >= 2 and long.startswith(short) else 0)

    best = max(known, key=score, default=None)
    if best is not None and score(best) >= 0.6:
        return f"; did you mean '{best}'?"
    return "; the known keys are in config/config.yaml, config/model/ and config/loss/"


def print_error(problem) -> None:
    """`error: ...` as one write, so the lines of several ranks never interleave mid-line."""
    sys.stderr.write(f"error: {problem}\n")
    sys.stderr.flush()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(config: DictConfig):
    code = run_reporting_errors(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of a process group leaves without the interpreter's shutdown: there, a collective
        # library's C++ thread that drops a tensor's last reference aborts the process
        # ("terminate called without an active exception", pytorch/pytorch#179291).
        utils.exit_process(code)
    if code:
        sys.exit(code)


def run_reporting_errors(config: DictConfig) -> int:
    """run(config); a known failure becomes its one-line message and the exit code (0: success)."""
    try:
        run(config)
    except (ConfigError, preference_datasets.DatasetFormatError) as e:
        print_error(e)
        return 2
    except trainers.TrainingDiverged as e:
        print_error(e)
        return 3
    except checkpoints.CheckpointWriteError as e:
        utils.rank0_print(f"error: {e}", file=sys.stderr)
        return 4
    except trainers.TrainingInterrupted as e:
        # 128 + the signal number, as a shell reports a process the signal stopped
        utils.rank0_print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # before training started (or after it ended)
        utils.rank0_print("interrupted before training started; nothing new was saved; relaunch "
                          "the same command to start again", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def command_line():
    """`python train.py KEY=VALUE ...`: the overrides checked and their aliases rewritten, then main()."""
    sys.argv[1:], problems = check_command_line(sys.argv[1:])
    for problem in problems:
        print_error(problem)
    if problems:
        sys.exit(2)
    main()


if __name__ == "__main__":
    command_line()
