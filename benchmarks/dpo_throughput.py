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
all tokens of both sequences, `2 * (prompt_len + response_len)` per pair. `peak_rss_mb` is the
process-wide peak (`ru_maxrss`), setup included.

With `--lengths-file FILE` (a JSON list of [prompt, chosen, rejected] token counts, e.g.
benchmarks/hh_lengths.json) the pairs have those lengths instead, in file order, cycled to fill
batch * steps pairs; max_length and max_prompt_length are set so that none is truncated, and the
trainer batches them as training does by default (length grouping and all). `tokens_per_s` then
counts the real tokens of the timed batches, prompt + chosen + prompt + rejected per pair, and
`padding_fraction` is the mean of the trainer's `tokens/padding_fraction` metric over the timed
steps (when the trainer logs it). Every batch is checked pair by pair against the file.

The last stdout line is one JSON object.

    python benchmarks/dpo_throughput.py                      # the configuration of docs/performance.md
    python benchmarks/dpo_throughput.py --precompute-ref     # with cached reference log-probs
    python benchmarks/dpo_throughput.py --lengths-file benchmarks/hh_lengths.json  # HH lengths
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
from common import (add_comparison_args, check_comparison_args, pair_lengths,  # noqa: E402
                    sequence_limits, synchronize, word_tokenizer)

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
    p.add_argument("--override", action="extend", nargs="+", default=[],
                   help="extra Hydra overrides for the training config (repeatable; several "
                        "may follow one --override)")
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


def write_pairs(path: Path, rows):
    """The rows (common.rows_of_lengths) as a TRL-format JSON Lines file."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def expected_lengths(args) -> dict:
    """prompt text -> its pair's (prompt, chosen, rejected) token counts (prompts are distinct)."""
    return {row["prompt"]: n for row, n in zip(args.rows, pair_lengths(args))}


