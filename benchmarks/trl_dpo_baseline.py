#!/usr/bin/env python3
"""Baseline throughput / memory measurement of TRL's ``DPOTrainer`` on CPU.

Runs a few DPO training steps of a small, randomly initialised causal LM on a
synthetic preference dataset whose sequences have an exactly known length, and
prints one JSON object (the last stdout line) with throughput, peak RSS and the
settings used.

This script needs ``trl`` (1.16.0 is installed in the project's environment, so
plain ``python`` runs it; a separate virtual environment, see
``benchmarks/README.md``, is optional); it is not imported by the project.

With ``--lengths-file FILE`` (a JSON list of [prompt, chosen, rejected] token
counts, e.g. ``benchmarks/hh_lengths.json``) the pairs have those lengths, in
file order, cycled to fill ``batch * steps`` pairs: the same rows
``benchmarks/dpo_throughput.py`` trains on (both build them with
``common.rows_of_lengths``). ``DPOTrainer`` batches them its own default way
(shuffled, chosen and rejected stacked into one ``2 * batch`` tensor padded to
its longest sequence); ``max_length`` is the longest prompt + response, so
nothing is truncated, and the tokenised dataset is checked row by row against
the file.

What is measured
----------------
* Only the optimisation steps after ``--warmup-steps`` are timed.  A
  ``TrainerCallback`` records a timestamp in ``on_step_begin`` and in
  ``on_step_end``; ``examples_per_s`` and ``tokens_per_s`` use the sum of those
  per-step durations (forward of policy and reference model, backward,
  optimizer and scheduler step).  Model construction, tokenisation of the
  dataset (done by ``DPOTrainer.__init__``) and the warm-up steps are excluded.
  In ``transformers.Trainer`` the batch is fetched and collated *before*
  ``on_step_begin``; ``wall_examples_per_s`` additionally includes that, as it
  spans from the end of the last warm-up step to the end of the last step.
* ``examples_per_s`` counts preference pairs (one prompt + chosen + rejected).
* ``tokens_per_s`` counts every token of both sequences of a pair, prompt
  included: ``2 * (prompt_len + response_len)`` per pair (the EOS that TRL
  appends to each response is part of ``response_len``). It is summed from the
  attention masks of the batches the timed steps trained on, so with a lengths
  file it counts the real (not padding) tokens.
* ``padding_fraction``: the share of the positions of the collated
  ``input_ids`` that are padding, averaged over the timed steps.
* ``peak_rss_mb`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on
  Linux) / 1024, i.e. the process-wide peak including setup.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

# Keep everything local and quiet; must be set before the HF libraries load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_comparison_args, check_comparison_args, pair_lengths,  # noqa: E402
                    sequence_limits, synchronize, word_tokenizer)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_args(p)
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                   help="DPOConfig.gradient_checkpointing; 'on' is TRL's default")
    p.add_argument("--bf16", action="store_true",
                   help="DPOConfig.bf16: float32 weights, forward and backward under bf16 autocast")
    args = p.parse_args(argv)
    check_comparison_args(p, args)
    return args


# --------------------------------------------------------------------------- #
# Tokenizer and data
# --------------------------------------------------------------------------- #
def build_dataset(rows):
    """The rows (common.rows_of_lengths) as a ``datasets.Dataset`` in TRL's standard format."""
    from datasets import Dataset
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})


