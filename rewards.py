"""Rewards and judges, shared by evaluate.py (scoring a checkpoint's samples) and online training
(online.py: ranking the policy's own answers). Each reward is one `REWARDS` entry, built from its
config/reward/NAME.yaml into scorer(prompts, completions) -> (N,) rewards:

- synthetic: the embedded tasks' ground truth (synthetic_data.completion_credit);
- reward_model: a local sequence-classification model on prompt + completion;
- implicit: DPO's implicit reward beta * (log pi - log pi_ref) of the completion;
- judge: a local causal LM asked which of two answers is better, in both orders (a pairwise judge:
  a completion's reward is its mean preference over the other answers to the same prompt).

Also the log-probs of completions under two models (score_completions) that the implicit reward
and evaluate.py's KL estimates share.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import sampling
import synthetic_data
import vision
from utils import ConfigError

def synthetic_reward(prompts: Sequence[str], completions: Sequence[str],
                     partial_credit: bool = True) -> torch.Tensor:
    """The ground-truth reward of the synthetic tasks (synthetic_data.completion_credit).

    Returns: (N,) float64 in [0, 1].
    Raises:
        ConfigError: a prompt is not one of the embedded synthetic tasks.
    """
    return torch.tensor([_synthetic_credit(p, c, partial_credit) for p, c in zip(prompts, completions)],
                        dtype=torch.float64)


def _synthetic_credit(prompt: str, completion: str, partial_credit: bool) -> float:
    try:
        return synthetic_data.completion_credit(prompt, completion, partial_credit)
    except ValueError:  # raised only for a prompt no synthetic task asks
        raise ConfigError(f"reward=synthetic scores only the embedded synthetic tasks, and the prompt "
                          f"{prompt!r} is not one; use reward=reward_model reward.name_or_path=DIR or "
                          "reward=implicit for other data") from None


def reward_model_scores(model, tokenizer, texts: Sequence[str], batch_size: int, max_length: int,
                        label_index: Optional[int], device) -> torch.Tensor:
    """The reward model's score of each text (prompt + completion), in batches. Returns (N,)."""
    scores = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(device)
        with torch.no_grad():
            logits = model(**enc).logits.float()
        scores.append(logits[:, 0 if label_index is None else label_index].cpu())
    return torch.cat(scores).double()


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (arXiv 2305.18290, eq. 5).

    Args: policy_logps, reference_logps: (N,) summed log-probs of the completions.
    Returns: (N,).
    """
    return beta * (policy_logps - reference_logps)


@dataclass
class RewardContext:
    """What a reward may need besides its own arguments."""
    policy: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: object
    device: torch.device
    run_loss: Optional[dict]
    score_batch_size: int
    trust_remote_code: bool


# scorer(prompts, completions, images=None): images, for a VLM's prompts, the prompt records
# (evaluate.load_prompts) of each row, whose prompt ids and image inputs the implicit reward scores
Scorer = Callable[..., torch.Tensor]


def _build_synthetic(args: dict, ctx: RewardContext) -> Scorer:
    return lambda prompts, completions, images=None: synthetic_reward(prompts, completions,
                                                                      args["partial_credit"])


def _load_scoring_model(model_class, path: str, ctx: RewardContext, what: str):
    """(model on ctx.device in eval mode, its tokenizer) from a local directory or hub name."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=ctx.trust_remote_code)
        model = model_class.from_pretrained(path, trust_remote_code=ctx.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward.name_or_path={path} is not a loadable {what}: {str(e).splitlines()[0]}")
    return model.to(ctx.device).eval(), tokenizer


def _build_reward_model(args: dict, ctx: RewardContext) -> Scorer:
    from transformers import AutoModelForSequenceClassification
    path = args["name_or_path"]
    model, tokenizer = _load_scoring_model(AutoModelForSequenceClassification, path, ctx,
                                           "sequence-classification model")
    if args["label_index"] is None and model.config.num_labels != 1:
        raise ConfigError(f"reward.name_or_path={path} has {model.config.num_labels} outputs; pass "
                          "reward.label_index=I to say which logit is the reward")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    # The classifier reads the last non-pad token; it finds it through the config's pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"  # keep the completion when a text is too long
    return lambda prompts, completions, images=None: reward_model_scores(
        model, tokenizer, [p + c for p, c in zip(prompts, completions)], args["batch_size"],
        args["max_length"], args["label_index"], ctx.device)


def _build_implicit(args: dict, ctx: RewardContext) -> Scorer:
    policy, reference, run_loss = ctx.policy, ctx.reference, ctx.run_loss
    if args["checkpoint"] is not None:
        policy, reference, run_loss = _checkpoint_models(args["checkpoint"], ctx)
    beta = args["beta"]
    if beta is None:
        beta = (run_loss or {}).get("beta")
        if beta is None:
            raise ConfigError("reward=implicit needs a beta and the run's loss has none; "
                              "pass reward.beta=0.1")

    def score(prompts, completions, images=None):
        prompt_ids, completion_ids = tokenize_completions(ctx.tokenizer, prompts, completions)
        if images is not None:  # a VLM's prompts: their ids with the image tokens expanded
            prompt_ids = [p["prompt_ids"] for p in images]
            images = [p["image_inputs"] for p in images]
        stats = score_completions(policy, reference, prompt_ids, completion_ids,
                                  ctx.score_batch_size, ctx.device, images)
        return implicit_reward(stats["policy_logps"], stats["reference_logps"], beta)
    return score


def _checkpoint_models(checkpoint: str, ctx: RewardContext):
    """(policy, reference, the run's loss settings) of a checkpoint of train.py, loaded as
    evaluate.py loads the checkpoint it scores (imported here: evaluate.py imports this module)."""
    import evaluate
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"checkpoint": checkpoint, "reference": None,
                            "trust_remote_code": ctx.trust_remote_code})
    policy, reference, _, _, run_config, _ = evaluate.load_models(cfg)
    if run_config is None:
        raise ConfigError(f"reward.checkpoint={checkpoint} is not a checkpoint of train.py (a step-N/ or "
                          "LATEST/ directory with policy.pt and config.yaml)")
    run_loss = OmegaConf.to_container(run_config.loss)
    return policy.to(ctx.device).eval(), reference.to(ctx.device).eval(), run_loss


