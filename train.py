"""Entry point: `python -u train.py model=... datasets=[...] loss=... [key=value ...]`.

Validates the whole config before any model is built, writes the resolved config to the run
directory, builds the tokenizer, the policy and (when the loss needs one) the reference model, and
hands them to the trainer named by `trainer`. Multi-process trainers run under torchrun.
"""
import os

# Bitwise-reproducible CPU math, so a resumed run ends with the same weights as an uninterrupted
# one: MKL otherwise varies its thread count with machine load and picks code paths by memory
# alignment, which changes summation order from run to run. Set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import copy
import shutil
import socket
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import losses
import preference_datasets
import trainers
import utils
from utils import ConfigError

OmegaConf.register_new_resolver("get_local_run_dir", utils.get_local_run_dir, replace=True)

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")
TRAINERS = ("BasicTrainer", "FSDPTrainer", "TensorParallelTrainer")
MIXED_PRECISION = (None, "bfloat16", "float16")


# ----------------------------------------------------------------------------- validation

def _require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


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
    if low is not None:
        bad = value <= low if strict_low else value < low
        _require(not bad, f"{key}={value!r} must be {'>' if strict_low else '>='} {low}")


def _flag(config, key: str):
    value = OmegaConf.select(config, key)
    _require(isinstance(value, bool), f"{key}={value!r} must be true or false")


def validate_config(config: DictConfig, world_size: int):
    """Refuse a bad config with one line naming the key, the value and what is allowed."""
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}; "
                          f"pass them on the command line, e.g. {missing[0]}=...")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                "max_prompt_length", "eval_every", "n_eval_model_samples", "logps_chunk_size"):
        _positive_int(config, key)
    for key in ("n_epochs", "n_examples", "n_eval_examples", "keep_checkpoints"):
        _positive_int(config, key, allow_none=True)
    _require(config.n_epochs is not None or config.n_examples is not None,
             "n_epochs and n_examples are both null; set one of them")
    _number(config, "lr", 0, strict_low=True)
    _number(config, "max_grad_norm", 0, strict_low=True)
    _number(config, "minimum_log_interval_secs", 0)
    _require(isinstance(config.warmup_steps, int) and config.warmup_steps >= 0,
             f"warmup_steps={config.warmup_steps!r} must be a non-negative integer")
    _require(isinstance(config.seed, int), f"seed={config.seed!r} must be an integer")
    for key in ("do_first_eval", "sample_during_eval", "activation_checkpointing", "debug",
                "group_by_length", "precompute_ref_log_probs", "save_hf_format", "wandb.enabled",
                "model.trust_remote_code"):
        _flag(config, key)
    _require(config.max_prompt_length < config.max_length,
             f"max_prompt_length={config.max_prompt_length} must be less than "
             f"max_length={config.max_length}")
    _require(config.trainer in TRAINERS,
             f"trainer={config.trainer} is unknown; use one of {', '.join(TRAINERS)}")
    # Tensor parallelism splits the model, not the batch: every rank sees the whole batch.
    data_procs = world_size if getattr(trainers, config.trainer).splits_batch else 1
    per_update = config.gradient_accumulation_steps * data_procs
    _require(config.batch_size % per_update == 0,
             f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps "
             f"({config.gradient_accumulation_steps}) x processes ({data_procs}) = {per_update}")
    _require(config.eval_batch_size % data_procs == 0,
             f"eval_batch_size={config.eval_batch_size} must be divisible by the number of "
             f"processes ({data_procs})")
    optimizer = getattr(torch.optim, str(config.optimizer), None)
    _require(isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer),
             f"optimizer={config.optimizer} is not a torch.optim optimizer class "
             "(e.g. RMSprop, Adam, AdamW, SGD)")
    validate_model_config(config.model)
    validate_datasets(config)
    try:
        losses.validate_loss_args(OmegaConf.to_container(config.loss))
    except ValueError as e:
        raise ConfigError(str(e))
    validate_loss_combination(config)
    if config.resume_from is not None:
        _require(Path(config.resume_from).is_dir(),
                 f"resume_from={config.resume_from} is not a directory")


def validate_model_config(model: DictConfig):
    utils.get_dtype("model.policy_dtype", model.policy_dtype)
    utils.get_dtype("model.reference_dtype", model.reference_dtype)
    _require(model.fsdp_policy_mp in MIXED_PRECISION,
             f"model.fsdp_policy_mp={model.fsdp_policy_mp} must be null, bfloat16 or float16")
    _require(model.name_or_path is not None or model.from_config is not None,
             "model.name_or_path is null and model.from_config is null; set one of them")
    if model.from_config is not None:
        _require("model_type" in model.from_config,
                 "model.from_config needs a model_type (e.g. llama, gpt_neox, gpt2)")
    if model.archive is not None:
        _require(os.path.isfile(model.archive),
                 f"model.archive={model.archive} does not exist; pass the policy.pt of an earlier "
                 "run, e.g. model.archive=RUN_DIR/LATEST/policy.pt")


