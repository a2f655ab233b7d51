"""LoRA (lora.py, references.AdapterReference): only the adapter trains, the reference is the policy
with its adapter off, small checkpoints, PEFT-loadable exports, exact resume."""

import pytest
import torch

from conftest import (FAST, kill_when_saved, compose, read_metrics, run_in_process, run_subprocess,
                      usual_logps)
from test_train import make_trainer

LORA = ["loss=dpo", "loss.beta=0.1", "lora.r=4", "lora.alpha=8", "lr=1e-2"]


def initial_plain_model(overrides):
    """The policy's weights before any adapter: the same seed builds the same base."""
    import train
    import utils
    config = compose([*FAST, *[o for o in overrides if not o.startswith("lora.")]])
    policy, _ = train.build_models(config, utils.build_tokenizer("embedded"))
    return policy


def test_only_the_adapter_trains_and_the_reference_is_the_base(tmp_path):
    trainer = make_trainer(LORA, tmp_path)
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    assert trainer.reference.model is None  # no second copy of the weights
    batches = list(trainer.train_iterator())[:3]
    for batch in batches:
        trainer.train_step(batch)
    for name, param in trainer.policy.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name  # bit-identical base
    # the reference equals the untouched base model; the policy has moved away from it
    plain = initial_plain_model(LORA)
    batch = trainer.rank_slice(trainer.eval_batches[0], 0, 1)
    ref = trainer.reference.sequence_logps(batch, "chosen", average=False)
    want = usual_logps(plain, batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                batch["chosen_labels"], False, 1024)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        pol = usual_logps(trainer.policy, batch["chosen_input_ids"],
                                   batch["chosen_attention_mask"], batch["chosen_labels"], False, 1024)
    assert (pol - want).abs().max() > 1e-3


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run_in_process([*FAST, *LORA, f"local_run_dir={run_dir}"])
    return run_dir