def check_token_counts(trainer, tokenizer, args):
    """Verify TRL's tokenised dataset and a collated batch have exactly the intended lengths:
    row i of the dataset has the prompt / chosen / rejected token counts of pair i."""
    ds = trainer.train_dataset
    eos = tokenizer.eos_token_id
    lengths = pair_lengths(args)
    if len(ds) != len(lengths):
        raise RuntimeError(f"TRL's dataset has {len(ds)} rows, expected {len(lengths)} (rows dropped?)")
    for i, (ex, want) in enumerate(zip(ds, lengths)):
        got = (len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        if got != tuple(want):
            raise RuntimeError(
                f"example {i}: prompt/chosen/rejected token counts {'/'.join(map(str, got))}, "
                f"expected {'/'.join(map(str, want))}"
            )
        if ex["chosen_ids"][-1] != eos or ex["rejected_ids"][-1] != eos:
            raise RuntimeError(f"example {i}: response does not end with EOS")
        if tokenizer.unk_token_id in ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"]:
            raise RuntimeError(f"example {i}: contains <unk>")
    batch = trainer.data_collator([ds[i] for i in range(args.batch)])
    first = lengths[: args.batch]
    seq = max(p + max(c, r) for p, c, r in first)
    if tuple(batch["input_ids"].shape) != (2 * args.batch, seq):
        raise RuntimeError(f"collated input_ids shape {tuple(batch['input_ids'].shape)}, "
                           f"expected {(2 * args.batch, seq)}")
    if int(batch["attention_mask"].sum()) != sum(2 * p + c + r for p, c, r in first):
        raise RuntimeError("collated batch: unexpected attention_mask (truncated or padded as tokens)")
    if int(batch["completion_mask"].sum()) != sum(c + r for _, c, r in first):
        raise RuntimeError("unexpected completion_mask")
    return {"rows_checked": len(ds), "collated_shape": list(batch["input_ids"].shape)}


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def build_model(args, tokenizer):
    import torch

    max_pos = max(2048, sequence_limits(pair_lengths(args))[0])
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max_pos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if args.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(num_key_value_heads=args.heads, **common)
        cls = LlamaForCausalLM
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(**common)
        cls = GPTNeoXForCausalLM
    torch.manual_seed(args.seed)
    model = cls(cfg).to(torch.float32)
    return model


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def _cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins = []
            self.ends = []
            self.cpu_begins = []  # process user+sys CPU seconds at each step begin / end
            self.cpu_ends = []
            self.threads_seen = None

        def on_step_begin(self, args, state, control, **kwargs):
            import torch

            if self.threads_seen is None:
                self.threads_seen = torch.get_num_threads()
            synchronize()  # on CUDA: time from an idle GPU to the end of the step's kernels
            self.cpu_begins.append(_cpu_seconds())
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(_cpu_seconds())

    return StepTimer()


def dpo_config(args, out_dir: str, seq_len: int, max_prompt_len: int):
    """TRL's DPOConfig for this benchmark: float32 (bf16 autocast with --bf16), no logging,
    saving or evaluation; on CUDA where torch sees a device (as ours, BasicTrainer), else CPU."""
    import torch
    from trl import DPOConfig
    config = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        bf16=args.bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        eval_strategy="no",
        logging_strategy="no",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        max_length=seq_len,  # no truncation: no pair is longer
        precompute_ref_log_probs=False,  # TRL default: reference forward runs inside every step
        seed=args.seed,
    )
    # Older TRL releases split the limit into prompt / completion limits; set them if present.
    max_completion_len = max(max(c, r) for _, c, r in pair_lengths(args))
    for name, value in (("max_prompt_length", max_prompt_len), ("max_completion_length", max_completion_len)):
        if hasattr(config, name):
            setattr(config, name, value)
    return config


def record_steps(trainer):
    """Lists filled as the trainer runs: (the detached loss tensor of every step, converted to
    float only after training; the real tokens and the padded positions of its batch)."""
    step_losses, step_tokens, step_positions = [], [], []
    inner_training_step = trainer.training_step

    def recording_training_step(model, inputs, *a, **kw):
        step_tokens.append(int(inputs["attention_mask"].sum()))
        step_positions.append(inputs["attention_mask"].numel())
        loss = inner_training_step(model, inputs, *a, **kw)
        step_losses.append(loss)
        return loss

    trainer.training_step = recording_training_step
    return step_losses, step_tokens, step_positions


def build_trainer(args):
    """(TRL's DPOTrainer with a separate reference copy, its timer callback, the policy's
    parameter count, the sequence length, the token check)."""
    from trl import DPOTrainer
    tokenizer, _ = word_tokenizer(args.vocab)
    train_ds = build_dataset(args.rows)
    policy = build_model(args, tokenizer)
    reference = copy.deepcopy(policy)  # explicit, separate reference model (not ref_model=None)
    reference.eval()
    for prm in reference.parameters():
        prm.requires_grad_(False)
    n_params = sum(p.numel() for p in policy.parameters())
    out_dir = tempfile.mkdtemp(prefix="trl_dpo_baseline_")
    seq_len, max_prompt_len = sequence_limits(pair_lengths(args))  # the longest pair, untruncated
    config = dpo_config(args, out_dir, seq_len, max_prompt_len)
    timer = make_timer_callback()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train_ds,
                         processing_class=tokenizer, callbacks=[timer])
    return trainer, timer, n_params, seq_len, check_token_counts(trainer, tokenizer, args)


