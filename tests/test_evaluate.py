"""evaluate.py: the rewards, the estimators on cases with known answers, and eval.json from real
checkpoints made by train.py."""
import json
import math
import shutil

import pytest
import torch

from conftest import FAST, ROOT, read_metrics, run_in_process

import evaluate
import rewards
from utils import ConfigError

EVAL_FAST = ["n_prompts=8", "n_samples=3", "max_new_tokens=12", "batch_size=24", "score_batch_size=8"]


def compose_eval(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("evaluate", overrides=list(overrides))


def run_eval(overrides):
    return evaluate.evaluate(compose_eval([*EVAL_FAST, *overrides]))


# ----------------------------------------------------------------------------- rewards

SORT = "\n\nHuman: Sort the digits: 3 9 1\n\nAssistant:"


@pytest.mark.parametrize("prompt, completion, expected", [
    ("\n\nHuman: Repeat the words: cat dog sun\n\nAssistant:", " cat dog sun", 1.0),
    ("\n\nHuman: Repeat the words: cat dog sun\n\nAssistant:", " dog sun", 0.0),  # shifted
    ("\n\nHuman: Repeat the words: cat dog sun\n\nAssistant:", " cat dog", 2 / 3),  # missing
    ("\n\nHuman: Repeat the words: cat dog sun\n\nAssistant:", " cat dog sun fox", 3 / 4),  # extra
    ("\n\nHuman: Reverse the letters: a b c d\n\nAssistant:", " d c b a", 1.0),
    ("\n\nHuman: Reverse the letters: a b c d\n\nAssistant:", " c d b a", 2 / 4),
    (SORT, " 1 3 9", 1.0),
    (SORT, " 3 9 1", 0.0),
    (SORT, "", 0.0),
    ("\n\nHuman: What is 8 + 6?\n\nAssistant:", " 14", 1.0),
    ("\n\nHuman: What is 8 + 6?\n\nAssistant:", " 13", 0.0),
])
def test_synthetic_reward_on_hand_written_answers(prompt, completion, expected):
    assert rewards.synthetic_reward([prompt], [completion])[0].item() == pytest.approx(expected)
    exact = rewards.synthetic_reward([prompt], [completion], partial_credit=False)[0].item()
    assert exact == (1.0 if expected == 1.0 else 0.0)


def test_synthetic_reward_knows_every_test_prompt():
    import preference_datasets
    data = preference_datasets.get_synthetic("test")
    prompts = list(data)
    right = [data[p]["responses"][data[p]["pairs"][0][0]] for p in prompts]
    wrong = [data[p]["responses"][data[p]["pairs"][0][1]] for p in prompts]
    assert rewards.synthetic_reward(prompts, right).eq(1).all()
    assert rewards.synthetic_reward(prompts, wrong).lt(1).all()


def test_synthetic_reward_refuses_other_prompts():
    with pytest.raises(ConfigError, match="not one; use reward=reward_model"):
        rewards.synthetic_reward(["\n\nHuman: Tell me a joke\n\nAssistant:"], [" no"])


def test_reward_model_scores_in_batches_as_one_at_a_time(tmp_path, tokenizer):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                      pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    ctx = rewards.RewardContext(None, None, tokenizer, torch.device("cpu"), None, 4, False)
    args = {"name_or_path": str(tmp_path / "rm"), "label_index": None, "batch_size": 3, "max_length": 64}
    scorer = rewards.REWARDS["reward_model"].build(args, ctx)
    prompts = [SORT, "\n\nHuman: What is 1 + 2?\n\nAssistant:", SORT, SORT, SORT]
    completions = [" 1 3 9", " 3", " 1 3 9", " 9 3 1 1 1 1 1", ""]
    batched = scorer(prompts, completions)  # batches of 3 and 2, padded differently
    single = torch.cat([scorer([p], [c]) for p, c in zip(prompts, completions)])
    assert batched.shape == (5,) and len(set(batched.tolist())) == 4  # rows 0 and 2 are equal
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_reward_model_with_two_outputs_needs_a_label_index(tmp_path, tokenizer):
    import transformers
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_labels=2)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    ctx = rewards.RewardContext(None, None, tokenizer, torch.device("cpu"), None, 4, False)
    args = {"name_or_path": str(tmp_path / "rm"), "label_index": None, "batch_size": 3, "max_length": 64}
    with pytest.raises(ConfigError, match="has 2 outputs; pass reward.label_index"):
        rewards.REWARDS["reward_model"].build(args, ctx)