def validate_datasets(config: DictConfig):
    _require(len(config.datasets) > 0, "datasets=[] is empty; name at least one dataset")
    known = sorted(preference_datasets.DATASETS)
    for name in config.datasets:
        _require(name in preference_datasets.DATASETS or _local_path_exists(name, os.path.isfile),
                 f"datasets: unknown dataset {name!r}; use one of {', '.join(known)} or the path "
                 "of a local .jsonl/.json/.parquet file with prompt/chosen/rejected columns "
                 "(a {split} in the path stands for train and test)")
    for name, path in config.dataset_paths.items():
        if path is not None:
            _require(_local_path_exists(path, os.path.exists),
                     f"dataset_paths.{name}={path} does not exist")


def _local_path_exists(path, exists) -> bool:
    """A local path, where '{split}' stands for both the train and the test file."""
    path = str(path)
    if "{split}" not in path:
        return exists(path)
    return all(exists(path.replace("{split}", split)) for split in ("train", "test"))


def validate_loss_combination(config: DictConfig):
    spec = losses.get_loss(OmegaConf.to_container(config.loss))
    if config.precompute_ref_log_probs:
        args = OmegaConf.to_container(config.loss)
        _require(spec.needs_reference(args) and not spec.token_level,
                 f"precompute_ref_log_probs=true needs a loss that scores sequences with a "
                 f"reference model; loss={config.loss.name} "
                 f"{'needs per-position reference logits' if spec.token_level else 'uses none'}")


# ----------------------------------------------------------------------------- building

def build_models(config: DictConfig, tokenizer):
    """The policy and, when the loss needs one, the reference model (same initial weights)."""
    spec = losses.get_loss(OmegaConf.to_container(config.loss))
    m = config.model
    from_config = OmegaConf.to_container(m.from_config) if m.from_config is not None else None
    policy_dtype = utils.get_dtype("model.policy_dtype", m.policy_dtype)
    reference_dtype = utils.get_dtype("model.reference_dtype", m.reference_dtype)
    utils.set_seed(config.seed)
    policy = utils.build_model(m.name_or_path, from_config, tokenizer, policy_dtype,
                               m.trust_remote_code)
    utils.disable_dropout(policy)
    reference = None
    if spec.needs_reference(OmegaConf.to_container(config.loss)):
        if from_config is not None:
            reference = copy.deepcopy(policy).to(reference_dtype)
        else:
            reference = utils.build_model(m.name_or_path, None, tokenizer, reference_dtype,
                                          m.trust_remote_code)
        utils.disable_dropout(reference)
        reference.requires_grad_(False)
    if m.archive is not None:
        state = utils.load_policy_archive(m.archive)
        for model in (policy, reference):
            if model is not None:
                try:
                    model.load_state_dict(state)
                except RuntimeError as e:
                    raise ConfigError(f"model.archive={m.archive} does not fit model "
                                      f"{m.name}: {str(e).splitlines()[0]}")
        utils.rank0_print(f"loaded model.archive {m.archive}")
    return policy, reference


def prepare_run_dir(config: DictConfig):
    run_dir = Path(config.local_run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, run_dir / "config.yaml", resolve=True)
    return run_dir


# ----------------------------------------------------------------------------- launching

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
    if world_size > 1:
        utils.init_distributed(rank, world_size, local_rank)
        # Each rank stamped its own run directory name; all must use rank 0's.
        config.local_run_dir = utils.broadcast_object(config.local_run_dir)
    run_dir = Path(config.local_run_dir)
    created = not run_dir.exists()
    try:
        build_and_train(config, rank, world_size)
    except (ConfigError, preference_datasets.DatasetFormatError):
        # Bad input found after the run directory was made: leave nothing half-written.
        if created and rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if torch.distributed.is_initialized():
        # Tear the process group down together, not in each rank's interpreter shutdown.
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


def build_and_train(config: DictConfig, rank: int, world_size: int):
    if rank == 0:
        utils.rank0_print(f"run directory: {prepare_run_dir(config)}")
    tokenizer = utils.build_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path,
                                      config.model.trust_remote_code)
    policy, reference = build_models(config, tokenizer)
    trainer_class = getattr(trainers, config.trainer)
    trainer = trainer_class(policy, config, config.seed, config.local_run_dir,
                            reference_model=reference, rank=rank, world_size=world_size,
                            tokenizer=tokenizer)
    # The trainer owns the models now; with precompute_ref_log_probs it frees the reference.
    del policy, reference
    trainer.train()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(config: DictConfig):
    try:
        run(config)
    except (ConfigError, preference_datasets.DatasetFormatError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except trainers.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
