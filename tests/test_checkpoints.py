"""checkpoints.py and the trainer's save/resume: debug runs, per-device RNG state, damaged logs and
checkpoints, a full disk, interrupts, divergence messages and a reference's own state."""
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose, poison_policy_at, read_metrics, run_in_process
from test_train import make_trainer

SHORT = [*FAST, "n_examples=32", "eval_every=16"]
# step-8, step-16, step-24 and LATEST (32 examples)
FINISHED = [*FAST, "n_examples=32", "eval_every=8"]


def policy_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "policy.pt", weights_only=True)["state"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- debug=true

def test_debug_run_trains_and_evaluates_but_saves_nothing_and_never_starts_wandb(tmp_path,
                                                                              monkeypatch):
    import trainers
    import utils

    def no_wandb(*args, **kwargs):
        raise AssertionError("debug=true started wandb")

    monkeypatch.setattr(trainers, "start_wandb", no_wandb)
    monkeypatch.setattr(utils, "start_wandb", no_wandb)
    run_dir = run_in_process([*SHORT, "debug=true", "wandb.enabled=true",
                              f"local_run_dir={tmp_path}/debug"])
    rows = read_metrics(run_dir)
    assert [r["counters/examples"] for r in rows if "loss/eval" in r] == [0, 16, 32]
    assert [r["counters/examples"] for r in rows if "loss/train" in r] == [8, 16, 24, 32]
    assert not list(run_dir.glob("step-*")) and not (run_dir / "LATEST").exists()
    assert not (run_dir / "wandb").exists()


# ----------------------------------------------------------------------------- RNG per device

class FakeCuda:
    """torch.cuda's RNG calls for devices 0..2, each holding a distinct state."""

    def __init__(self):
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(3)}

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device(device).index].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[torch.device(device).index] = state.clone()

    def everything(self, *args):
        raise AssertionError("touched every device's RNG state")


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", fake.everything)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fake.everything)
    return fake


def test_each_process_saves_and_restores_only_its_own_device_rng(fake_cuda):
    import utils
    state = utils.get_rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], torch.full((8,), 1, dtype=torch.uint8))
    fake_cuda.states[1] = torch.zeros(8, dtype=torch.uint8)
    utils.set_rng_state(state, torch.device("cuda", 1))
    assert [int(fake_cuda.states[i][0]) for i in range(3)] == [0, 1, 2]
    # a checkpoint from before (every device's state in a list): this device's entry only
    old = dict(state, cuda=[torch.full((8,), 7 + i, dtype=torch.uint8) for i in range(3)])
    utils.set_rng_state(old, torch.device("cuda", 2))
    assert [int(fake_cuda.states[i][0]) for i in range(3)] == [0, 1, 9]
    # CPU processes save no CUDA state at all
    assert "cuda" not in utils.get_rng_state(torch.device("cpu"))


def test_each_rank_resumes_its_own_rng_state():
    import checkpoints
    saved = [{"rank": 0}, {"rank": 1}]
    assert checkpoints.rng_state_for_rank(saved, 1) == {"rank": 1}
    assert checkpoints.rng_state_for_rank(saved, 3) == {"rank": 0}  # more processes than saved
    assert checkpoints.rng_state_for_rank({"old": 1}, 1) == {"old": 1}


def test_trainer_checkpoint_holds_one_rng_state_per_rank(tmp_path):
    trainer = make_trainer([], tmp_path)
    torch.manual_seed(123)
    path = trainer.save("step-0", {})
    saved = torch.load(path / "trainer_state.pt", weights_only=True)["rng"]
    assert isinstance(saved, list) and len(saved) == 1
    expected = torch.rand(3)
    torch.manual_seed(5)
    trainer.restore(path)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- logs cut short

def test_resume_drops_a_partial_last_metrics_line_with_one_warning(tmp_path, capsys):
    import trainers
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"counters/examples": n, "loss/train": 0.5} for n in (8, 16, 24)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"counters/examples": 32, "loss/tr'
    (run_dir / "metrics.jsonl").write_text(text)
    log = trainers.RunLog(run_dir, 0, compose([*FAST, f"local_run_dir={run_dir}"]))
    log.truncate(resumed=True, example_counter=16)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert f"dropped 1 unreadable line(s) of {run_dir / 'metrics.jsonl'}" in out
    log.metrics({"counters/examples": 24, "loss/train": 0.25}, 24)
    assert read_metrics(run_dir) == [*rows[:2], {"counters/examples": 24, "loss/train": 0.25}]


