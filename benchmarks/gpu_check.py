#!/usr/bin/env python3
"""GPU check: bf16 DPO on a ~1B-parameter Llama on one CUDA device, ours then TRL's, side by side.

One process runs our trainer (benchmarks/dpo_throughput.py: train.build_models,
BasicTrainer.train_step, mixed_precision=bf16, attn_implementation=flex_attention, prompts shared
and pairs packed) and then TRL's DPOTrainer (benchmarks/trl_dpo_baseline.py: bf16 autocast, its
defaults otherwise) on the same model config, the same pairs (benchmarks/hh_lengths.json lengths,
common.rows_of_lengths) and the same batch size. It prints a table, the FLOP formulas, and as its
last line one JSON object: pairs/s, tokens/s (real tokens, and computed positions with padding),
MFU by torchtitan's and open-instruct's definitions (both counting the reference forward),
peak GPU memory, the device and the model's parameter count.

    python benchmarks/gpu_check.py              # one CUDA device; refuses in one line without one
    python benchmarks/gpu_check.py --dry-run    # CPU rehearsal: tiny model, float32, sdpa, 3 steps

Sizing of the full run (not yet measured on a GPU): the steps are cheap, about 2.5 TFLOP per
pair counted as two sequences (8 * 0.89e9 parameters * 358 tokens, the HH means), so 14 steps
of 16 pairs are ~2 s of GPU work at 30% MFU on an H100 (~5 s for TRL, which pads to the longest
row and recomputes activations), ~15 s even at 5%. The run is dominated by building four
float32 1B models on the CPU and moving them (one took 21 s to initialise and 7 s to deepcopy
on 2 busy cores of the development VM: ~1 min on 16 cores) and by compiling FlexAttention: on
CPU (forward only, as far as CPU
FlexAttention goes) it compiled for the first length, again for a dynamic length and again
when grad mode changed, then not again over 12 more forwards alternating a train-mode and an
eval-mode model; on a GPU, with the backward kernels, that should be ~1-3 min inside the 4
warm-up steps. So ~3-5 min in all, under the 8-minute budget.
"""
import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import dpo_throughput  # noqa: E402
import trl_dpo_baseline  # noqa: E402
from common import add_comparison_args, check_comparison_args  # noqa: E402

HH_LENGTHS = ROOT / "benchmarks" / "hh_lengths.json"
# the ~1B Llama of the full run (953.2M parameters with an untied 32,000-token vocabulary), and
# config/model/tiny.yaml's dimensions for the dry run
FULL = dict(hidden=2048, layers=16, heads=32, intermediate=5632, vocab=32000, batch=16, steps=14,
            warmup_steps=4, threads=os.cpu_count())
DRY = dict(hidden=128, layers=2, heads=4, intermediate=384, vocab=1024, batch=4, steps=3,
           warmup_steps=1, threads=2)
# ours on the GPU: bf16 autocast over float32 weights, FlexAttention block masks, the prompt
# computed once per pair and the pairs packed; the dry run has no FlexAttention (CUDA only here)
OURS_GPU = ["mixed_precision=bf16", "attn_implementation=flex_attention", "share_prompt=true",
            "packing=true"]
OURS_DRY = ["attn_implementation=sdpa", "share_prompt=true", "packing=true"]

# Dense bf16 tensor-core peaks in FLOP/s, matched in order against torch.cuda.get_device_name(),
# as torchtitan's get_peak_flops lists them (torchtitan/tools/utils.py; NVIDIA's data sheets).
PEAK_BF16_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                   ("H200", 989e12), ("A100", 312e12))

