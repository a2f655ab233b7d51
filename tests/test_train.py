"""The SFT -> DPO pipeline end to end on the embedded model: config composition, the training
loop, checkpoints, archives, metrics and the refusal of bad input."""
import math
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, compose, read_metrics, run_in_process, run_subprocess

LOSS_PRESETS = sorted(p.stem for p in (ROOT / "config" / "loss").glob("*.yaml"))
MODEL_PRESETS = sorted(p.stem for p in (ROOT / "config" / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODEL_PRESETS)
@pytest.mark.parametrize("loss", LOSS_PRESETS)
def test_every_preset_composes_and_validates(model, loss, tmp_path):
    import train
    from omegaconf import OmegaConf
    extra = ["model.name_or_path=some/model", "model.block_name=Block"] if model == "blank_model" else []
    config = compose([f"model={model}", f"loss={loss}", f"local_run_dir={tmp_path}/run", *extra])
    OmegaConf.resolve(config)
    train.validate_config(config, world_size=1)
    assert config.model.name == model and config.loss.name == loss


def test_blank_model_refuses_missing_name_or_path(tmp_path):
    import train
    from omegaconf import OmegaConf
    config = compose(["model=blank_model", f"local_run_dir={tmp_path}"])
    OmegaConf.resolve(config)
    with pytest.raises(train.ConfigError, match="model.block_name, model.name_or_path"):
        train.validate_config(config, 1)


def test_default_run_dir_is_named_after_the_experiment(tmp_path):
    from omegaconf import OmegaConf
    config = compose([f"local_dirs=[{tmp_path}]"])
    OmegaConf.resolve(config)
    assert Path(config.local_run_dir).parent.parent == tmp_path
    assert Path(config.local_run_dir).name.startswith("sft_tiny_")


@pytest.mark.slow
def test_a_sweep_writes_runs_and_its_record_under_the_local_dir_not_the_checkout(tmp_path):
    """python train.py -m: each job a run directory {exp_name}_{timestamp} under local_dirs' first
    entry and USER, and Hydra's multirun.yaml beside them in multirun/, not in ./multirun/."""
    import getpass
    before = set((ROOT / "multirun").rglob("*")) if (ROOT / "multirun").exists() else set()
    result = run_subprocess(["-m", *FAST, "n_examples=8", "debug=true", f"local_dirs=[{tmp_path}]",
                             "exp_name=seed${seed}", "seed=0,1"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    user = tmp_path / getpass.getuser()
    assert sorted(p.name.split("_")[0] for p in user.iterdir()) == ["multirun", "seed0", "seed1"]
    assert len(list(user.glob("multirun/*/multirun.yaml"))) == 1
    after = set((ROOT / "multirun").rglob("*")) if (ROOT / "multirun").exists() else set()
    assert after == before
    assert "multirun/" in (ROOT / ".gitignore").read_text().split()


def test_tiny_model_and_tokenizer_round_trip(tokenizer, tmp_path):
    import transformers
    import utils
    config = compose([])
    model = utils.build_model(None, dict(config.model.from_config), tokenizer, torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e5 < n_params < 5e6
    ids = torch.tensor([tokenizer.encode("\n\nHuman: sort c a b\n\nAssistant: a b c")])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded_tok.encode("hello world") == tokenizer.encode("hello world")
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def make_trainer(overrides, tmp_path):
    import train
    import trainers
    import utils
    from omegaconf import OmegaConf
    config = compose([*FAST, f"local_run_dir={tmp_path}/run", *overrides])
    OmegaConf.resolve(config)
    train.validate_config(config, 1)
    tok = utils.build_tokenizer("embedded")
    policy, reference = train.build_models(config, tok)
    Path(config.local_run_dir).mkdir(parents=True)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir,
                                    reference_model=reference, tokenizer=tok)
    trainer.build_optimizer()
    trainer.next_eval = 0
    return trainer


@pytest.mark.parametrize("loss", [["loss=sft"], ["loss=dpo", "loss.beta=0.1"]])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(loss, tmp_path):
    trainer = make_trainer([*loss, "lr=1e-3", "warmup_steps=0"], tmp_path)
    batch = next(iter(trainer.train_iterator()))
    losses_seen = [trainer.train_step(batch)["loss/train"] for _ in range(5)]
    if loss[0] == "loss=dpo":
        assert losses_seen[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert losses_seen[-1] < losses_seen[0] - 0.05


def test_sft_run_writes_documented_checkpoints_and_metrics(tmp_path):
    run_dir = run_in_process([*FAST, f"local_run_dir={tmp_path}/sft"])
    assert (run_dir / "config.yaml").is_file()
    steps = sorted(p.name for p in run_dir.glob("step-*"))
    assert steps == ["step-32"]  # the final evaluation's checkpoint is LATEST, not a copy
    for ckpt in [run_dir / "step-32", run_dir / "LATEST"]:
        for name in ("policy.pt", "optimizer.pt", "scheduler.pt"):
            saved = torch.load(ckpt / name, weights_only=True)
            assert set(saved) == {"step_idx", "state", "metrics"}
        assert torch.load(ckpt / "policy.pt", weights_only=True)["step_idx"] == int(
            64 if ckpt.name == "LATEST" else ckpt.name.split("-")[1])
    metrics = read_metrics(run_dir)
    train_rows = [m for m in metrics if "loss/train" in m]
    eval_rows = [m for m in metrics if "loss/eval" in m]
    assert train_rows and len(eval_rows) == 3  # first eval, at 32, final at 64
    assert {"logps_train/chosen", "examples_per_second", "grad_norm", "counters/examples",
            "counters/updates"} <= set(train_rows[0])
    assert {"logps_eval/chosen", "counters/examples"} <= set(eval_rows[0])


def test_train_metrics_count_truncated_prompts_and_responses(tmp_path):
    """data/truncated_* count the batch's examples whose prompt / responses were cut (worked out
    here from the texts: a prompt is cut when its tokens outnumber the kept prompt ids)."""
    trainer = make_trainer(["loss=dpo", "loss.beta=0.1", "max_length=12", "max_prompt_length=8"], tmp_path)
    batch = next(iter(trainer.train_iterator()))
    metrics = trainer.train_step(batch)
    def n_ids(text):
        return len(trainer.tokenizer(text, add_special_tokens=False)["input_ids"])
    kept = batch["prompt_attention_mask"].sum(1).tolist()
    cut_prompts = sum(n_ids(p) > k for p, k in zip(batch["prompt"], kept))
    responses = zip(batch["chosen_response_only"], batch["rejected_response_only"],
                    batch["chosen_attention_mask"].sum(1).tolist(),
                    batch["rejected_attention_mask"].sum(1).tolist(), kept)
    cut_responses = sum(n_ids(c) + n_ids(r) + 2 > nc + nr - 2 * k for c, r, nc, nr, k in responses)  # + EOS each
    assert 0 < cut_prompts and 0 < cut_responses
    assert (metrics["data/truncated_prompts"], metrics["data/truncated_responses"]) == (cut_prompts, cut_responses)


def test_checkpoint_reloads_into_a_fresh_model(tmp_path, tokenizer):
    import utils
    run_dir = run_in_process([*FAST, "n_examples=16", f"local_run_dir={tmp_path}/sft"])
    config = compose([])
    fresh = utils.build_model(None, dict(config.model.from_config), tokenizer, torch.float32)
    state = utils.load_policy_archive(str(run_dir / "LATEST" / "policy.pt"))
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])


def test_dpo_from_sft_archive_starts_at_ln2_with_both_models_loaded(tmp_path):
    sft_dir = run_in_process([*FAST, "n_examples=16", f"local_run_dir={tmp_path}/sft"])
    archive = sft_dir / "LATEST" / "policy.pt"
    dpo_dir = run_in_process([*FAST, "n_examples=16", "loss=dpo", "loss.beta=0.1",
                              f"model.archive={archive}", f"local_run_dir={tmp_path}/dpo"])
    metrics = read_metrics(dpo_dir)
    first_eval = metrics[0]
    assert first_eval["loss/eval"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_eval["rewards_eval/margins"] == pytest.approx(0.0, abs=1e-5)
    # The archive is the SFT model: the DPO run's first eval log-probs equal the SFT run's last.
    sft_last = [m for m in read_metrics(sft_dir) if "logps_eval/chosen" in m][-1]
    assert first_eval["logps_eval/chosen"] == pytest.approx(sft_last["logps_eval/chosen"], rel=1e-5)
    names = {"rewards_eval/chosen", "rewards_eval/rejected", "rewards_eval/accuracies",
             "rewards_eval/margins", "logps_eval/chosen", "logps_eval/rejected", "loss/eval"}
    assert names <= set(first_eval)
    assert {n.replace("eval", "train") for n in names} <= set(metrics[1])


def test_sampling_during_eval_writes_samples(tmp_path):
    run_dir = run_in_process([*FAST, "n_examples=8", "sample_during_eval=true",
                              "n_eval_model_samples=3", f"local_run_dir={tmp_path}/s"])
    import json
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["policy"], str) for r in rows)  # 2 evals x 3


def test_same_seed_same_run_and_seed_changes_data_order(tmp_path):
    a = read_metrics(run_in_process([*FAST, "n_examples=16", f"local_run_dir={tmp_path}/a"]))
    b = read_metrics(run_in_process([*FAST, "n_examples=16", f"local_run_dir={tmp_path}/b"]))
    c = read_metrics(run_in_process([*FAST, "n_examples=16", "seed=1", f"local_run_dir={tmp_path}/c"]))
    key = "loss/train"
    assert [m[key] for m in a if key in m] == [m[key] for m in b if key in m]
    assert [m[key] for m in a if key in m] != [m[key] for m in c if key in m]


BAD_INPUTS = [
    (["batch_size=abc"], "batch_size='abc' must be a positive integer"),
    (["batch_size=0"], "batch_size=0 must be a positive integer"),
    (["batch_size=6", "gradient_accumulation_steps=4"], "batch_size=6 must be divisible"),
    (["lr=-1"], "lr=-1 must be > 0"),
    (["max_prompt_length=600"], "max_prompt_length=600 must be less than max_length"),
    (["datasets=[nope]"], "unknown dataset 'nope'; use one of"),
    (["trainer=FooTrainer"], "trainer=FooTrainer is unknown"),
    (["optimizer=Nope"], "optimizer=Nope is not a torch.optim optimizer"),
    (["model.archive=/does/not/exist.pt"], "model.archive=/does/not/exist.pt does not exist"),
    (["model.policy_dtype=float8"], "model.policy_dtype=float8 is not a dtype"),
    (["loss=dpo", "loss.beta=-0.1"], "loss.beta"),
    (["loss=dpo", "loss.label_smoothing=0.5"], "loss.label_smoothing"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[b[1][:30] for b in BAD_INPUTS])
def test_bad_config_is_refused_before_anything_is_built(overrides, message, tmp_path,
                                                        monkeypatch):
    import train
    import utils

    def built(*args, **kwargs):
        raise AssertionError("a tokenizer or model was built for a config that is refused")
    monkeypatch.setattr(utils, "build_tokenizer", built)
    monkeypatch.setattr(train, "build_models", built)
    config = compose([*FAST, f"local_run_dir={tmp_path}/run", *overrides])
    with pytest.raises(train.ConfigError) as err:
        train.run(config)  # the entry point itself, not only the validation function
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["datasets=[nope]"], "unknown dataset 'nope'"),
    (["model=nope"], "model/nope"),
    (["model.archive=/does/not/exist.pt"], "does not exist"),
])
def test_bad_input_exits_nonzero_with_one_line_and_no_traceback(args, needle, tmp_path):
    result = run_subprocess([*FAST, f"local_run_dir={tmp_path}/run", *args], timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_malformed_user_file_found_late_leaves_no_run_dir(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    result = run_subprocess([*FAST, f"datasets=[{bad}]", f"local_run_dir={tmp_path}/run"],
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert str(bad) in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_user_file_with_split_placeholder_trains_and_evaluates(tmp_path):
    for split, n in (("train", 16), ("test", 8)):
        rows = [f'{{"prompt": "Q{i} {split}", "chosen": " good", "rejected": " bad"}}' for i in range(n)]
        (tmp_path / f"prefs_{split}.jsonl").write_text("\n".join(rows) + "\n")
    pattern = str(tmp_path / "prefs_{split}.jsonl")
    run_dir = run_in_process([*FAST, "n_examples=16", "n_eval_examples=8", "eval_batch_size=8",
                              "loss=dpo", f"datasets=['{pattern}']", "sample_during_eval=true",
                              "n_eval_model_samples=8", f"local_run_dir={tmp_path}/run"])
    import json
    evals = [m for m in read_metrics(run_dir) if "rewards_eval/accuracies" in m]
    assert [m["counters/examples"] for m in evals] == [0, 16]  # first and final evaluation
    # Evaluation read the test file ({split} -> test): its 8 prompts, and no training prompt.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["prompt"] for s in samples}) == sorted(f"Q{i} test" for i in range(8))