def timing(args, timer, steps, train_out) -> dict:
    """The timed steps' rates, times, CPU use and padding (the warm-up steps left out)."""
    step_losses, step_tokens, step_positions = steps
    if len(timer.begins) != args.steps or len(timer.ends) != args.steps:
        raise RuntimeError(f"expected {args.steps} steps, timed {len(timer.begins)} begins / {len(timer.ends)} ends")
    w = args.warmup_steps
    step_times = [e - b for b, e in zip(timer.begins, timer.ends)]
    timed = step_times[w:]
    total = sum(timed)
    wall = timer.ends[-1] - timer.ends[w - 1] if w > 0 else timer.ends[-1] - timer.begins[0]
    pairs = len(timed) * args.batch
    # CPU time this process used inside the timed steps; cpu_util ~= threads means it had the cores to itself,
    # clearly less means other processes competed for them.
    cpu = list(zip(timer.cpu_begins[w:], timer.cpu_ends[w:]))
    user_s, sys_s = (sum(e[k] - b[k] for b, e in cpu) for k in (0, 1))
    padding = [1 - t / n for t, n in zip(step_tokens[w:], step_positions[w:])]
    return {
        "examples_per_s": round(pairs / total, 4),
        "tokens_per_s": round(sum(step_tokens[w:]) / total, 1),
        "wall_examples_per_s": round(pairs / wall, 4),
        "step_time_s_mean": round(total / len(timed), 4),
        "step_time_s_median": round(statistics.median(timed), 4),
        "step_time_s_min": round(min(timed), 4),
        "step_time_s_max": round(max(timed), 4),
        "warmup_step_times_s": [round(t, 4) for t in step_times[:w]],
        "cpu_util_timed": round((user_s + sys_s) / total, 2),
        "cpu_sys_fraction_timed": round(sys_s / max(user_s + sys_s, 1e-9), 2),
        "final_loss": round(float(step_losses[-1]), 6) if step_losses else None,
        "mean_train_loss": round(float(train_out.training_loss), 6),
        "padding_fraction": round(statistics.mean(padding), 4),
    }


def settings(args, config, timer, n_params: int, seq_len: int, token_check) -> dict:
    """What was measured: the model, the data, TRL's settings."""
    return {
        "arch": args.arch, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
        "intermediate": args.intermediate, "vocab": args.vocab, "tie_word_embeddings": False,
        "n_params": n_params, "dtype": "float32, bf16 autocast" if config.bf16 else "float32",
        "prompt_len": args.prompt_len if args.lengths is None else None,
        "response_len": args.response_len if args.lengths is None else None,
        "seq_len": seq_len, "lengths_file": args.lengths_file, "batch": args.batch,
        "steps": args.steps, "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps - args.warmup_steps, "threads": args.threads,
        "torch_threads_in_training": timer.threads_seen,
        "gradient_checkpointing": config.gradient_checkpointing,
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "padding_free": config.padding_free, "max_length": config.max_length,
        "loss_type": list(config.loss_type), "beta": config.beta,
        "learning_rate": config.learning_rate, "optim": str(config.optim),
        "ref_model": "deepcopy", "token_check": token_check, "seed": args.seed,
    }


def memory() -> dict:
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        import psutil

        rss_end_mb = psutil.Process().memory_info().rss / 2**20
    except ImportError:  # psutil is optional
        rss_end_mb = None
    return {"peak_rss_mb": round(peak_rss_mb, 1),
            "rss_end_mb": None if rss_end_mb is None else round(rss_end_mb, 1)}


def main(argv=None):
    args = parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    t0 = time.perf_counter()
    trainer, timer, n_params, seq_len, token_check = build_trainer(args)
    steps = record_steps(trainer)
    setup_s = time.perf_counter() - t0

    load_start = os.getloadavg()[0]
    train_out = trainer.train()
    load_end = os.getloadavg()[0]

    result = {"benchmark": "trl_dpo_baseline", **timing(args, timer, steps, train_out),
              "load_avg_1m_start": round(load_start, 2), "load_avg_1m_end": round(load_end, 2),
              **memory(), "setup_s": round(setup_s, 2),
              "settings": settings(args, trainer.args, timer, n_params, seq_len, token_check),
              "versions": {"trl": trl.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__,
                           "datasets": datasets.__version__, "python": platform.python_version()},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False))
    return result

if __name__ == "__main__":
    main()