# The pairwise question, after MT-Bench's pairwise judge (Zheng et al. 2023, arXiv 2306.05685,
# "Judging LLM-as-a-judge", which also swaps the answers' positions to cancel position bias).
JUDGE_TEMPLATE = ("Which answer to the question is better?\nQuestion: {prompt}\nAnswer A: {a}\n"
                  "Answer B: {b}\nThe better answer is")
JUDGE_CHOICES = (" A", " B")


def judge_preferences(first_logits: torch.Tensor, swapped_logits: torch.Tensor) -> torch.Tensor:
    """P(answer i beats answer j) from a judge asked in both orders, averaged (position-swapped).

    Args:
        first_logits: (M, 2) the judge's logits of " A" and " B" with i shown as A and j as B.
        swapped_logits: (M, 2) the same with j shown as A and i as B.
    Returns: (M,) in [0, 1]; 0.5 for a judge that always answers the same letter.
    """
    first = torch.softmax(first_logits.double(), dim=-1)[:, 0]
    swapped = torch.softmax(swapped_logits.double(), dim=-1)[:, 1]
    return 0.5 * (first + swapped)


def prompt_groups(prompts: Sequence[str]) -> List[range]:
    """The runs of consecutive equal prompts: the answers a pairwise judge compares."""
    groups, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            groups.append(range(start, i))
            start = i
    return groups


