"""Score what a checkpoint generates: `python evaluate.py checkpoint=RUN/LATEST reward=synthetic`.

Samples `n_samples` completions per evaluation prompt from the policy and from the reference model,
scores them with a reward from `REWARDS`, estimates the sequence KL(pi || pi_ref) on the policy's
own samples, and writes `eval.json` (and the samples, `eval_samples.jsonl`) beside the checkpoint:

- mean reward of policy samples, of reference samples and of the dataset's chosen completions;
- KL(pi || pi_ref) three ways (the log-ratio, Schulman's k3 and the exact per-position sum);
- win rates of the policy's samples against the chosen completion and the reference's samples,
  judged by the reward (ties count half), with Wilson 95% intervals;
- mean sample length; the held-out implicit-reward accuracy on the split's preference pairs.

Every mean comes with a standard error clustered by prompt (the samples of one prompt are not
independent of each other): the standard deviation of the per-prompt means over sqrt(#prompts).

The checkpoint is a step-N/ or LATEST/ directory of any trainer (policy.pt holds a full state dict,
or sharded/ the shards of checkpoint_format=sharded; the run's config.yaml says how to build the
model, the tokenizer, the data and the reference), its files checked against its manifest first,
or a Hugging Face directory (config.json, no policy.pt), for which `reference=PATH` is required.
"""
import cpu_env  # noqa: F401  (bitwise-reproducible MKL, as train.py: before torch loads it)

import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import checkpoints
import preference_datasets
import sampling
import utils
import vision
import rewards
from rewards import REWARDS, RewardContext, score_completions
from utils import ConfigError, is_number, require

utils.register_resolvers()  # --help lists the config groups (config/hydra/help/evaluate.yaml)

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")
Z95 = 1.959963984540054  # the two-sided 95% normal quantile

# ----------------------------------------------------------------------------- estimators

def mean_and_se(values: torch.Tensor) -> Dict[str, float]:
    """Mean and standard error of (P, S) values: S samples for each of P prompts.

    The error is clustered by prompt: the standard deviation of the P per-prompt means over
    sqrt(P), since samples of one prompt are correlated. With one prompt, the samples' own.
    """
    values = values.double().reshape(values.shape[0], -1)
    units = values.mean(dim=1) if values.shape[0] > 1 else values.reshape(-1)
    se = units.std(unbiased=True) / math.sqrt(units.numel()) if units.numel() > 1 else float("nan")
    return {"mean": float(values.mean()), "se": _finite(float(se))}


def wilson_interval(p: float, n: float, z: float = Z95) -> List[float]:
    """The Wilson score interval of a proportion p observed over n trials (Wilson 1927)."""
    if n <= 0:
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at p = 0 or 1 the bound on that side is exactly 0 or 1 (rounding would leave it off by ~1e-17)
    return [0.0 if p <= 0 else max(0.0, centre - half), 1.0 if p >= 1 else min(1.0, centre + half)]