FORMULAS = {
    "counted": "each pair as two sequences, prompt+chosen and prompt+rejected, n tokens each; "
               "timed steps only (after the warm-up steps), from the first kernel to the last "
               "(on CUDA torch.cuda.synchronize around each step); mfu_padded: each computed row of "
               "length T (padding included, ours with each prompt once) as a sequence of T",
    "torchtitan": "flops = sum over sequences of n*(6*N + 12*L*H*Q*n) (policy forward+backward; "
                  "torchtitan's 6*N + 12*L*H*Q*T per token with T = n) + n*(2*N + 4*L*H*Q*n) "
                  "(reference forward, one third of it; our addition); N = parameters without "
                  "the input embedding; mfu = flops / (seconds * peak)",
    "open_instruct": "flops = sum over sequences of 3*F(n) (policy forward+backward, open-instruct "
                     "ModelDims.flops(is_training=True)) + F(n) (reference forward, as its "
                     "reference-caching pass counts it); F(n) = L*(2*n*h*Q*(H + 2*K) + 2*n*H*Q*h "
                     "+ 4*H*Q*n^2 + 4*H*n^2 + 6*n*h*I + n*I) + 2*n*h*V; mfu = flops / "
                     "(seconds * peak)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, config/model/tiny.yaml's dimensions, float32, sdpa instead of "
                        "flex_attention, 3 steps each side")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                   help="TRL's DPOConfig.gradient_checkpointing ('on' is its default)")
    p.add_argument("--override", action="extend", nargs="+", default=[],
                   help="extra Hydra overrides for ours, after the check's own")
    p.set_defaults(lengths_file=str(HH_LENGTHS), **FULL)
    dry = p.parse_known_args(argv)[0].dry_run
    if dry:
        p.set_defaults(**DRY)
    args = p.parse_args(argv)
    check_comparison_args(p, args)
    # what dpo_throughput and trl_dpo_baseline read besides the shared flags
    args.loss, args.lr, args.precompute_ref, args.activation_checkpointing = "dpo", 1e-6, False, False
    args.override = (OURS_DRY if dry else OURS_GPU) + args.override
    args.bf16 = not dry
    return args


def model_dims(model) -> dict:
    """The sizes the FLOP formulas use, from a transformers causal LM."""
    c = model.config
    heads = c.num_attention_heads
    return {"L": c.num_hidden_layers, "H": heads,
            "K": getattr(c, "num_key_value_heads", None) or heads,
            "Q": getattr(c, "head_dim", None) or c.hidden_size // heads, "h": c.hidden_size,
            "I": c.intermediate_size, "V": c.vocab_size,
            "n_params": sum(p.numel() for p in model.parameters()),
            "N": sum(p.numel() for p in model.parameters())
            - model.get_input_embeddings().weight.numel()}


def torchtitan_flops(n: int, d: dict, k: int) -> int:
    """FLOPs of a sequence of n tokens: k = 6 for a forward and backward, 2 for a forward.
    torchtitan (github.com/pytorch/torchtitan, get_nparams_and_flops / get_num_flop_per_token):
    6*N + 12*L*H*Q*T per token, N without the embedding, T the sequence length; attention counted
    over the whole n x n square (its convention ignores causal sparsity)."""
    return k * n * (d["N"] + 2 * d["L"] * d["H"] * d["Q"] * n)


def open_instruct_flops(n: int, d: dict, k: int) -> int:
    """FLOPs of a sequence of n tokens: k = 6 for a forward and backward (3 forwards), 2 for a
    forward. open-instruct (github.com/allenai/open-instruct, open_instruct/utils.py ModelDims:
    attn_flops, mlp_flops, prefill_flops, flops(is_training=True) = 3x; dpo_tune_cache.py logs it
    as perf/mfu_step): per layer the q, k, v, o projections (2 FLOPs per multiply-add; k and v
    K heads wide), the n x n scores and weighted values, 4 FLOPs per score for the softmax, the
    SwiGLU MLP with its activation; then the output layer over every position."""
    L, H, K, Q, h, inner, V = (d[key] for key in ("L", "H", "K", "Q", "h", "I", "V"))
    attention = 2 * n * h * Q * (H + 2 * K) + 2 * n * H * Q * h + 4 * H * Q * n * n + 4 * H * n * n
    mlp = 6 * n * h * inner + n * inner
    return k // 2 * (L * (attention + mlp) + 2 * n * h * V)


DEFINITIONS = {"torchtitan": torchtitan_flops, "open_instruct": open_instruct_flops}