def judge_scores(logits_of: Callable[[List[str]], torch.Tensor], prompts: Sequence[str],
                 completions: Sequence[str]) -> torch.Tensor:
    """Each completion's mean preference over the other completions of its prompt (a round robin,
    both orders). Completions of one prompt are consecutive (online.py samples them so).

    Args:
        logits_of: judge texts -> (M, 2) logits of JUDGE_CHOICES at the last position.
    Returns: (N,) float64 in [0, 1].
    Raises: ConfigError: a prompt with a single completion (nothing to compare it with).
    """
    texts, index = [], []
    for group in prompt_groups(prompts):
        if len(group) < 2:
            raise ConfigError("reward=judge compares the answers of one prompt with each other and got a "
                              "single answer; it ranks online samples (online.samples_per_prompt >= 2), "
                              "not evaluate.py's samples: use reward=synthetic, reward_model or implicit")
        for i in group:
            for j in group:
                if i != j:
                    texts.append(JUDGE_TEMPLATE.format(prompt=prompts[i], a=completions[i], b=completions[j]))
                    index.append((i, j))
    logits = logits_of(texts).view(-1, 2)
    where = {pair: k for k, pair in enumerate(index)}
    swapped = torch.tensor([where[(j, i)] for i, j in index])
    wins = judge_preferences(logits, logits[swapped])
    scores = torch.zeros(len(prompts), dtype=torch.float64)
    counts = torch.zeros(len(prompts), dtype=torch.float64)
    rows = torch.tensor([i for i, _ in index])
    return scores.index_add_(0, rows, wins) / counts.index_add_(0, rows, torch.ones_like(wins))


def _judge_logits(model, tokenizer, choice_ids: List[int], texts: List[str], batch_size: int,
                  max_length: int, device) -> torch.Tensor:
    """(M, 2) the judge's next-token logits of the two choices after each text (left-padded, the
    start of a too-long text cut off so the question's end stays)."""
    rows = [ids[-max_length:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = sampling.left_padded(rows[start:start + batch_size], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]
        out.append(logits[:, choice_ids].float().cpu())
    return torch.cat(out)


def _build_judge(args: dict, ctx: RewardContext) -> Scorer:
    from transformers import AutoModelForCausalLM
    path = args["name_or_path"]
    model, tokenizer = _load_scoring_model(AutoModelForCausalLM, path, ctx, "causal LM")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][-1] for c in JUDGE_CHOICES]
    if choice_ids[0] == choice_ids[1]:
        raise ConfigError(f"reward.name_or_path={path}: its tokenizer does not tell {JUDGE_CHOICES} apart")
    return lambda prompts, completions, images=None: judge_scores(
        lambda texts: _judge_logits(model, tokenizer, choice_ids, texts, args["batch_size"],
                                    args["max_length"], ctx.device), prompts, completions)


@dataclass(frozen=True)
class RewardSpec:
    """A reward: `build(args, context)` returns scorer(prompts, completions) -> (N,) rewards.

    Attributes: name: registry key; fn: the pure reward function; build: see above;
    config_keys: the keys its config/reward/NAME.yaml holds besides `name`; datasets: the only
    datasets whose prompts it can score (None: any); pairwise: it compares the completions of one
    prompt with each other (it needs at least two per prompt, so evaluate.py cannot use it).
    """
    name: str
    fn: Callable
    build: Callable[[dict, RewardContext], Scorer]
    config_keys: frozenset
    datasets: Optional[Tuple[str, ...]] = None
    pairwise: bool = False


REWARDS: Dict[str, RewardSpec] = {
    "synthetic": RewardSpec("synthetic", synthetic_reward, _build_synthetic,
                            frozenset({"partial_credit"}), datasets=("synthetic",)),
    "reward_model": RewardSpec("reward_model", reward_model_scores, _build_reward_model,
                               frozenset({"name_or_path", "label_index", "batch_size", "max_length"})),
    "implicit": RewardSpec("implicit", implicit_reward, _build_implicit, frozenset({"beta", "checkpoint"})),
    "judge": RewardSpec("judge", judge_scores, _build_judge,
                        frozenset({"name_or_path", "batch_size", "max_length"}), pairwise=True),
}


# ----------------------------------------------------------------------------- log-probs of completions