# ----------------------------------------------------------------------------- estimators

def test_mean_and_se_is_clustered_by_prompt():
    out = evaluate.mean_and_se(torch.tensor([[1.0, 3.0], [5.0, 7.0]]))
    # per-prompt means 2 and 6: mean 4, s.e. = std([2, 6]) / sqrt(2) = 2
    assert out == {"mean": 4.0, "se": pytest.approx(2.0)}


def test_wilson_interval_textbook_values():
    low, high = evaluate.wilson_interval(0.8, 10)  # 8 of 10: [0.490, 0.943] (Newcombe 1998)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert evaluate.wilson_interval(1.0, 20)[1] == 1.0 and evaluate.wilson_interval(1.0, 20)[0] < 1


def test_win_scores_count_ties_half():
    scores = evaluate.win_scores(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.5, 0.5, 0.5]))
    assert scores.tolist() == [1.0, 0.5, 0.0]


class Categorical(torch.nn.Module):
    """A "language model" whose next-token distribution is fixed, whatever the context."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs, dtype=torch.float64))

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_kl_estimators_on_two_categoricals():
    p, q = [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # per token
    n, length = 4000, 3
    gen = torch.Generator().manual_seed(0)
    completions = torch.multinomial(torch.tensor(p), n * length, replacement=True, generator=gen)
    completions = completions.view(n, length).tolist()
    stats = rewards.score_completions(Categorical(p), Categorical(q), [[0, 1]] * n, completions,
                                       batch_size=500, device="cpu")
    # the exact per-position KL is the same for every sequence: length x KL
    torch.testing.assert_close(stats["position_kl"], torch.full((n,), length * exact, dtype=torch.float64))
    for key in ("k1", "k3"):
        mean, se = stats[key].mean().item(), stats[key].std().item() / math.sqrt(n)
        assert abs(mean - length * exact) < 4 * se, key
    assert stats["k3"].min() >= 0
    assert stats["k3"].var() < stats["k1"].var()  # why k3 is the lower-variance estimator
    expected_logps = torch.tensor([sum(math.log(p[t]) for t in c) for c in completions], dtype=torch.float64)
    torch.testing.assert_close(stats["policy_logps"], expected_logps)


def test_kl_terms_vanish_for_equal_models():
    logps = torch.log(torch.tensor([0.2, 0.7, 0.1]))
    terms = rewards.kl_terms(logps, logps.clone())
    assert terms["k1"].abs().max() == 0 and terms["k3"].abs().max() == 0
    full = torch.log_softmax(torch.randn(5, 7), -1)
    assert rewards.position_kl(full, full.clone()).abs().max() == 0


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A DPO run on the embedded default, with FAST settings (its reference: the initial model)."""
    return run_in_process([*FAST, "loss=dpo", "loss.beta=0.1",
                           f"local_run_dir={tmp_path_factory.mktemp('runs')}/dpo"])