def peak_flops(device: str, device_name: str):
    """(bf16 peak FLOP/s, None) for a known GPU, else (None, the one-line reason MFU is null)."""
    if device != "cuda":
        return None, "no peak FLOP/s for a CPU: MFU is null (the dry run checks the code path)"
    for key, value in PEAK_BF16_FLOPS:
        if key in device_name:
            return value, None
    return None, (f"no bf16 peak FLOP/s known for {device_name!r}: MFU is null; add it to "
                  "PEAK_BF16_FLOPS in benchmarks/gpu_check.py")


def utilization(sequences, rows, seconds: float, d: dict, peak) -> dict:
    """Per definition: model TFLOP/s (policy forward+backward and reference forward over the
    real sequences), MFU, MFU without the reference, and MFU of the computed rows (padding)."""
    out = {}
    for name, flops in DEFINITIONS.items():
        policy = sum(flops(n, d, 6) for n in sequences)
        both = policy + sum(flops(n, d, 2) for n in sequences)
        padded = sum(count * (flops(length, d, 6) + flops(length, d, 2))
                     for count, length, _ in rows)
        out[name] = {"tflops_per_s": both / seconds / 1e12, **{
            key: None if peak is None else value / seconds / peak
            for key, value in (("mfu", both), ("mfu_policy_only", policy), ("mfu_padded", padded))}}
    return out