def win_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where a beats b, 0.5 for a tie, 0 where b wins (broadcasting)."""
    return (a > b).double() + 0.5 * (a == b).double()


def proportion_summary(scores: torch.Tensor) -> Dict[str, object]:
    """Mean, clustered standard error and Wilson 95% interval of (P, S) scores in [0, 1].

    Wilson's interval is computed with the effective sample size p(1-p)/se^2 (the design effect
    of the clustering; Korn & Graubard 1998), capped at the number of scores. Ties make a score
    less variable than a coin flip, which this also accounts for; with se = 0 it uses all scores.
    """
    summary = mean_and_se(scores)
    p, se, n = summary["mean"], summary["se"], scores.numel()
    n_eff = n if not se or se != se or p in (0.0, 1.0) else min(n, p * (1 - p) / se ** 2)
    summary.update(ci95=wilson_interval(p, n_eff), n=n)
    return summary


def content_length(completion: Sequence[int], eos_id: int) -> int:
    """Tokens before the EOS."""
    return len(completion) - (1 if completion and completion[-1] == eos_id else 0)


# ----------------------------------------------------------------------------- models

def build_initial_model(run_config: DictConfig, tokenizer):
    """The model a run started from, built as train.build_models builds it (seeded initial
    weights, then model.archive if any). One place to adapt if that signature changes."""
    import train
    config = copy.deepcopy(run_config)
    config.loss = OmegaConf.create({"name": "sft"})  # a loss without a reference: build one model
    # whole, in this process: also when it runs among ranks (rewards: an online run's judge)
    config.trainer = "BasicTrainer"
    policy, _ = train.build_models(config, tokenizer)
    return policy


def build_run_tokenizer(model_cfg: DictConfig, trust_remote_code: bool):
    """(tokenizer, processor) a run trained with: its tokenizer (its own, or its model's, from a
    GGUF file if it had one), and a vision-language model's processor (else None)."""
    if model_cfg.vision:
        import train
        return train.build_tokenizer(model_cfg)
    gguf = OmegaConf.select(model_cfg, "gguf_file", default=None)
    if model_cfg.tokenizer_name_or_path is not None or not gguf:
        return utils.build_tokenizer(model_cfg.tokenizer_name_or_path or model_cfg.name_or_path,
                                     trust_remote_code), None
    return utils.build_tokenizer(model_cfg.name_or_path, trust_remote_code, gguf_file=gguf), None


