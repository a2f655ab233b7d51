#!/usr/bin/env python3
"""Training throughput and peak memory of this framework's DPO trainer on CPU.

Builds a randomly initialised causal LM from a config and a local word-level tokenizer, writes
synthetic preference pairs of exactly the requested token lengths to a TRL-format JSON Lines file,
and trains on it through the code path `train.py` runs: the config is composed with Hydra, the
models come from `train.build_models`, batches from `BasicTrainer.train_iterator` (tokenisation,
length grouping, collation) and each update is `BasicTrainer.train_step` (log-probs, loss,
backward, clipping, optimizer and scheduler step). With `--precompute-ref` the trainer's reference
cache is prepared first, as `BasicTrainer.train` does.

Only the steps after `--warmup-steps` are timed, each from the start to the end of `train_step`
(fetching the next batch is excluded, as `benchmarks/trl_dpo_baseline.py` excludes it for TRL;
`wall_examples_per_s` includes it). Token counts match that script: each response is
`--response-len` tokens including the EOS the tokenisation appends, and `tokens_per_s` counts
`2 * (prompt_len + response_len)` tokens per pair. `peak_rss_mb` is the process-wide peak
(`ru_maxrss`), setup included.

The last stdout line is one JSON object.

    python benchmarks/dpo_throughput.py                      # the README configuration
    python benchmarks/dpo_throughput.py --precompute-ref     # with cached reference log-probs
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_comparison_args, check_comparison_args, synthetic_rows, word_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

BLOCKS = {"llama": "LlamaDecoderLayer", "gpt_neox": "GPTNeoXLayer"}
LOSSES = {"dpo": ["loss=dpo", "loss.beta=0.1"], "ipo": ["loss=ipo", "loss.beta=0.1"],
          "tdpo": ["loss=tdpo", "loss.beta=0.1"], "sft": ["loss=sft"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_args(p)
    p.add_argument("--loss", choices=sorted(LOSSES), default="dpo")
    p.add_argument("--precompute-ref", action="store_true",
                   help="precompute_ref_log_probs=true: score the data with the reference once")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (TRL's default)")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override for the training config (repeatable)")
    args = p.parse_args(argv)
    check_comparison_args(p, args)
    if args.precompute_ref and args.loss not in ("dpo", "ipo"):
        p.error("--precompute-ref needs a loss with a sequence-level reference (dpo, ipo)")
    return args


def write_tokenizer(vocab_size: int, path: Path) -> int:
    """Save the shared word-level tokenizer to `path`; returns the number of words."""
    tok, n_words = word_tokenizer(vocab_size)
    tok.save_pretrained(path)
    return n_words


def write_pairs(path: Path, n_pairs: int, prompt_len: int, response_len: int, n_words: int,
                seed: int):
    with open(path, "w") as f:
        for row in synthetic_rows(n_pairs, prompt_len, response_len, n_words, seed):
            f.write(json.dumps(row) + "\n")


def overrides(args, tokenizer_dir: Path, data_file: Path, run_dir: Path):
    n_pairs = args.batch * args.steps
    from_config = {"model_type": args.arch, "hidden_size": args.hidden,
                   "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                   "intermediate_size": args.intermediate, "vocab_size": args.vocab,
                   "max_position_embeddings": max(2048, args.prompt_len + args.response_len),
                   "tie_word_embeddings": False}
    if args.arch == "llama":
        from_config["num_key_value_heads"] = args.heads
    config_text = "{" + ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}"
                                 for k, v in from_config.items()) + "}"
    return [
        "model=blank_model", "model.name=bench", "model.name_or_path=null",
        f"model.from_config={config_text}", f"model.tokenizer_name_or_path={tokenizer_dir}",
        f"model.block_name={BLOCKS[args.arch]}", "model.policy_dtype=float32",
        "model.reference_dtype=float32", *LOSSES[args.loss], f"datasets=[{data_file}]",
        f"batch_size={args.batch}", f"eval_batch_size={args.batch}",
        f"n_eval_examples={args.batch}", "n_epochs=null", f"n_examples={n_pairs}",
        f"max_length={args.prompt_len + args.response_len}",
        f"max_prompt_length={args.prompt_len}", "optimizer=AdamW", f"lr={args.lr}",
        "warmup_steps=0", f"seed={args.seed}", "sample_during_eval=false", "wandb.enabled=false",
        f"precompute_ref_log_probs={str(args.precompute_ref).lower()}",
        f"activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"local_run_dir={run_dir}", *args.override]


def check_batch(batch, args):
    """Every sequence has exactly prompt_len + response_len tokens, response_len of them scored."""
    seq = args.prompt_len + args.response_len
    sides = ("chosen", "rejected") if args.loss != "sft" else ("chosen",)
    for side in sides:
        mask, labels = batch[f"{side}_attention_mask"], batch[f"{side}_labels"]
        if tuple(mask.shape) != (args.batch, seq) or int(mask.sum()) != args.batch * seq:
            raise RuntimeError(f"{side}: batch shape {tuple(mask.shape)} with {int(mask.sum())} "
                               f"tokens; expected {args.batch} x {seq} without padding")
        if int((labels != -100).sum()) != args.batch * args.response_len:
            raise RuntimeError(f"{side}: {int((labels != -100).sum())} scored tokens; expected "
                               f"{args.batch} x {args.response_len}")


def run(args, tmp: Path) -> dict:
    import train  # first: it sets the math library's environment before torch loads, as for users
    import trainers
    import utils

    import datasets
    import torch
    import transformers
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    t0 = time.perf_counter()
    n_words = write_tokenizer(args.vocab, tmp / "tokenizer")
    write_pairs(tmp / "pairs.jsonl", args.batch * args.steps, args.prompt_len, args.response_len,
                n_words, args.seed)
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        config = compose("config", overrides=overrides(args, tmp / "tokenizer", tmp / "pairs.jsonl",
                                                       tmp / "run"))
    OmegaConf.resolve(config)
    train.validate_config(config, world_size=1)
    Path(config.local_run_dir).mkdir(parents=True)
    tokenizer = utils.build_tokenizer(config.model.tokenizer_name_or_path)
    policy, reference = train.build_models(config, tokenizer)
    n_params = sum(p.numel() for p in policy.parameters())
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir,
                                    reference_model=reference, tokenizer=tokenizer)
    del policy, reference  # the trainer owns them (and drops the reference when precomputing)
    trainer.build_optimizer()
    precompute_s, cache = None, None
    if args.precompute_ref:
        start = time.perf_counter()
        trainer.prepare_reference()
        precompute_s = time.perf_counter() - start
        # a file from an earlier run with the same seed and settings is reused, not recomputed
        fresh = trainer.reference.path.stat().st_mtime >= time.time() - precompute_s - 1
        cache = {"file": str(trainer.reference.path), "computed": fresh}
    setup_s = time.perf_counter() - t0

    load_start = os.getloadavg()[0]
    step_times, losses, cpu = [], [], []
    wall_start = None
    for step, batch in enumerate(trainer.train_iterator()):
        check_batch(batch, args)
        if step == args.warmup_steps:
            wall_start = time.perf_counter()
        c0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        metrics = trainer.train_step(batch)
        step_times.append(time.perf_counter() - start)
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
        losses.append(metrics["loss/train"])
    wall = time.perf_counter() - wall_start
    load_end = os.getloadavg()[0]
    if len(step_times) != args.steps:
        raise RuntimeError(f"trained {len(step_times)} steps, expected {args.steps}")

    timed = step_times[args.warmup_steps:]
    pairs = len(timed) * args.batch
    tokens_per_pair = 2 * (args.prompt_len + args.response_len) if args.loss != "sft" \
        else args.prompt_len + args.response_len
    return {
        "benchmark": "dpo_throughput",
        "examples_per_s": round(pairs / sum(timed), 4),
        "tokens_per_s": round(pairs * tokens_per_pair / sum(timed), 1),
        "wall_examples_per_s": round(pairs / wall, 4),
        "step_time_s_mean": round(statistics.mean(timed), 4),
        "step_time_s_median": round(statistics.median(timed), 4),
        "step_time_s_min": round(min(timed), 4),
        "step_time_s_max": round(max(timed), 4),
        "warmup_step_times_s": [round(t, 4) for t in step_times[:args.warmup_steps]],
        "cpu_util_timed": round(sum(cpu[args.warmup_steps:]) / sum(timed), 2),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(load_end, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "final_loss": round(float(losses[-1]), 6),
        "losses": [round(float(l), 6) for l in losses],
        "setup_s": round(setup_s, 2),
        "precompute_s": None if precompute_s is None else round(precompute_s, 2),
        "reference_cache": cache,
        "reference_in_memory": trainer.reference.model is not None,
        "settings": {
            "arch": args.arch, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
            "intermediate": args.intermediate, "vocab": args.vocab,
            "tie_word_embeddings": False, "n_params": n_params, "dtype": "float32",
            "prompt_len": args.prompt_len, "response_len": args.response_len,
            "seq_len": args.prompt_len + args.response_len, "batch": args.batch,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "timed_steps": len(timed),
            "threads": args.threads, "loss": args.loss, "precompute_ref": args.precompute_ref,
            "activation_checkpointing": args.activation_checkpointing,
            "group_by_length": bool(config.group_by_length),
            "logps_chunk_size": int(config.logps_chunk_size), "optimizer": "AdamW",
            "lr": args.lr, "seed": args.seed, "overrides": args.override,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }


def main(argv=None):
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dpo_throughput_"))
    try:
        result = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.flush()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