def side_summary(raw: dict, args, d: dict, peak) -> dict:
    """One framework's figures from its per-step records (the same counting for both)."""
    w = args.warmup_steps
    if len(raw["records"]) != args.steps or len(raw["times"]) != args.steps:
        raise RuntimeError(f"{raw['name']}: {len(raw['records'])} batches recorded and "
                           f"{len(raw['times'])} steps timed, expected {args.steps}")
    timed, seconds = raw["records"][w:], sum(raw["times"][w:])
    sequences = [n for r in timed for n in r["sequences"]]
    rows = [row for r in timed for row in r["rows"]]
    positions = sum(count * length for count, length, _ in rows)
    every = [n for r in raw["records"] for n in r["sequences"]]
    return {
        "pairs_per_s": len(sequences) / 2 / seconds, "tokens_per_s": sum(sequences) / seconds,
        "padded_tokens_per_s": positions / seconds,
        "padding_fraction": 1 - sum(real for _, _, real in rows) / positions,
        "step_time_s_median": sorted(raw["times"][w:])[len(raw["times"][w:]) // 2],
        "step_times_s": [round(t, 4) for t in raw["times"]],
        "timed_s": seconds, "pairs_timed": len(sequences) // 2, "tokens_timed": sum(sequences),
        "pairs_all_steps": len(every) // 2, "tokens_all_steps": sum(every),
        "mfu": utilization(sequences, rows, seconds, d, peak), "peak_memory_mb": raw["memory"],
        "setup_s": raw["setup_s"], "losses": [round(float(v), 6) for v in raw["losses"]],
        "attention": raw["attention"], "layout": raw["layout"], "n_params": raw["n_params"]}


def peak_memory_mb(device: str) -> float:
    """Peak since the side began: torch.cuda.max_memory_allocated on CUDA; on CPU the process's
    peak resident memory so far (ru_maxrss: TRL's includes ours')."""
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_layouts(trainer, expected: dict) -> list:
    """Wrap trainer.lay_out (called once per micro-batch): per call, the real lengths of the
    pairs' two sequences and each forward's rows as [rows, row length, real positions]."""
    records, inner = [], trainer.lay_out

    def recording(batch):
        layouts = inner(batch)
        pairs = [expected[prompt] for prompt in batch["prompt"]]
        records.append({"sequences": [p + n for p, *responses in pairs for n in responses],
                        "rows": [[*layout.input_ids.shape, layout.tokens] for layout in layouts]})
        return layouts

    trainer.lay_out = recording
    return records


def run_ours(args, device: str):
    """Our DPO run through dpo_throughput.build_trainer and train_timed; (raw record, dims)."""
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        start = time.perf_counter()
        _, trainer, n_params, _ = dpo_throughput.build_trainer(args, tmp)
        setup_s = time.perf_counter() - start
        records = record_layouts(trainer, dpo_throughput.expected_lengths(args))
        steps = dpo_throughput.train_timed(trainer, args)
        dims = model_dims(trainer.policy)
        layout = ("prompt shared, pairs packed" if trainer.uses_layout
                  else "usual rows (scoring.check_layout turned sharing and packing off)")
        raw = {"name": "ours", "records": records, "times": steps["time"], "losses": steps["loss"],
               "memory": peak_memory_mb(device), "setup_s": setup_s, "n_params": n_params,
               "attention": trainer.policy.config._attn_implementation, "layout": layout}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return raw, dims


def record_trl_batches(trainer) -> list:
    """Wrap TRL's training_step: per step, the real length of each row (chosen and rejected
    stacked, 2 * batch rows) and the rows as [rows, row length, real positions]."""
    records, inner = [], trainer.training_step

    def recording(model, inputs, *rest, **kwargs):
        lengths = inputs["attention_mask"].sum(-1).tolist()
        records.append({"sequences": lengths, "rows": [[*inputs["attention_mask"].shape,
                                                        sum(lengths)]]})
        return inner(model, inputs, *rest, **kwargs)

    trainer.training_step = recording
    return records


def run_trl(args, device: str) -> dict:
    """TRL's DPOTrainer through trl_dpo_baseline.build_trainer, timed by its step callback."""
    start = time.perf_counter()
    trainer, timer, n_params, _, _ = trl_dpo_baseline.build_trainer(args)
    setup_s = time.perf_counter() - start
    losses, _, _ = trl_dpo_baseline.record_steps(trainer)
    records = record_trl_batches(trainer)
    try:
        trainer.train()
    finally:
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    return {"name": "TRL", "records": records, "losses": losses, "memory": peak_memory_mb(device),
            "times": [end - begin for begin, end in zip(timer.begins, timer.ends)],
            "setup_s": setup_s, "n_params": n_params,
            "attention": trainer.model.config._attn_implementation,
            "layout": "chosen and rejected rows, padded to the batch's longest"}


def fresh_memory(device: str) -> float:
    """Free what the previous side left, restart the peak; MiB still allocated (CUDA)."""
    import torch
    gc.collect()
    if device != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def run(args, progress: dict) -> dict:
    """Ours, then TRL, in this process; the report (see the module docstring)."""
    import datasets
    import torch
    import transformers
    import trl
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak, reason = peak_flops(device, device_name)
    start = time.perf_counter()
    progress["stage"], left = "ours", {"ours": fresh_memory(device)}
    ours, dims = run_ours(args, device)
    progress["stage"], left["trl"] = "TRL", fresh_memory(device)
    theirs = run_trl(args, device)
    progress["stage"] = "report"
    sides = {"ours": side_summary(ours, args, dims, peak), "trl": side_summary(theirs, args, dims, peak)}
    return {
        "benchmark": "gpu_check", "dry_run": args.dry_run, "device": device,
        "device_name": device_name, "peak_bf16_flops": peak, "mfu_null_reason": reason,
        "note": ("dry run: CPU, the tiny model, float32, sdpa instead of flex_attention (CUDA "
                 "only); its numbers check the code path, not a GPU") if args.dry_run else
                ("bf16 autocast over float32 weights on both sides; ours flex_attention with "
                 "shared prompts and packing, TRL its defaults"),
        "model": {"arch": args.arch, "hidden": dims["h"], "layers": dims["L"], "heads": dims["H"],
                  "kv_heads": dims["K"], "intermediate": dims["I"], "vocab": dims["V"],
                  "n_params": dims["n_params"], "n_params_without_embedding": dims["N"]},
        "formulas": FORMULAS, **sides,
        # on CPU the peaks are the process's so far (TRL's includes ours'): no memory ratio
        "ours_vs_trl": {key: sides["ours"][key] / sides["trl"][key]
                        for key in ("pairs_per_s", "tokens_per_s", "peak_memory_mb")
                        if key != "peak_memory_mb" or device == "cuda"},
        "memory_allocated_at_start_mb": left,
        "settings": {"lengths_file": args.lengths_file, "batch": args.batch, "steps": args.steps,
                     "warmup_steps": args.warmup_steps, "seed": args.seed, "threads": args.threads,
                     "ours_overrides": args.override,
                     "trl_gradient_checkpointing": args.gradient_checkpointing},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "python": platform.python_version()},
        "wall_s": time.perf_counter() - start}