def kl_terms(policy_token_logps: torch.Tensor, reference_token_logps: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-token terms of two Monte-Carlo estimators of KL(pi || pi_ref) on tokens sampled from pi.

    With log r = log pi_ref(y_t | y_<t) - log pi(y_t | y_<t):
    - k1 = -log r: its sum over a sequence is log pi(y) - log pi_ref(y), unbiased for the sequence KL;
    - k3 = (r - 1) - log r >= 0: also unbiased, since E_pi[r - 1] = 0 at every position, and with
      far less variance when pi is close to pi_ref (J. Schulman, "Approximating KL Divergence",
      2020, http://joschu.net/blog/kl-approx.html).
    Args: (T,) log-probs of the sampled tokens under each model. Returns {'k1': (T,), 'k3': (T,)}.
    """
    log_r = reference_token_logps - policy_token_logps
    return {"k1": -log_r, "k3": torch.expm1(log_r) - log_r}


def position_kl(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """The exact KL(pi(.|y_<t) || pi_ref(.|y_<t)) at each position. Summed over a sequence sampled
    from pi it is the Rao-Blackwellised (lowest-variance) estimate of the sequence KL; TDPO's
    sequential KL is the same quantity on dataset completions.

    Args: (T, V) log-softmax of each model at the same positions. Returns (T,).
    """
    return (policy_logprobs.exp() * (policy_logprobs - reference_logprobs)).sum(-1)


def _right_padded(prompt_ids, completion_ids, pad_id: int):
    """input ids, attention mask and labels (-100 off the completion), each (B, T)."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
        labels[i, len(p):len(row)] = ids[i, len(p):len(row)]
    return ids, mask, labels


def _completion_logprobs(model, ids, mask, labels, image_inputs: dict):
    """log-softmax (N, V) at the N completion positions of the batch, and the label there (N,)."""
    logits = model(input_ids=ids, attention_mask=mask, **image_inputs,
                   **vision.token_inputs(model, ids, image_inputs)).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.log_softmax(logits[keep].float(), dim=-1), targets[keep]


def score_completions(policy, reference, prompt_ids: Sequence[Sequence[int]],
                      completion_ids: Sequence[Sequence[int]], batch_size: int,
                      device, images: Optional[Sequence[dict]] = None) -> Dict[str, torch.Tensor]:
    """Summed log-probs and KL terms of each completion under the policy and the reference.

    Args: token ids of N prompts and of their N completions (each completion non-empty); for a
        VLM, each prompt's image inputs (vision.py).
    Returns: {'policy_logps', 'reference_logps', 'k1', 'k3', 'position_kl', 'length'}, each (N,)
        float64: sums over the completion's tokens.
    """
    out = {k: [] for k in ("policy_logps", "reference_logps", "k1", "k3", "position_kl")}
    pad = 0
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask, labels = _right_padded(prompt_ids[start:start + batch_size],
                                          completion_ids[start:start + batch_size], pad)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        pictures = vision.concat(images[start:start + batch_size], device) if images else {}
        with torch.no_grad():
            pol, targets = _completion_logprobs(policy, ids, mask, labels, pictures)
            ref, _ = _completion_logprobs(reference, ids, mask, labels, pictures)
        row = (labels[:, 1:] != -100).nonzero()[:, 0]  # the sequence of each completion position
        pol_tok = pol.gather(-1, targets[:, None])[:, 0]
        ref_tok = ref.gather(-1, targets[:, None])[:, 0]
        terms = dict(kl_terms(pol_tok, ref_tok), policy_logps=pol_tok, reference_logps=ref_tok,
                     position_kl=position_kl(pol, ref))
        for key in out:
            sums = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
            out[key].append(sums.index_add_(0, row, terms[key].double()).cpu())
    result = {k: torch.cat(v) for k, v in out.items()}
    result["length"] = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
    return result


def tokenize_completions(tokenizer, prompts: Sequence[str], completions: Sequence[str]):
    """Token ids of prompts and of completions followed by EOS, tokenised separately without
    special tokens, as training tokenises responses (preference_datasets.tokenize_batch_element)."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = [ids + [tokenizer.eos_token_id] for ids in
                      tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    return prompt_ids, completion_ids


def check_reward_config(reward: dict) -> None:
    """Refuse an unknown reward or keys its config/reward/NAME.yaml does not hold (ConfigError)."""
    name = reward.get("name")
    if name not in REWARDS:
        raise ConfigError(f"reward={name} is unknown; use one of {', '.join(REWARDS)}")
    keys = set(reward) - {"name"}
    if keys != REWARDS[name].config_keys:
        raise ConfigError(f"reward={name} takes exactly the keys {sorted(REWARDS[name].config_keys)}, got "
                          f"{sorted(keys)}; see config/reward/{name}.yaml")