def dir_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoints_hold_the_adapter_and_export_peft_and_merged(lora_run, tmp_path):
    import peft
    import transformers
    step = lora_run / "step-32"
    policy = torch.load(step / "policy.pt", weights_only=True)["state"]
    assert policy and all(".lora_" in k for k in policy)
    record = torch.load(step / "base_weights.pt", weights_only=True)["state"]
    assert len(record["hash"]) == 32 and record["sources"]["model"].startswith("from_config")
    full = run_in_process([*FAST, "loss=dpo", "loss.beta=0.1", "n_examples=40",
                           f"local_run_dir={tmp_path}/full"])
    assert dir_size(step) <= 0.3 * dir_size(full / "step-32"), (dir_size(step), dir_size(full / "step-32"))

    plain = initial_plain_model(LORA)
    merged = transformers.AutoModelForCausalLM.from_pretrained(lora_run / "LATEST")
    plain_state, merged_state = plain.state_dict(), merged.state_dict()
    changed = {k for k in plain_state if not torch.equal(plain_state[k], merged_state[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # PEFT loads the adapter; on the same base it gives the merged model's outputs
    adapted = peft.PeftModel.from_pretrained(initial_plain_model(LORA), lora_run / "LATEST" / "adapter")
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
        peft_merged = adapted.merge_and_unload().state_dict()
    for key in changed:
        torch.testing.assert_close(peft_merged[key], merged_state[key], rtol=0, atol=1e-6)


def test_export_hf_writes_the_merged_model_or_the_adapter(lora_run, tmp_path):
    import export_hf
    import peft
    from safetensors.torch import load_file
    merged = export_hf.export(str(lora_run / "LATEST"), str(tmp_path / "merged"))
    want, got = (load_file(d / "model.safetensors") for d in (lora_run / "LATEST", merged))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    adapter = export_hf.export(str(lora_run / "step-32"), str(tmp_path / "adapter"), adapter_only=True)
    model = peft.PeftModel.from_pretrained(initial_plain_model(LORA), adapter)
    saved = torch.load(lora_run / "step-32" / "policy.pt", weights_only=True)["state"]
    state = model.state_dict()
    assert all(torch.equal(state[f"base_model.model.{k}"], v) for k, v in saved.items())


def test_resume_refuses_other_base_weights(lora_run, tmp_path):
    result = run_subprocess([*FAST, *LORA, f"resume_from={lora_run}/step-32", "seed=1",
                             f"local_run_dir={tmp_path}/other"], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: the checkpoint's adapter was trained on other base weights")


@pytest.mark.parametrize("loss", ["tdpo", "ipo", "sft"])
def test_other_losses_and_adapter_off_reference(loss, tmp_path):
    trainer = make_trainer([f"loss={loss}", "lora.r=4"], tmp_path)
    metrics = trainer.train_step(next(iter(trainer.train_iterator())))
    assert torch.isfinite(torch.tensor(metrics["loss/train"]))


def test_precompute_and_activation_checkpointing(tmp_path):
    run = run_in_process([*FAST, *LORA, "precompute_ref_log_probs=true",
                          "activation_checkpointing=true", "n_examples=32",
                          f"local_run_dir={tmp_path}/run"])
    first = [m for m in read_metrics(run) if "loss/train" in m][0]
    assert abs(first["loss/train"] - 0.6931) < 1e-3  # the adapter starts at zero: ln 2
    assert (run / "LATEST" / "adapter" / "adapter_config.json").is_file()


def test_reference_adapter_and_merge_archive(lora_run, tmp_path):
    """SFT-like adapter from the first run merged into the base, a fresh adapter on top, and the
    first run's adapter as a frozen reference (TRL option 3)."""
    adapter = lora_run / "LATEST" / "adapter"
    trainer = make_trainer([*LORA, f"lora.reference_adapter={adapter}"], tmp_path / "a")
    batch = trainer.rank_slice(trainer.eval_batches[0], 0, 1)
    import peft
    want_model = peft.PeftModel.from_pretrained(initial_plain_model(LORA), adapter).merge_and_unload()
    want = usual_logps(want_model, batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                batch["chosen_labels"], False, 1024)
    got = trainer.reference.sequence_logps(batch, "chosen", average=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert all(".default." in n for n, p in trainer.policy.named_parameters() if p.requires_grad)

    merged = make_trainer([*LORA, f"lora.merge_archive={adapter}"], tmp_path / "b")
    got = merged.reference.sequence_logps(batch, "chosen", average=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bad_lora_settings_are_refused_in_one_line(tmp_path):
    for args, start in ((["lora.r=4", "lora.target_modules=[lm_head]"], "error: lora.target_modules"),
                        (["lora.reference_adapter=/nonexistent"], "error: lora.reference_adapter"),
                        (["lora.r=4", "lora.merge_archive=/nonexistent"], "error: lora.merge_archive")):
        result = run_subprocess([*FAST, "loss=dpo", *args, f"local_run_dir={tmp_path}/x"], timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr


@pytest.mark.slow
def test_lora_resume_after_a_kill_is_bitwise(tmp_path):
    args = [*FAST, *LORA, "n_examples=96", "eval_every=32"]
    whole = run_subprocess([*args, f"local_run_dir={tmp_path}/whole"], timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    kill_when_saved(args, killed, "step-32")
    again = run_subprocess([*args, f"local_run_dir={killed}"], timeout=600)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "LATEST" / "policy.pt", weights_only=True)["state"]
    b = torch.load(killed / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["lora.r=4", "lr=1e-2"], ["lora.r=4", "lr=1e-2", "loss=tdpo"],
                                   ["sync_ref_model=true", "ref_model_sync_steps=2"]],
                         ids=["lora", "lora-tdpo", "trdpo"])
def test_fsdp_two_processes_equal_basic(extra, tmp_path):
    """FSDP with 2 processes trains as one BasicTrainer process does, adapter (and a synced
    reference) included, to the tolerance of full fine-tuning."""
    from test_distributed import (COMMON, LOSS_RTOL_FP32, WEIGHT_ATOL, assert_same_losses,
                                  max_weight_diff, train_2proc)
    basic = run_in_process([*COMMON, *extra, f"local_run_dir={tmp_path}/basic"])
    fsdp = tmp_path / "fsdp"
    train_2proc("FSDPTrainer", fsdp, *extra)
    assert_same_losses(fsdp, basic, LOSS_RTOL_FP32)
    for name in [p.name for p in (basic / "LATEST").glob("*.pt") if p.name != "trainer_state.pt"]:
        a = torch.load(basic / "LATEST" / name, weights_only=True)["state"]
        b = torch.load(fsdp / "LATEST" / name, weights_only=True)["state"]
        if name in ("policy.pt", "reference.pt"):
            assert max_weight_diff(a, b) <= WEIGHT_ATOL, name