def overrides(args, tokenizer_dir: Path, data_file: Path, run_dir: Path):
    n_pairs = args.batch * args.steps
    max_length, max_prompt_length = sequence_limits(pair_lengths(args))  # nothing is truncated
    from_config = {"model_type": args.arch, "hidden_size": args.hidden,
                   "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                   "intermediate_size": args.intermediate, "vocab_size": args.vocab,
                   "max_position_embeddings": max(2048, max_length),
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
        f"max_length={max_length}", f"max_prompt_length={max_prompt_length}",
        "optimizer=AdamW", f"lr={args.lr}",
        "warmup_steps=0", f"seed={args.seed}", "sample_during_eval=false", "wandb.enabled=false",
        f"precompute_ref_log_probs={str(args.precompute_ref).lower()}",
        f"activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"local_run_dir={run_dir}", *args.override]


def check_batch(batch, expected: dict, sides) -> int:
    """Every pair of a training batch has exactly the token counts it was built with: nothing
    truncated, dropped or mixed up.

    Args:
        batch: a collated training batch (preference_datasets.collate: right-padded (B, T)
            tensors per side and the prompt texts).
        expected: prompt text -> (prompt, chosen, rejected) token counts (expected_lengths).
        sides: ("chosen", "rejected"), or ("chosen",) for SFT.
    Returns:
        the real (not padding) tokens of all the batch's sequences.
    """
    real = 0
    for i, prompt in enumerate(batch["prompt"]):
        if prompt not in expected:
            raise RuntimeError(f"pair {i} of a batch has a prompt that the benchmark did not build")
        n_prompt, *responses = expected[prompt]
        got = {"prompt": int(batch["prompt_attention_mask"][i].sum())}
        want = {"prompt": n_prompt}
        for side, n_response in zip(("chosen", "rejected"), responses):
            if side in sides:
                got[side] = (int(batch[f"{side}_attention_mask"][i].sum()),
                             int((batch[f"{side}_labels"][i] != -100).sum()))
                want[side] = (n_prompt + n_response, n_response)
                real += got[side][0]
        if got != want:
            raise RuntimeError(f"pair {i} of a batch: token counts (sequence, scored) {got}, "
                               f"expected {want}: the pair was truncated or built wrongly")
    return real


def padding_fraction(metrics: dict):
    """The trainer's share of padded positions in a step, if it reports one."""
    for key in ("tokens/padding_fraction", "tokens_train/padding_fraction"):
        if key in metrics:
            return float(metrics[key])
    return None


def build_trainer(args, tmp: Path):
    """Write the tokenizer and the pairs, compose the config and build the trainer as train.py
    does (and its reference cache with --precompute-ref).

    Returns:
        (config, trainer, number of policy parameters, {"precompute_s", "reference_cache"}).
    """
    import train  # first: it sets the math library's environment before torch loads, as for users
    import trainers
    import utils
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    write_tokenizer(args.vocab, tmp / "tokenizer")
    write_pairs(tmp / "pairs.jsonl", args.rows)
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
    precompute = {"precompute_s": None, "reference_cache": None}
    if args.precompute_ref:
        start = time.perf_counter()
        trainer.prepare_reference()
        seconds = time.perf_counter() - start
        # a file from an earlier run with the same seed and settings is reused, not recomputed
        fresh = trainer.reference.path.stat().st_mtime >= time.time() - seconds - 1
        precompute = {"precompute_s": round(seconds, 2),
                      "reference_cache": {"file": str(trainer.reference.path), "computed": fresh}}
    return config, trainer, n_params, precompute


def train_timed(trainer, args) -> dict:
    """Run every training step, each batch checked first (check_batch); per step: seconds in
    train_step, CPU seconds, loss, real tokens and the trainer's padding fraction (or None)."""
    expected, sides = expected_lengths(args), trainer.sides
    steps = {"time": [], "cpu": [], "loss": [], "tokens": [], "padding": []}
    wall_start = None
    for step, batch in enumerate(trainer.train_iterator()):
        steps["tokens"].append(check_batch(batch, expected, sides))
        if step == args.warmup_steps:
            wall_start = time.perf_counter()
        synchronize()  # on CUDA: the step's time starts with the GPU idle and ends when it is
        c0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        metrics = trainer.train_step(batch)
        synchronize()
        steps["time"].append(time.perf_counter() - start)
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        steps["cpu"].append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
        steps["loss"].append(metrics["loss/train"])
        steps["padding"].append(padding_fraction(metrics))
    steps["wall"] = time.perf_counter() - wall_start
    if len(steps["time"]) != args.steps:
        raise RuntimeError(f"trained {len(steps['time'])} steps, expected {args.steps}")
    return steps


def lengths_summary(args) -> dict:
    """The pairs' shapes, for the settings record."""
    lengths = pair_lengths(args)
    max_length, max_prompt_length = sequence_limits(lengths)
    return {"max_length": max_length, "max_prompt_length": max_prompt_length,
            "pairs_in_lengths_file": None if args.lengths is None else len(args.lengths),
            **{f"mean_{name}_len": round(statistics.mean(n[k] for n in lengths), 2)
               for k, name in enumerate(("prompt", "chosen", "rejected"))}}


PACKING_KEYS = ("share_prompt", "packing", "packing_row_tokens")


def settings_record(args, config, n_params: int, timed_steps: int) -> dict:
    """What was run: the model, data shapes, schedule and the training settings that matter."""
    from omegaconf import OmegaConf
    fixed = args.lengths is None
    return {
        "arch": args.arch, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
        "intermediate": args.intermediate, "vocab": args.vocab,
        "tie_word_embeddings": False, "n_params": n_params, "dtype": "float32",
        "prompt_len": args.prompt_len if fixed else None,
        "response_len": args.response_len if fixed else None,
        "seq_len": int(config.max_length), "lengths_file": args.lengths_file,
        **({} if fixed else lengths_summary(args)), "batch": args.batch,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "timed_steps": timed_steps,
        "threads": args.threads, "loss": args.loss, "precompute_ref": args.precompute_ref,
        "activation_checkpointing": args.activation_checkpointing,
        "group_by_length": bool(config.group_by_length),
        # the prompt-sharing and packing settings, where this version of the trainer has them
        **{key: OmegaConf.select(config, key) for key in PACKING_KEYS if key in config},
        "logps_chunk_size": int(config.logps_chunk_size), "optimizer": "AdamW",
        "lr": args.lr, "seed": args.seed, "overrides": args.override,
    }


def run(args, tmp: Path) -> dict:
    import train  # noqa: F401  first: it sets the math library's environment before torch loads
    import datasets
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    t0 = time.perf_counter()
    config, trainer, n_params, precompute = build_trainer(args, tmp)
    setup_s = time.perf_counter() - t0
    load_start = os.getloadavg()[0]
    steps = train_timed(trainer, args)
    load_end = os.getloadavg()[0]

    w = args.warmup_steps
    timed = steps["time"][w:]
    pairs = len(timed) * args.batch
    padding = [f for f in steps["padding"][w:] if f is not None]
    return {
        "benchmark": "dpo_throughput",
        "examples_per_s": round(pairs / sum(timed), 4),
        "tokens_per_s": round(sum(steps["tokens"][w:]) / sum(timed), 1),
        "wall_examples_per_s": round(pairs / steps["wall"], 4),
        "step_time_s_mean": round(statistics.mean(timed), 4),
        "step_time_s_median": round(statistics.median(timed), 4),
        "step_time_s_min": round(min(timed), 4),
        "step_time_s_max": round(max(timed), 4),
        "warmup_step_times_s": [round(t, 4) for t in steps["time"][:w]],
        "cpu_util_timed": round(sum(steps["cpu"][w:]) / sum(timed), 2),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(load_end, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "final_loss": round(float(steps["loss"][-1]), 6),
        "losses": [round(float(line), 6) for line in steps["loss"]],
        **({"padding_fraction": round(statistics.mean(padding), 4)} if padding else {}),
        "setup_s": round(setup_s, 2),
        **precompute,
        "reference_in_memory": trainer.reference.model is not None,
        "settings": settings_record(args, config, n_params, len(timed)),
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
