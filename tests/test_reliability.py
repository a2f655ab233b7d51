"""Resume after a crash, atomic checkpoints, the divergence guard, safe loading, refusals and
Hugging Face export."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (FAST, ROOT, compose, poison_policy_at, read_metrics, run_in_process,
                      run_subprocess, start_subprocess)
from test_train import make_trainer

# beta-DPO exercises the running loss state and the loss's random generator; sampling during
# eval exercises the global RNG state.
RESUME_ARGS = [*FAST, "n_examples=160", "eval_every=32", "loss=dpo", "loss.beta=0.1",
               "loss.mode_loss=beta_DPO", "loss.mode_weight=0.25", "loss.a=0.6",
               "sample_during_eval=true", "n_eval_model_samples=2"]


def train_args(run_dir):
    return [*RESUME_ARGS, f"local_run_dir={run_dir}"]


def kill_when(run_dir: Path, ready, timeout=300):
    """Start training, SIGKILL it once `ready(run_dir)` holds, and return."""
    proc = start_subprocess(train_args(run_dir), run_dir.parent)
    deadline = time.time() + timeout
    try:
        while not ready(run_dir):
            assert proc.poll() is None, "training ended before the kill point"
            assert time.time() < deadline, "kill point never reached"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def max_weight_diff(a: Path, b: Path) -> float:
    wa = torch.load(a / "LATEST" / "policy.pt", weights_only=True)["state"]
    wb = torch.load(b / "LATEST" / "policy.pt", weights_only=True)["state"]
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    result = run_subprocess(train_args(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


KILL_POINTS = {
    "before_any_checkpoint": lambda d: (d / "metrics.jsonl").exists(),
    "after_step_64": lambda d: (d / "step-64" / "trainer_state.pt").exists(),
    # Between checkpoints: the relaunch redoes steps 72-88 and drops their logged lines.
    "between_checkpoints": lambda d: (d / "step-64").exists() and any(
        '"counters/examples": 88' in line for line in (d / "metrics.jsonl").read_text().splitlines()),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_relaunch_ends_with_the_same_weights(point, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    kill_when(run_dir, KILL_POINTS[point])
    result = run_subprocess(train_args(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    if point != "before_any_checkpoint":
        assert "resuming from" in result.stdout
    assert max_weight_diff(run_dir, uninterrupted) <= 1e-6
    # The data position, order and RNG came back too: the logged losses are the same numbers.
    key = "loss/train"
    assert ([m[key] for m in read_metrics(run_dir) if key in m]
            == [m[key] for m in read_metrics(uninterrupted) if key in m])
    assert not list(run_dir.glob(".tmp-*"))


def test_explicit_resume_from_and_finished_run(tmp_path):
    first = run_in_process([*FAST, "n_examples=32", "eval_every=16", f"local_run_dir={tmp_path}/a"])
    again = run_subprocess([*FAST, "n_examples=32", f"local_run_dir={first}"], timeout=120)
    assert again.returncode == 0 and f"run in {first} is complete: 32 examples trained" in again.stdout
    moved = run_subprocess([*FAST, "n_examples=32", f"resume_from={first}/step-16",
                            f"local_run_dir={tmp_path}/b"], timeout=120)
    assert moved.returncode == 0, moved.stderr
    assert f"resuming from {first}/step-16 at 16 examples (2 updates)" in moved.stdout


def test_a_crash_during_save_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    import checkpoints
    trainer = make_trainer([], tmp_path)
    trainer.save("LATEST", {"x": 1.0}, finished=True)
    before = torch.load(tmp_path / "run" / "LATEST" / "policy.pt", weights_only=True)
    real_save = torch.save

    def crash_on_trainer_state(obj, path, *a, **k):
        if str(getattr(path, "name", path)).endswith("trainer_state.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_trainer_state)
    with torch.no_grad():
        next(trainer.policy.parameters()).add_(1.0)
    for name in ("step-8", "LATEST"):
        with pytest.raises(OSError):
            trainer.save(name, {}, finished=name == "LATEST")
    run_dir = tmp_path / "run"
    assert not (run_dir / "step-8").exists()
    after = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert checkpoints.newest_checkpoint(run_dir) == run_dir / "LATEST"


def test_only_the_newest_step_checkpoints_are_kept(tmp_path):
    run_dir = run_in_process([*FAST, "n_examples=64", "eval_every=16", "keep_checkpoints=2",
                              f"local_run_dir={tmp_path}/k"])
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-32", "step-48"]
    assert (run_dir / "LATEST").is_dir()


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import trainers
    trainer = make_trainer(["n_examples=48", "eval_every=16"], tmp_path)
    poison_policy_at(monkeypatch, 24)
    with pytest.raises(trainers.TrainingDiverged, match="training diverged at 24 examples"):
        trainer.train()
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-16"]
    assert not (run_dir / "LATEST").exists()
    good = torch.load(run_dir / "step-16" / "policy.pt", weights_only=True)["state"]
    assert all(torch.isfinite(v).all() for v in good.values())


def test_divergence_exits_with_one_line(tmp_path):
    result = run_subprocess([*FAST, "n_examples=64", "lr=1e30", "optimizer=SGD", "warmup_steps=0",
                             "do_first_eval=false", f"local_run_dir={tmp_path}/d"], timeout=120)
    assert result.returncode == 3, result.stderr[-1000:]
    assert "error: training diverged" in result.stderr
    assert "Traceback" not in result.stderr


class _Trap:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_booby_trapped_archive_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    trap = tmp_path / "policy.pt"
    torch.save({"step_idx": 0, "state": _Trap(sentinel), "metrics": {}}, trap)
    result = run_subprocess([*FAST, "loss=dpo", f"model.archive={trap}",
                             f"local_run_dir={tmp_path}/run"], timeout=120)
    assert result.returncode == 2
    assert f"model.archive file {trap} needs arbitrary code to unpickle and was refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sentinel.exists()
    assert not (tmp_path / "run").exists()


def test_booby_trapped_resume_checkpoint_is_refused(tmp_path):
    import checkpoints
    import utils
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sentinel = tmp_path / "pwned"
    for name in checkpoints.CHECKPOINT_FILES:
        torch.save({"state": _Trap(sentinel)}, ckpt / name)
    with pytest.raises(utils.ConfigError, match="needs arbitrary code to unpickle"):
        utils.safe_torch_load(str(ckpt / "trainer_state.pt"))
    result = run_subprocess([*FAST, f"resume_from={ckpt}", f"local_run_dir={tmp_path}/run"],
                            timeout=120)
    assert result.returncode == 2 and "was refused" in result.stderr
    assert not sentinel.exists()


def test_trust_remote_code_only_when_asked(monkeypatch, tokenizer):
    import transformers
    import utils
    seen = []

    class Loaded(Exception):
        pass

    def fake_from_pretrained(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise Loaded

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for flag in (False, True):
        with pytest.raises(Loaded):
            utils.build_model("org/model", None, tokenizer, torch.float32, trust_remote_code=flag)
    assert seen == [False, True]
    assert compose([]).model.trust_remote_code is False


@pytest.mark.parametrize("overrides,message", [
    (["loss=dpo", "loss.mode_loss=beta_DPO", "loss.mode_weight=1.0"], "loss.mode_weight"),
    (["loss=tdpo", "loss.alpha=-1"], "loss.alpha"),
    (["loss=dpo", "loss.beta=0"], "loss.beta"),
    (["loss=dpo", "loss.mode_loss=nope"], "loss.mode_loss"),
    (["n_epochs=null", "n_examples=null"], "n_epochs and n_examples are both null"),
    (["resume_from=/no/such/dir"], "resume_from=/no/such/dir is not a directory"),
    (["eval_batch_size=-2"], "eval_batch_size=-2 must be a positive integer"),
    (["model.fsdp_policy_mp=int8"], "model.fsdp_policy_mp=int8 must be null, bfloat16 or float16"),
    (["loss=sft", "precompute_ref_log_probs=true"], "precompute_ref_log_probs=true needs"),
])
def test_more_refusals(overrides, message, tmp_path):
    import train
    from omegaconf import OmegaConf
    with pytest.raises(train.ConfigError) as err:  # the command line's aliases refuse some
        config = compose([*FAST, f"local_run_dir={tmp_path}/run", *overrides])
        OmegaConf.resolve(config)
        train.validate_config(config, 1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_latest_loads_with_from_pretrained_and_steps_convert(tmp_path):
    import transformers
    run_dir = run_in_process([*FAST, "n_examples=32", "eval_every=16", f"local_run_dir={tmp_path}/h"])
    ids = torch.tensor([[5, 6, 7, 8]])

    def logits_of(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits

    import utils
    reference = utils.build_model(None, dict(compose([]).model.from_config),
                                  transformers.AutoTokenizer.from_pretrained(run_dir / "LATEST"),
                                  torch.float32)
    reference.load_state_dict(utils.load_policy_archive(str(run_dir / "LATEST" / "policy.pt")))
    assert torch.allclose(logits_of(run_dir / "LATEST"), reference(ids).logits, atol=1e-6)
    result = run_subprocess([run_dir / "step-16", tmp_path / "hf16"], script="export_hf.py")
    assert result.returncode == 0, result.stderr
    reference.load_state_dict(utils.load_policy_archive(str(run_dir / "step-16" / "policy.pt")))
    assert torch.allclose(logits_of(tmp_path / "hf16"), reference(ids).logits, atol=1e-6)


# ----------------------------------------------------------------------------- faults, then relaunch
# Each ends like the uninterrupted run, bit for bit (issue 12, items 4, 5 and 8).

def same_final_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "LATEST" / "policy.pt", weights_only=True)["state"]
    wb = torch.load(b / "LATEST" / "policy.pt", weights_only=True)["state"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def relaunch_matches(run_dir: Path, uninterrupted: Path) -> subprocess.CompletedProcess:
    result = run_subprocess(train_args(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert same_final_weights(run_dir, uninterrupted)
    key = "loss/train"
    assert ([m[key] for m in read_metrics(run_dir) if key in m]
            == [m[key] for m in read_metrics(uninterrupted) if key in m])
    return result


@pytest.mark.slow
def test_a_metrics_line_cut_short_then_relaunch(uninterrupted, tmp_path):
    run_dir = tmp_path / "cut"
    kill_when(run_dir, KILL_POINTS["between_checkpoints"])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"loss/train": 0.69, "counters/exa')  # a kill in the middle of a write
    result = relaunch_matches(run_dir, uninterrupted)
    assert result.stdout.count("warning:") == 1
    assert f"warning: dropped 1 unreadable line(s) of {run_dir / 'metrics.jsonl'}" in result.stdout


# Runs train.py with torch.save failing as on a full disk once it writes into step-96's
# temporary directory (the MKL settings train.py would make, made before torch loads here).
FULL_DISK = """
import errno, os, runpy, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if ".tmp-step-96" in str(getattr(f, "name", f)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_then_relaunch(uninterrupted, tmp_path):
    import checkpoints
    run_dir = tmp_path / "full"
    env = dict(os.environ, MKL_DYNAMIC="FALSE", MKL_CBWR="AUTO,STRICT")
    result = subprocess.run([sys.executable, "-c", FULL_DISK, *train_args(run_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 4, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (f"error: no space left writing step-96 to {run_dir}; "
                                              "free space or set keep_checkpoints")
    assert "Traceback" not in result.stderr
    assert not list(run_dir.glob(".tmp-*")) and not (run_dir / "step-96").exists()
    assert checkpoints.newest_checkpoint(run_dir) == run_dir / "step-64"
    relaunch_matches(run_dir, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_saves_says_so_in_one_line_then_relaunch(uninterrupted, tmp_path):
    run_dir = tmp_path / "ctrl-c"
    proc = start_subprocess(train_args(run_dir), tmp_path)
    ready, deadline = KILL_POINTS["between_checkpoints"], time.time() + 300
    while not ready(run_dir):
        assert proc.poll() is None and time.time() < deadline, "never reached the interrupt point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    stderr = (tmp_path / "train-0.err").read_text()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.splitlines()[-1]
    step = int(last.split("interrupted at step ", 1)[1].split(" ", 1)[0])
    assert step >= 88 and step % 8 == 0
    assert last == (f"interrupted at step {step} ({step // 8} updates), checkpoint at "
                    f"{run_dir / f'step-{step}'}, relaunch the same command to resume")
    result = relaunch_matches(run_dir, uninterrupted)
    assert f"resuming from {run_dir / f'step-{step}'} at {step} examples" in result.stdout