def is_vision_dir(path) -> bool:
    """Whether a Hugging Face directory holds a processor (a vision-language model's)."""
    return any((Path(path) / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


def build_dir_tokenizer(path: str, trust_remote_code: bool):
    """(tokenizer, processor or None) of a Hugging Face model directory."""
    if not is_vision_dir(path):
        return utils.build_tokenizer(path, trust_remote_code), None
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return processor.tokenizer, processor


def read_policy(path: Path, what: str) -> tuple:
    """(state dict, step_idx) of the policy.pt at `path`."""
    archive = utils.safe_torch_load(str(path), what)
    state = archive.get("state") if isinstance(archive, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"{what} file {path} is not a policy.pt from this framework "
                          "(expected a dict with a 'state' model state dict)")
    return state, archive.get("step_idx")


def load_state(model, state: Dict[str, torch.Tensor], path: Path, what: str):
    """A copy of `model` with `state`, the state dict read from `path`."""
    loaded = copy.deepcopy(model)
    try:
        loaded.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{what} file {path} does not fit the model: {str(e).splitlines()[0]}")
    return loaded


def load_hf_model(path: str, trust_remote_code: bool, what: str):
    try:
        return utils.model_class(is_vision_dir(path)).from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}={path} could not be loaded as a causal LM: {str(e).splitlines()[0]}")


def policy_file(path: Path) -> Optional[Path]:
    """The policy.pt a path names (the file itself or the one in a checkpoint directory)."""
    if path.is_file() and path.suffix == ".pt":
        return path
    return path / "policy.pt" if (path / "policy.pt").is_file() else None


def with_current_defaults(saved: DictConfig) -> DictConfig:
    """A run's saved config with every key added to config/config.yaml (or to the model presets,
    config/model/blank_model.yaml) since it was written, at its current default: so checkpoints
    of older runs still build with today's train.build_models."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml")
    for key in ("defaults", "hydra", "exp_name", "local_run_dir"):  # Hydra-only, or interpolated
        if key in base:
            del base[key]
    base.model = OmegaConf.load(Path(CONFIG_DIR) / "model" / "blank_model.yaml")
    return OmegaConf.merge(base, saved)


def load_models(cfg: DictConfig):
    """(policy, reference, tokenizer, processor (a VLM's) or None, run config or None, step or
    None) for cfg.checkpoint."""
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint={checkpoint} is not a directory; pass a step-N/ or LATEST/ "
                          "directory of a run, or a Hugging Face model directory")
    weights = "policy.pt" if policy_file(checkpoint) is not None else (
        checkpoints.SHARDED_DIR if checkpoints.is_sharded(checkpoint) else None)
    if weights is not None and (checkpoint / "config.yaml").is_file():
        checkpoints.verify_files(checkpoint, ["config.yaml", weights])
    run_config = None
    if (checkpoint / "config.yaml").is_file():
        run_config = with_current_defaults(OmegaConf.load(checkpoint / "config.yaml"))
    if weights is not None and run_config is not None:
        return _load_framework_checkpoint(cfg, checkpoint, run_config)
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"checkpoint={checkpoint} holds neither policy.pt or sharded/ with "
                          "config.yaml (a checkpoint of train.py, checkpoint_format=full or "
                          "sharded) nor config.json (a Hugging Face model)")
    if cfg.reference is None:
        raise ConfigError(f"checkpoint={checkpoint} is a Hugging Face directory, which does not say "
                          "what it was trained from; pass reference=PATH (a policy.pt, a checkpoint "
                          "or a Hugging Face directory)")
    tokenizer, processor = build_dir_tokenizer(str(checkpoint), cfg.trust_remote_code)
    policy = load_hf_model(str(checkpoint), cfg.trust_remote_code, "checkpoint")
    return policy, _explicit_reference(cfg, policy), tokenizer, processor, run_config, None


def _load_framework_checkpoint(cfg, checkpoint: Path, run_config: DictConfig):
    run_config.model.trust_remote_code = cfg.trust_remote_code  # never from a saved file
    if cfg.reference is not None:
        run_config.model.archive = None  # only the architecture is needed
    tokenizer, processor = build_run_tokenizer(run_config.model, cfg.trust_remote_code)
    try:
        initial = build_initial_model(run_config, tokenizer)
    except ConfigError as e:
        raise ConfigError(f"{e} (the reference comes from the run's config; pass reference=PATH "
                          "to give it explicitly)")
    if checkpoints.is_sharded(checkpoint):  # checkpoint_format=sharded: gathered in this process
        state = checkpoints.load_policy_state(checkpoint)
        step = utils.safe_torch_load(str(checkpoint / checkpoints.TRAINER_STATE),
                                     "checkpoint")["example_counter"]
        source = checkpoint / checkpoints.SHARDED_DIR
    else:
        source = checkpoint / "policy.pt"
        state, step = read_policy(source, "checkpoint")
    policy = load_state(initial, state, source, "checkpoint")
    reference = initial if cfg.reference is None else _explicit_reference(cfg, policy)
    return policy, reference, tokenizer, processor, run_config, step


def _explicit_reference(cfg: DictConfig, policy):
    path = Path(cfg.reference)
    found = policy_file(path)
    if found is not None:
        checkpoints.verify_files(found.parent, [found.name])
        return load_state(policy, read_policy(found, "reference")[0], found, "reference")
    return load_hf_model(str(cfg.reference), cfg.trust_remote_code, "reference")


# ----------------------------------------------------------------------------- data

def data_settings(cfg: DictConfig, run_config: Optional[DictConfig]) -> dict:
    """datasets, dataset_paths, max_length, max_prompt_length: evaluate's own, else the run's."""
    settings = {}
    for key in ("datasets", "dataset_paths", "max_length", "max_prompt_length"):
        value = cfg[key]
        if value is None and run_config is not None:
            value = run_config[key]
        if value is None and key != "dataset_paths":
            raise ConfigError(f"{key} is not set and checkpoint={cfg.checkpoint} has no run "
                              f"config.yaml to take it from; pass {key}=...")
        settings[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return settings


def load_prompts(settings: dict, tokenizer, split: str, n_prompts: Optional[int],
                 processor=None) -> List[dict]:
    """The first n_prompts distinct prompts of the split, in order, each with its (truncated)
    prompt ids, its image inputs ({} without images; a VLM's `processor` reads them), its first
    pair's chosen completion, and all its pairs as (chosen, rejected) completion ids, tokenised
    as training tokenises them. Prompts of the same text with other images are distinct.
    Unpaired data (prompt, completion, label; what KTO trains on) gives the prompts that have a
    desirable completion, as the chosen one, and no pairs."""
    try:
        batches = _prompt_batches(settings, tokenizer, split, processor, sft_mode=False)
    except preference_datasets.UnpairedDataError:
        print(f"the {split} split holds unpaired examples (prompt, completion, label): each prompt's "
              "first desirable completion is its chosen one, and the implicit-reward accuracy, which "
              "ranks pairs, is not measured", flush=True)
        batches = _prompt_batches(settings, tokenizer, split, processor, sft_mode=True)
    prompts: Dict[tuple, dict] = {}
    for batch in batches:
        images = batch["image_inputs"][0] if "image_inputs" in batch else {}
        key = (batch["prompt"][0], vision.digest(images))
        if key not in prompts:
            if n_prompts is not None and len(prompts) == n_prompts:
                break
            prompts[key] = {"prompt": key[0], "prompt_ids": batch["prompt_input_ids"][0].tolist(),
                            "image_inputs": images, "chosen": batch["chosen_response_only"][0], "pairs": []}
        if not batch.get("sft_mode"):
            prompts[key]["pairs"].append(tuple(_response_ids(batch, side) for side in ("chosen", "rejected")))
    return list(prompts.values())


def _prompt_batches(settings: dict, tokenizer, split: str, processor, sft_mode: bool):
    paths = {name: (settings["dataset_paths"] or {}).get(name) for name in settings["datasets"]}
    try:
        batches = preference_datasets.get_batch_iterator(
            list(settings["datasets"]), tokenizer, split=split, batch_size=1, shuffle=False,
            max_length=settings["max_length"], max_prompt_length=settings["max_prompt_length"],
            n_epochs=1, silent=True, paths=paths, sft_mode=sft_mode, processor=processor)
    except preference_datasets.UnpairedDataError:
        raise
    except ValueError as e:
        raise ConfigError(str(e))
    return ({**batch, "sft_mode": sft_mode} for batch in batches)


def _response_ids(batch: dict, side: str) -> List[int]:
    labels = batch[f"{side}_labels"][0]
    return labels[labels != -100].tolist()


# ----------------------------------------------------------------------------- evaluation

def validate_eval_config(cfg: DictConfig):
    """Refuse a bad setting with one line naming the key, the value and what is allowed."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}; pass them on the "
                          f"command line, e.g. {missing[0]}=...")
    for key in ("n_samples", "max_new_tokens", "batch_size", "score_batch_size", "n_prompts"):
        value = cfg[key]
        if not (value is None and key == "n_prompts"):
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"{key}={value!r} must be a positive integer")
    require(is_number(cfg.temperature) and cfg.temperature > 0,
             f"temperature={cfg.temperature!r} must be a number > 0")
    require(is_number(cfg.top_p) and 0 < cfg.top_p <= 1, f"top_p={cfg.top_p!r} must be in (0, 1]")
    require(isinstance(cfg.seed, int) and cfg.seed >= 0, f"seed={cfg.seed!r} must be a non-negative integer")
    require(isinstance(cfg.trust_remote_code, bool),
             f"trust_remote_code={cfg.trust_remote_code!r} must be true or false")
    rewards.check_reward_config(OmegaConf.to_container(cfg.reward))
    name = cfg.reward.name
    require(not REWARDS[name].pairwise,
            f"reward={name} is a pairwise judge (it ranks several answers to one prompt, for online "
            "training); evaluate.py scores single samples: use reward=synthetic, reward_model or implicit")


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no NaN


def implicit_accuracy(policy, reference, prompts: List[dict], batch_size: int, device) -> dict:
    """How often DPO's implicit reward (summed log-probs) ranks a held-out pair's chosen completion
    above its rejected one, as training's rewards_eval/accuracies does (beta > 0 does not matter)."""
    prompt_ids, completions, images = [], [], []
    for p in prompts:
        for chosen, rejected in p["pairs"]:
            prompt_ids += [p["prompt_ids"], p["prompt_ids"]]
            completions += [chosen, rejected]
            images += [p["image_inputs"], p["image_inputs"]]
    if not completions:  # unpaired data: nothing to rank
        return {"mean": None, "se": None, "ci95": None, "n": 0}
    stats = score_completions(policy, reference, prompt_ids, completions, batch_size, device, images)
    rewards = (stats["policy_logps"] - stats["reference_logps"]).view(-1, 2)
    correct = (rewards[:, 0] > rewards[:, 1]).double()
    p, n = float(correct.mean()), correct.numel()
    return {"mean": p, "se": _finite(math.sqrt(p * (1 - p) / n)), "ci95": wilson_interval(p, n), "n": n}


def generate_both(policy, reference, tokenizer, prompts: List[dict], cfg: DictConfig, device):
    """Completion ids from the policy and from the reference, each (P * n_samples) prompt-major.
    Each model samples from its own seed, so the reference's samples are the same whichever
    checkpoint is evaluated against it, and independent of the policy's."""
    generation = dict(temperature=float(cfg.temperature), top_p=float(cfg.top_p),
                      max_new_tokens=cfg.max_new_tokens)
    prompt_ids = [p["prompt_ids"] for p in prompts]
    images = [p["image_inputs"] for p in prompts]
    out = []
    for offset, model in ((0, policy), (1, reference)):
        utils.set_seed(2 * cfg.seed + offset)
        out.append(sampling.sample_token_ids(model, tokenizer, prompt_ids, cfg.n_samples, generation,
                                             cfg.batch_size, device, images=images))
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Sample, score and summarise; writes eval.json and eval_samples.jsonl. Returns the results."""
    validate_eval_config(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy, reference, tokenizer, processor, run_config, step = load_models(cfg)
    policy, reference = policy.to(device).eval(), reference.to(device).eval()
    prompts = load_prompts(data_settings(cfg, run_config), tokenizer, cfg.split, cfg.n_prompts, processor)
    P, S = len(prompts), cfg.n_samples
    policy_ids, reference_ids = generate_both(policy, reference, tokenizer, prompts, cfg, device)
    repeated = [p for p in prompts for _ in range(S)]
    kl = score_completions(policy, reference, [p["prompt_ids"] for p in repeated], policy_ids,
                           cfg.score_batch_size, device, [p["image_inputs"] for p in repeated])
    run_loss = OmegaConf.to_container(run_config.loss) if run_config is not None else None
    context = RewardContext(policy, reference, tokenizer, device, run_loss, cfg.score_batch_size,
                            cfg.trust_remote_code)
    reward_args = {k: v for k, v in OmegaConf.to_container(cfg.reward).items() if k != "name"}
    scorer = REWARDS[cfg.reward.name].build(reward_args, context)
    texts = {side: tokenizer.batch_decode(ids, skip_special_tokens=True)
             for side, ids in (("policy", policy_ids), ("reference", reference_ids))}
    repeated_prompts = [p["prompt"] for p in prompts for _ in range(S)]
    # a VLM's prompts are scored with their images (the implicit reward reads them)
    with_images = processor is not None
    rewards = {side: scorer(repeated_prompts, texts[side], repeated if with_images else None).view(P, S)
               for side in texts}
    rewards["chosen"] = scorer([p["prompt"] for p in prompts], [p["chosen"] for p in prompts],
                               prompts if with_images else None).view(P, 1)
    eos = tokenizer.eos_token_id
    results = {
        "checkpoint": str(cfg.checkpoint), "step": step,
        "reference": cfg.reference if cfg.reference is not None else "the run's initial model",
        "reward": OmegaConf.to_container(cfg.reward), "split": cfg.split, "n_prompts": P,
        "n_samples": S, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
        "kl_is_of_the_models": cfg.temperature == 1 and cfg.top_p == 1,
        "reward_policy": mean_and_se(rewards["policy"]),
        "reward_reference": mean_and_se(rewards["reference"]),
        "reward_chosen": mean_and_se(rewards["chosen"]),
        "kl_log_ratio": mean_and_se(kl["k1"].view(P, S)),
        "kl_k3": mean_and_se(kl["k3"].view(P, S)),
        "kl_per_position": mean_and_se(kl["position_kl"].view(P, S)),
        "win_rate_vs_chosen": proportion_summary(win_scores(rewards["policy"], rewards["chosen"])),
        "win_rate_vs_reference": proportion_summary(win_scores(rewards["policy"], rewards["reference"])),
        "length_policy": mean_and_se(_lengths(policy_ids, eos).view(P, S)),
        "length_reference": mean_and_se(_lengths(reference_ids, eos).view(P, S)),
        "truncated_policy": sum(eos not in ids for ids in policy_ids) / len(policy_ids),
        "implicit_accuracy": implicit_accuracy(policy, reference, prompts, cfg.score_batch_size, device),
    }
    write_outputs(cfg, results, prompts, texts, rewards, kl)
    return results


def _lengths(completions: List[List[int]], eos_id: int) -> torch.Tensor:
    return torch.tensor([content_length(c, eos_id) for c in completions], dtype=torch.float64)


def output_paths(cfg: DictConfig):
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.checkpoint) / "eval.json"
    return out, out.with_name(out.stem + "_samples.jsonl")


def write_outputs(cfg: DictConfig, results: dict, prompts: List[dict], texts: dict, rewards: dict,
                  kl: dict):
    """eval.json, and one line per prompt with its samples and their rewards."""
    out, samples_path = output_paths(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)  # never a half-written eval.json
    S = cfg.n_samples
    with open(samples_path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({
                "prompt": p["prompt"], "chosen": p["chosen"],
                "chosen_reward": float(rewards["chosen"][i, 0]),
                "policy": texts["policy"][i * S:(i + 1) * S],
                "policy_reward": rewards["policy"][i].tolist(),
                "policy_kl": kl["k1"][i * S:(i + 1) * S].tolist(),
                "reference": texts["reference"][i * S:(i + 1) * S],
                "reference_reward": rewards["reference"][i].tolist()}) + "\n")


def format_table(results: dict) -> str:
    """A short text table of the main numbers (mean ± standard error, [95% interval])."""
    def pm(entry):
        if entry["mean"] is None:
            return "not measured (no pairs)"
        se = entry["se"]
        text = f"{entry['mean']:.4f} ± {se:.4f}" if se is not None else f"{entry['mean']:.4f}"
        if "ci95" in entry:
            text += f"  [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"
        return text
    rows = [(f"reward ({results['reward']['name']}): policy", pm(results["reward_policy"])),
            ("reward: reference", pm(results["reward_reference"])),
            ("reward: dataset's chosen", pm(results["reward_chosen"])),
            ("KL(pi||ref), log-ratio", pm(results["kl_log_ratio"])),
            ("KL(pi||ref), k3", pm(results["kl_k3"])),
            ("KL(pi||ref), per-position", pm(results["kl_per_position"])),
            ("win rate vs chosen", pm(results["win_rate_vs_chosen"])),
            ("win rate vs reference", pm(results["win_rate_vs_reference"])),
            ("length: policy / reference", f"{results['length_policy']['mean']:.2f} / "
                                           f"{results['length_reference']['mean']:.2f} tokens"),
            ("implicit-reward accuracy", pm(results["implicit_accuracy"]))]
    width = max(len(name) for name, _ in rows)
    header = (f"{results['checkpoint']}: {results['n_prompts']} prompts x {results['n_samples']} "
              f"samples (mean ± s.e. [95% interval])")
    return "\n".join([header] + [f"  {name:<{width}}  {value}" for name, value in rows])


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base=None)
def main(cfg: DictConfig):
    try:
        results = evaluate(cfg)
    except (ConfigError, preference_datasets.DatasetFormatError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_table(results), flush=True)
    print(f"wrote {output_paths(cfg)[0]}", flush=True)


if __name__ == "__main__":
    main()
