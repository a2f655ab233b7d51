"""TR-DPO (references.SyncedReference, AdapterReference with sync): the reference follows the policy,
reference <- alpha * policy + (1 - alpha) * reference every ref_model_sync_steps optimizer steps."""

import pytest
import torch

from conftest import FAST, kill_when_saved, run_subprocess
from test_train import make_trainer

SYNC = ["loss=dpo", "loss.beta=0.1", "sync_ref_model=true", "ref_model_sync_steps=2",
        "ref_model_mixup_alpha=0.6"]


def snapshot(named):
    return {n: p.detach().clone() for n, p in named}


def check_sync(trainer, reference_params, policy_name):
    """Step 1 leaves the reference alone; step 2 mixes it with the policy after the update."""
    batches = iter(trainer.train_iterator())
    before = snapshot(reference_params())
    trainer.train_step(next(batches))
    assert all(torch.equal(p, before[n]) for n, p in reference_params())
    trainer.train_step(next(batches))
    policy = dict(trainer.policy.named_parameters())
    moved = 0
    for name, ref in reference_params():
        pol = policy[policy_name(name)]
        want = 0.6 * pol.detach() + 0.4 * before[name]
        torch.testing.assert_close(ref.detach(), want, rtol=0, atol=1e-6)
        moved += int(not torch.equal(ref, before[name]))
    assert moved > 0


def test_full_reference_is_mixed_with_the_policy(tmp_path):
    trainer = make_trainer(SYNC, tmp_path)
    check_sync(trainer, trainer.reference.model.named_parameters, lambda n: n)
    states = trainer.reference.checkpoint_states()
    assert states["reference.pt"].keys() == trainer.policy.state_dict().keys()


def test_lora_reference_adapter_is_the_one_synced(tmp_path):
    trainer = make_trainer([*SYNC, "lora.r=4", "lr=1e-2"], tmp_path)
    def ref():
        return [(n, p) for n, p in trainer.policy.named_parameters() if ".reference." in n]
    assert ref() and not any(p.requires_grad for _, p in ref())
    check_sync(trainer, ref, lambda n: n.replace(".reference.", ".default."))


def test_refused_with_precomputed_reference(tmp_path):
    result = run_subprocess([*FAST, *SYNC, "precompute_ref_log_probs=true",
                             f"local_run_dir={tmp_path}/x"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sync_ref_model=true needs a live")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["lora.r=4", "lr=1e-2"]], ids=["full", "lora"])
def test_resume_after_a_kill_is_bitwise(extra, tmp_path):
    args = [*FAST, *SYNC, *extra, "n_examples=96", "eval_every=32", "ref_model_sync_steps=3"]
    whole = run_subprocess([*args, f"local_run_dir={tmp_path}/whole"], timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    kill_when_saved(args, killed, "step-32")
    assert (killed / "step-32" / "reference.pt").is_file()
    again = run_subprocess([*args, f"local_run_dir={killed}"], timeout=600)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    for name in ("policy.pt", "reference.pt"):
        a = torch.load(tmp_path / "whole" / "LATEST" / name, weights_only=True)["state"]
        b = torch.load(killed / "LATEST" / name, weights_only=True)["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