def table_rows(r: dict):
    """(label, value getter, format) for the printed table."""
    def mfu(definition, key):
        return lambda side: side["mfu"][definition][key]
    return [("pairs/s", lambda s: s["pairs_per_s"], "{:.2f}"),
            ("tokens/s, real (both sequences)", lambda s: s["tokens_per_s"], "{:,.0f}"),
            ("tokens/s, computed (with padding)", lambda s: s["padded_tokens_per_s"], "{:,.0f}"),
            ("padding of computed positions", lambda s: s["padding_fraction"], "{:.1%}"),
            ("median step, s", lambda s: s["step_time_s_median"], "{:.4f}"),
            ("TFLOP/s (torchtitan)", mfu("torchtitan", "tflops_per_s"), "{:.2f}"),
            ("MFU torchtitan", mfu("torchtitan", "mfu"), "{:.1%}"),
            ("MFU torchtitan, policy only", mfu("torchtitan", "mfu_policy_only"), "{:.1%}"),
            ("MFU torchtitan, padded rows", mfu("torchtitan", "mfu_padded"), "{:.1%}"),
            ("MFU open-instruct", mfu("open_instruct", "mfu"), "{:.1%}"),
            ("MFU open-instruct, policy only", mfu("open_instruct", "mfu_policy_only"), "{:.1%}"),
            (f"peak memory, MiB ({'GPU allocated' if r['device'] == 'cuda' else 'process RSS'})",
             lambda s: s["peak_memory_mb"], "{:,.0f}"),
            ("setup, s", lambda s: s["setup_s"], "{:.1f}"),
            ("attention", lambda s: s["attention"], "{}")]


def print_report(r: dict):
    """The table, the counting and the formulas; the JSON line follows."""
    m, peak = r["model"], r["peak_bf16_flops"]
    print(f"device: {r['device_name']} ({r['device']}), bf16 peak "
          + ("unknown: " + r["mfu_null_reason"] if peak is None else f"{peak / 1e12:.0f} TFLOP/s"))
    print(f"model: {m['arch']}, hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads, "
          f"MLP {m['intermediate']}, vocab {m['vocab']}: {m['n_params']:,} parameters "
          f"({m['n_params_without_embedding']:,} without the input embedding)")
    print(r["note"])
    s = r["settings"]
    print(f"pairs: {s['lengths_file']}, {s['batch']} per step, {s['steps']} steps of which the "
          f"first {s['warmup_steps']} are not timed; ours: {' '.join(s['ours_overrides'])}")
    print(f"{'':36} {'ours':>14} {'TRL':>14}")
    for label, get, fmt in table_rows(r):
        cells = [get(r[side]) for side in ("ours", "trl")]
        print(f"{label:36} " + " ".join(f"{'n/a' if v is None else fmt.format(v):>14}"
                                        for v in cells))
    memory = r["ours_vs_trl"].get("peak_memory_mb")
    print(f"ours / TRL: {r['ours_vs_trl']['pairs_per_s']:.2f}x pairs/s"
          + ("" if memory is None else f", {memory:.2f}x peak GPU memory"))
    print(f"rows: ours {r['ours']['layout']}; TRL {r['trl']['layout']}")
    for name, text in r["formulas"].items():
        print(f"{name}: {text}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine (before torch loads)
    import cpu_env  # noqa: F401  (before torch, as train.py)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a "
              "machine with one GPU, or add --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    progress = {"stage": "start"}
    try:
        result = run(args, progress)
        print_report(result)
    except Exception as e:  # one line, the traceback in a file
        with tempfile.NamedTemporaryFile("w", prefix="gpu_check_", suffix=".txt",
                                         delete=False) as f:
            traceback.print_exc(file=f)
        message = (str(e).strip().splitlines() or [""])[0]
        print(f"gpu_check: failed in {progress['stage']}: {type(e).__name__}: {message} "
              f"(traceback: {f.name})", file=sys.stderr)
        return 1
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