@pytest.mark.slow
def test_eval_json_of_a_dpo_checkpoint(dpo_run):
    results = run_eval([f"checkpoint={dpo_run}/LATEST", "n_prompts=32"])
    written = json.loads((dpo_run / "LATEST" / "eval.json").read_text())
    assert written == json.loads(json.dumps(results))
    for key in ("reward_policy", "reward_reference", "reward_chosen", "kl_log_ratio", "kl_k3",
                "kl_per_position", "length_policy", "win_rate_vs_chosen", "win_rate_vs_reference",
                "implicit_accuracy"):
        assert math.isfinite(written[key]["mean"]) and written[key]["se"] is not None, key
    assert written["step"] == 64 and written["n_prompts"] == 32 and written["n_samples"] == 3
    assert written["reward_chosen"]["mean"] == 1.0  # the dataset's answers are right
    assert written["kl_k3"]["mean"] >= 0 and written["kl_per_position"]["mean"] > 0
    for key in ("win_rate_vs_chosen", "win_rate_vs_reference"):
        low, high = written[key]["ci95"]
        assert low <= written[key]["mean"] <= high
    # on the same 32 held-out pairs as training's last evaluation, the same implicit-reward accuracy
    final_eval = [m for m in read_metrics(dpo_run) if "rewards_eval/accuracies" in m][-1]
    assert written["implicit_accuracy"]["mean"] == pytest.approx(final_eval["rewards_eval/accuracies"],
                                                                 abs=1.5 / 32)
    samples = [json.loads(line) for line in (dpo_run / "LATEST" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and all(len(s["policy"]) == 3 for s in samples)


@pytest.mark.slow
def test_policy_equal_to_reference_gives_zero_kl_and_even_win_rate(dpo_run, tmp_path):
    checkpoint = f"checkpoint={dpo_run}/LATEST"
    same = [checkpoint, f"reference={dpo_run}/LATEST", "n_prompts=12", "n_samples=4", "max_new_tokens=8"]
    results = run_eval([*same, f"out={tmp_path}/a.json"])
    for key in ("kl_log_ratio", "kl_k3", "kl_per_position"):
        assert results[key]["mean"] == 0.0, key  # identical models: every log-ratio is exactly 0
    win = results["win_rate_vs_reference"]
    assert win["ci95"][0] <= 0.5 <= win["ci95"][1]
    # the implicit reward of identical models is 0 for everything: every comparison is a tie
    implicit = run_eval([*same, "reward=implicit", f"out={tmp_path}/b.json"])
    assert implicit["win_rate_vs_reference"]["mean"] == 0.5 == implicit["win_rate_vs_chosen"]["mean"]
    # deterministic given the seed; another seed samples differently
    again = run_eval([*same, f"out={tmp_path}/c.json"])
    assert again == results
    assert (tmp_path / "a_samples.jsonl").read_text() == (tmp_path / "c_samples.jsonl").read_text()
    other = run_eval([*same, "seed=1", f"out={tmp_path}/d.json"])
    assert (tmp_path / "d_samples.jsonl").read_text() != (tmp_path / "a_samples.jsonl").read_text()
    assert other["n_prompts"] == 12


@pytest.mark.slow
def test_exported_hf_directory_needs_and_takes_an_explicit_reference(dpo_run, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in (dpo_run / "LATEST").iterdir():
        if f.suffix in (".json", ".safetensors", ".jinja") or f.name.startswith("tokenizer"):
            shutil.copy(f, hf / f.name)
    assert not (hf / "policy.pt").exists() and (hf / "config.json").exists()
    with pytest.raises(ConfigError, match="pass reference=PATH"):
        run_eval([f"checkpoint={hf}"])
    with pytest.raises(ConfigError, match="pass datasets=..."):
        run_eval([f"checkpoint={hf}", f"reference={dpo_run}/LATEST/policy.pt"])
    results = run_eval([f"checkpoint={hf}", f"reference={dpo_run}/LATEST/policy.pt",
                        "datasets=[synthetic]", "max_length=128", "max_prompt_length=64"])
    assert results["kl_log_ratio"]["mean"] == pytest.approx(0.0, abs=1e-5)  # the same weights
    assert results["step"] is None and (hf / "eval.json").is_file()


def test_bad_settings_are_refused_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="missing required value"):
        evaluate.evaluate(compose_eval([]))
    with pytest.raises(ConfigError, match="top_p=1.5 must be in"):
        evaluate.evaluate(compose_eval([f"checkpoint={tmp_path}", "top_p=1.5"]))
    with pytest.raises(ConfigError, match="reward=synthetic takes exactly the keys"):
        evaluate.evaluate(compose_eval([f"checkpoint={tmp_path}", "+reward.beta=1"]))
    with pytest.raises(ConfigError, match="holds neither policy.pt"):
        evaluate.evaluate(compose_eval([f"checkpoint={tmp_path}"]))
    with pytest.raises(ConfigError, match="reward=judge is a pairwise judge"):
        evaluate.evaluate(compose_eval([f"checkpoint={tmp_path}", "reward=judge", "reward.name_or_path=x"]))


def test_command_line_error_is_one_line(tmp_path):
    from conftest import run_subprocess
    result = run_subprocess([f"checkpoint={tmp_path}/nothing"], timeout=120, script="evaluate.py")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint={tmp_path}/nothing is not a directory; pass a step-N/ or LATEST/ "
        "directory of a run, or a Hugging Face model directory"]