# ----------------------------------------------------------------------------- a full disk

def test_a_write_to_a_full_device_is_recognised():
    import checkpoints
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as err:
        checkpoints.save_file({"x": torch.zeros(100_000)}, Path("/dev/full"))
    assert checkpoints.is_out_of_space(err.value)


def test_out_of_space_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import checkpoints
    trainer = make_trainer([], tmp_path)
    run_dir = tmp_path / "run"
    trainer.save("step-8", {})
    before = policy_state(run_dir / "step-8")
    real_save, calls = torch.save, []

    def full_on_second_file(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second_file)
    trainer.example_counter = 16
    with pytest.raises(checkpoints.CheckpointWriteError) as err:
        trainer.save("step-16", {})
    assert str(err.value) == (f"no space left writing step-16 to {run_dir}; free space or set "
                              "keep_checkpoints")
    assert not (run_dir / "step-16").exists() and not list(run_dir.glob(".tmp-*"))
    assert checkpoints.newest_checkpoint(run_dir) == run_dir / "step-8"
    assert same_weights(policy_state(run_dir / "step-8"), before)


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run (FINISHED) and its LATEST weights."""
    run_dir = run_in_process([*FINISHED, f"local_run_dir={tmp_path_factory.mktemp('c')}/run"])
    return run_dir, policy_state(run_dir / "LATEST")


def copy_run(run_dir: Path, to: Path) -> Path:
    import shutil
    shutil.copytree(run_dir, to)
    return to


@pytest.mark.parametrize("damage,problem", [
    ("truncate", "policy.pt has 1,000 bytes of the"),
    ("delete", "optimizer.pt is missing"),
])
def test_a_damaged_latest_falls_back_to_the_newest_intact_step(damage, problem, finished_run,
                                                               tmp_path, capsys):
    import train
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    if damage == "truncate":
        with open(run_dir / "LATEST" / "policy.pt", "r+b") as f:
            f.truncate(1000)
    else:
        (run_dir / "LATEST" / "optimizer.pt").unlink()
    train.run(compose([*FINISHED, f"local_run_dir={run_dir}"]))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: checkpoint {run_dir / 'LATEST'} is damaged ({problem}")
    assert warnings[0].endswith(f"); resuming from {run_dir / 'step-24'} instead")
    assert f"resuming from {run_dir / 'step-24'} at 24 examples" in out
    # the redone half ends where the original run ended, bit for bit
    assert same_weights(policy_state(run_dir / "LATEST"), finished_run[1])


def test_a_checkpoint_damaged_inside_is_skipped_when_loaded(finished_run, tmp_path, capsys):
    import train
    import shutil
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    shutil.rmtree(run_dir / "LATEST")  # as if killed before the end
    policy = run_dir / "step-24" / "policy.pt"
    policy.write_bytes(b"\0" * policy.stat().st_size)  # the right size, but not a torch file
    # written before content hashes (no manifest): found only when loaded
    (run_dir / "step-24" / "manifest.json").unlink()
    state = torch.load(run_dir / "step-24" / "trainer_state.pt", weights_only=True)
    del state["manifest"]
    torch.save(state, run_dir / "step-24" / "trainer_state.pt")
    train.run(compose([*FINISHED, f"local_run_dir={run_dir}"]))
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert f"warning: skipping damaged checkpoint {run_dir / 'step-24'}: resume checkpoint file " \
           f"{policy} could not be read" in out
    assert f"resuming from {run_dir / 'step-16'} at 16 examples" in out
    assert same_weights(policy_state(run_dir / "LATEST"), finished_run[1])


def test_no_intact_checkpoint_is_one_line_naming_resume_from(finished_run, tmp_path):
    import train
    import utils
    run_dir = copy_run(finished_run[0], tmp_path / "run")
    for name in ("LATEST", "step-8", "step-16", "step-24"):
        (run_dir / name / "policy.pt").unlink()
    with pytest.raises(utils.ConfigError) as err:
        train.run(compose([*FINISHED, f"local_run_dir={run_dir}"]))
    missing = "policy.pt is missing"
    assert str(err.value) == (
        f"no intact checkpoint to resume in {run_dir} (LATEST: {missing}; step-16: {missing}; "
        f"step-24: {missing}; step-8: {missing}); pass resume_from=PATH of an "
                       "intact step-N/ or LATEST/ with a new local_run_dir, or start over in a "
                       "new local_run_dir")
    with pytest.raises(utils.ConfigError, match=r"^resume_from=.*step-16 is not an "
                       r"intact checkpoint: policy.pt is missing; pass"):
        train.run(compose([*FINISHED, f"resume_from={run_dir / 'step-16'}",
                           f"local_run_dir={tmp_path}/other"]))


def test_resume_checks_the_weights_against_the_model(tmp_path):
    import checkpoints
    import utils
    trainer = make_trainer([], tmp_path)
    path = trainer.save("step-8", {})
    archive = torch.load(path / "policy.pt", weights_only=True)
    dropped = sorted(archive["state"])[0]
    del archive["state"][dropped]
    torch.save(archive, path / "policy.pt")
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    state["files"]["policy.pt"] = (path / "policy.pt").stat().st_size
    torch.save(state, path / "trainer_state.pt")
    checkpoints.write_manifest(path, {})  # as if written so
    assert checkpoints.inspect_checkpoint(path)[1] is None
    with pytest.raises(utils.ConfigError, match=f"checkpoint {path / 'policy.pt'} does not fit "
                       f"the model \\(missing keys: {dropped}\\); nothing was loaded"):
        trainer.restore(path)


# ----------------------------------------------------------------------------- interrupts

def test_sigint_finishes_the_step_saves_and_stops(tmp_path, monkeypatch):
    import checkpoints
    import trainers
    trainer = make_trainer(["n_examples=48", "eval_every=16"], tmp_path)
    real_step = trainers.BasicTrainer.train_step

    def interrupted_step(self, batch):
        if self.example_counter == 24:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, like a Ctrl-C
        return real_step(self, batch)

    monkeypatch.setattr(trainers.BasicTrainer, "train_step", interrupted_step)
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # whatever the test process had (xdist may differ)
    with pytest.raises(trainers.TrainingInterrupted) as err:
        trainer.train()
    assert str(err.value) == (f"interrupted at step 32 (4 updates), checkpoint at "
                              f"{run_dir / 'step-32'}, relaunch the same command to resume")
    assert err.value.signum == signal.SIGINT
    assert checkpoints.newest_checkpoint(run_dir) == run_dir / "step-32"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


# ----------------------------------------------------------------------------- divergence

def test_divergence_names_the_checkpoint_to_continue_from(tmp_path, monkeypatch):
    import trainers
    trainer = make_trainer(["n_examples=48", "eval_every=16"], tmp_path)
    poison_policy_at(monkeypatch, 24)
    with pytest.raises(trainers.TrainingDiverged) as err:
        trainer.train()
    good = tmp_path / "run" / "step-16"
    assert str(err.value).endswith(
        f"the last good checkpoint is {good}; lower lr, raise warmup_steps or lower "
        f"max_grad_norm and continue from it with resume_from={good} local_run_dir=NEW_DIR")
    assert (good / "policy.pt").is_file()


# ----------------------------------------------------------------------------- a reference's state

def test_a_reference_state_is_saved_and_restored(tmp_path):
    import references

    class SyncedReference(references.Reference):
        """A reference with weights of its own (as TR-DPO's, synced with the policy)."""

        def __init__(self, value):
            self.weights = torch.full((3,), float(value))

        def checkpoint_states(self):
            return {"reference.pt": {"weights": self.weights.clone()}}

        def load_checkpoint_states(self, states):
            self.weights = states["reference.pt"]["weights"]

    trainer = make_trainer([], tmp_path)
    trainer.reference = SyncedReference(2.5)
    path = trainer.save("step-8", {})
    assert (path / "reference.pt").is_file()
    trainer.reference = SyncedReference(0.0)
    trainer.restore(path)
    assert torch.equal(trainer.reference.weights, torch.full((3,), 2.5))


# ----------------------------------------------------------------------------- checkpoint_format

FSDP_ARGS = [*SHORT, "trainer=FSDPTrainer"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The same one-process FSDP run saved in both formats."""
    base = tmp_path_factory.mktemp("formats")
    full = run_in_process([*FSDP_ARGS, f"local_run_dir={base}/full"])
    sharded = run_in_process([*FSDP_ARGS, "checkpoint_format=sharded",
                              f"local_run_dir={base}/sharded"])
    return full, sharded


def test_sharded_checkpoints_hold_the_same_weights_and_export(fsdp_runs, tmp_path):
    import checkpoints
    import transformers
    full, sharded = fsdp_runs
    for name in ("step-16", "LATEST"):
        assert not (sharded / name / "policy.pt").exists()
        assert (sharded / name / "sharded" / "__0_0.distcp").is_file()
        assert same_weights(checkpoints.load_policy_state(sharded / name),
                            policy_state(full / name))
    # LATEST's Hugging Face files are written from the shards too
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = [transformers.AutoModelForCausalLM.from_pretrained(run / "LATEST")(ids).logits
              for run in (full, sharded)]
    assert torch.equal(*logits)
    # export_hf.py turns a sharded step-N/ into a Hugging Face model too
    import export_hf
    out = export_hf.export(str(sharded / "step-16"), str(tmp_path / "hf"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert same_weights({k: v for k, v in exported.state_dict().items()
                         if k in policy_state(full / "step-16")}, policy_state(full / "step-16"))


def test_a_sharded_checkpoint_resumes_exactly(fsdp_runs, tmp_path):
    import checkpoints
    import shutil
    full, sharded = fsdp_runs
    run_dir = copy_run(sharded, tmp_path / "again")
    shutil.rmtree(run_dir / "LATEST")
    run_in_process([*FSDP_ARGS, "checkpoint_format=sharded", f"local_run_dir={run_dir}"])
    assert same_weights(checkpoints.load_policy_state(run_dir / "LATEST"),
                        policy_state(full / "LATEST"))


def test_sharded_checkpoint_metadata_cannot_run_code(fsdp_runs, tmp_path):
    import pickle
    import checkpoints
    import utils
    sentinel = tmp_path / "pwned"

    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    checkpoint = copy_run(fsdp_runs[1] / "step-16", tmp_path / "step-16")
    (checkpoint / "sharded" / ".metadata").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(utils.ConfigError, match="checkpoint metadata .* was refused: "
                       "UnpicklingError: posix.system is not allowed"):
        checkpoints.load_policy_state(checkpoint)
    assert not sentinel.exists()


def test_checkpoint_format_is_validated(tmp_path):
    import train
    from omegaconf import OmegaConf
    for overrides, message in ((["checkpoint_format=zip"], "checkpoint_format=zip must be full"),
                               (["checkpoint_format=sharded"], "trainer=BasicTrainer")):
        config = compose([*FAST, f"local_run_dir={tmp_path}/run", *overrides])
        OmegaConf.resolve(config)
        with pytest.raises(train.ConfigError, match=message):
            train.validate_config(config, 1)


def test_resume_from_into_a_new_directory_trains_at_the_configured_lr(tmp_path):
    """After a divergence the message says: continue from the last good checkpoint with a lower lr
    (resume_from=... local_run_dir=NEW). The restored optimizer and scheduler carry the old lr;
    the configured one must be what the next steps use."""
    import torch
    first = run_in_process([*FAST, "n_examples=32", "eval_every=16", "warmup_steps=0", "lr=1e-3",
                            f"local_run_dir={tmp_path}/first"])
    again = run_in_process([*FAST, "n_examples=48", "eval_every=16", "warmup_steps=0", "lr=1e-5",
                            f"resume_from={first}/step-16", f"local_run_dir={tmp_path}/again"])
    groups = torch.load(again / "LATEST" / "optimizer.pt", weights_only=True)["state"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-5] * len(groups)
    assert torch.load(first / "LATEST" / "optimizer.pt",
                      weights_only=True)["state"]["param_groups"][0]["lr"] == 1e-3


# ----------------------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_written_weights_have_the_mode_the_umask_gives(tmp_path, tokenizer, umask):
    """model.safetensors and adapter_model.safetensors are 0666 & ~umask like every other file
    written (safetensors' own temporary file is 0600, and a rename keeps that mode)."""
    import lora
    import utils
    config = compose([])
    model = utils.build_model(None, dict(config.model.from_config), tokenizer, torch.float32)
    previous = os.umask(umask)
    try:
        utils.save_hf_format(model, model.state_dict(), tokenizer, tmp_path / "hf")
        lora.apply_lora(model, 4, 8, 0.0, None, None, None, False)
        lora.write_peft_adapter(tmp_path / "adapter", model.state_dict(), model, "org/model")
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"model.safetensors", "adapter_model.safetensors", "config.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~umask) for p in files}
