"""Run directories: where they go, when they are made, who may use them, and relaunching into one
(issue 11 items 3 and 5, issue 12 items 3, 10, 11, 14)."""
import getpass
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import (FAST, ROOT, compose, logged_values, read_metrics, run_in_process,
                      run_subprocess, start_subprocess)


def resolved(overrides):
    from omegaconf import OmegaConf
    config = compose(overrides)
    OmegaConf.resolve(config)
    return config


# ----------------------------------------------------------------------------- where and when

def test_missing_local_dirs_entries_are_skipped_never_created(tmp_path):
    missing = Path(f"/dpo-test-missing-{os.getpid()}")  # at the filesystem root, like /scr-ssd
    config = resolved([f"local_dirs=[{missing},{tmp_path}]"])
    assert Path(config.local_run_dir).parent == tmp_path / getpass.getuser()
    assert Path(config.local_run_dir).name.startswith("sft_tiny_")
    assert not missing.exists()
    assert not (tmp_path / getpass.getuser()).exists()  # named only; made once the models load


def test_no_existing_local_dirs_entry_falls_back_to_dot_cache():
    missing = Path(f"/dpo-test-missing-{os.getpid()}")
    config = resolved([f"local_dirs=[{missing}]"])
    assert Path(config.local_run_dir).parent == Path(".cache") / getpass.getuser()
    assert not missing.exists()


def _fail_building_the_model(*args, **kwargs):
    raise OSError("no such model on the hub")


def _fail_loading_eval_data(self):
    raise RuntimeError("evaluation data unreadable")


@pytest.mark.parametrize("target,replacement", [
    ("utils.build_model", _fail_building_the_model),
    ("trainers.BasicTrainer.build_eval_batches", _fail_loading_eval_data),
], ids=["model", "eval-data"])
def test_a_failed_start_leaves_no_run_directory(target, replacement, tmp_path, monkeypatch):
    """The run directory is made only after the models and the evaluation data have loaded."""
    monkeypatch.setattr(target, replacement)
    with pytest.raises((OSError, RuntimeError)):
        run_in_process([*FAST, f"local_run_dir={tmp_path}/run"])
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- unusable directories

def test_local_run_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    result = run_subprocess([*FAST, f"local_run_dir={tmp_path}/taken"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: local_run_dir={tmp_path}/taken is an existing file, "
                                     f"not a directory; pass a directory, e.g. "
                                     f"local_run_dir={tmp_path}/taken_run")
    assert "Traceback" not in result.stdout + result.stderr
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_local_run_dir_below_a_file_is_refused(tmp_path):
    import train
    (tmp_path / "taken").write_text("")
    config = resolved([*FAST, f"local_run_dir={tmp_path}/taken/run"])
    with pytest.raises(train.ConfigError, match=f"local_run_dir={tmp_path}/taken/run cannot be "
                                                f"created: {tmp_path}/taken is a file"):
        train.check_run_dir(config)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0555: covered by the "
                    "/proc and the simulated read-only tests below")
def test_read_only_local_run_dir_is_refused_in_one_line(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        result = run_subprocess([*FAST, f"local_run_dir={tmp_path}/ro"], timeout=120)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert result.returncode == 2
    assert f"error: local_run_dir={tmp_path}/ro is read-only" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_uncreatable_local_run_dir_is_refused_even_for_root():
    """procfs refuses new files to every user, root included: a real write probe catches it."""
    result = run_subprocess([*FAST, "local_run_dir=/proc/dpo-run"], timeout=120)
    assert result.returncode == 2
    assert ("error: local_run_dir=/proc/dpo-run cannot be created: /proc is read-only"
            in result.stderr)
    assert "Traceback" not in result.stdout + result.stderr


def test_read_only_existing_run_dir_message(tmp_path, monkeypatch):
    """The permission check as a non-root user meets it (root passes os.access)."""
    import train
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro"
                        else real_access(p, mode))
    config = resolved([*FAST, f"local_run_dir={tmp_path}/ro"])
    with pytest.raises(train.ConfigError) as err:
        train.check_run_dir(config)
    assert str(err.value) == (f"local_run_dir={tmp_path}/ro is read-only; make it writable or "
                              f"pass a writable local_run_dir=PATH")


def test_resume_from_errors_name_the_option(tmp_path):
    import train
    (tmp_path / "half").mkdir()
    config = resolved([*FAST, f"local_run_dir={tmp_path}/run", f"resume_from={tmp_path}/half"])
    with pytest.raises(train.ConfigError, match=f"^resume_from={tmp_path}/half is not an intact "
                                                "checkpoint: trainer_state.pt is missing"):
        train.check_run_dir(config)
    config = resolved([*FAST, f"local_run_dir={tmp_path}/run", f"resume_from={tmp_path}/none"])
    with pytest.raises(train.ConfigError, match=f"^resume_from={tmp_path}/none is not a directory"):
        train.validate_config(config, 1)


# ----------------------------------------------------------------------------- the lock

def test_lock_names_the_holder_and_is_released(tmp_path):
    import utils
    fd = utils.lock_run_dir(tmp_path)
    try:
        message = (f"local_run_dir={tmp_path} is in use by another run (process {os.getpid()} "
                   f"holds {tmp_path / '.lock'}); wait for it to end, or pass a new "
                   f"local_run_dir=PATH")
        with pytest.raises(utils.ConfigError) as err:
            utils.check_run_dir_unlocked(tmp_path)
        assert str(err.value) == message
        with pytest.raises(utils.ConfigError, match="is in use by another run"):
            utils.lock_run_dir(tmp_path)
    finally:
        utils.unlock_run_dir(fd)
    utils.check_run_dir_unlocked(tmp_path)
    utils.unlock_run_dir(utils.lock_run_dir(tmp_path))


def wait_for_lock(run_dir: Path, proc, timeout=300):
    """Until `proc` holds the run directory's lock (its PID is in the lock file and the lock is
    taken)."""
    import utils
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        lock = run_dir / utils.LOCK_FILE
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            try:
                utils.check_run_dir_unlocked(run_dir)
            except utils.ConfigError:
                return
        time.sleep(0.05)
    raise AssertionError("the run never took its lock")


def policy_state(run_dir: Path):
    return torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]


@pytest.mark.slow
def test_second_launch_into_a_running_run_is_refused_and_the_first_is_unharmed(tmp_path):
    args = [*FAST, "n_examples=32", "eval_every=16"]
    first = start_subprocess([*args, f"local_run_dir={tmp_path}/run"], tmp_path)
    wait_for_lock(tmp_path / "run", first)
    # Paused while holding the lock, so the second launch meets it however fast the first is.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        start = time.time()
        second = run_subprocess([*args, f"local_run_dir={tmp_path}/run"], timeout=120)
        elapsed = time.time() - start
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"error: local_run_dir={tmp_path}/run is in use by another run (process {first.pid} "
        f"holds {tmp_path}/run/.lock); wait for it to end, or pass a new local_run_dir=PATH")
    assert elapsed < 60  # refused before any model is built
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    undisturbed = run_subprocess([*args, f"local_run_dir={tmp_path}/alone"])
    assert undisturbed.returncode == 0, undisturbed.stderr[-2000:]
    a, b = policy_state(tmp_path / "run"), policy_state(tmp_path / "alone")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    import utils
    run = start_subprocess([*FAST, "n_examples=32", f"local_run_dir={tmp_path}/run"], tmp_path)
    wait_for_lock(tmp_path / "run", run)
    run.kill()
    run.communicate()
    utils.check_run_dir_unlocked(tmp_path / "run")  # no longer held by anyone
    utils.unlock_run_dir(utils.lock_run_dir(tmp_path / "run"))


# ----------------------------------------------------------------------------- relaunching

def test_changed_settings_lists_every_difference_except_the_resumable_ones():
    import utils
    old = {"lr": 1e-3, "loss": {"name": "dpo", "beta": 0.1}, "n_examples": 64,
           "wandb": {"project": "a"}, "datasets": ["hh"]}
    new = {"lr": 1e-2, "loss": {"name": "sft"}, "n_examples": 128,
           "wandb": {"project": "b"}, "datasets": ["hh", "shp"], "seed": 1}
    assert utils.changed_settings(old, new, ("n_examples", "wandb")) == [
        ("datasets", ["hh"], ["hh", "shp"]), ("loss.beta", 0.1, utils.UNSET),
        ("loss.name", "dpo", "sft"), ("lr", 1e-3, 1e-2), ("seed", utils.UNSET, 1)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 16-example run; tests copy it rather than change it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_in_process([*FAST, "n_examples=16", "eval_every=8", f"local_run_dir={run_dir}"])
    return run_dir


def copy_of(run_dir, tmp_path):
    import shutil
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_relaunch_with_a_changed_config_is_refused_naming_each_change(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_subprocess([*FAST, "n_examples=16", "eval_every=8", "max_length=96", "seed=3",
                             f"local_run_dir={run_dir}"], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr
    assert lines[0].startswith(f"error: local_run_dir={run_dir} holds a run with other settings "
                               "(max_length: 128 -> 96, seed: 0 -> 3); start a new run in a new "
                               f"local_run_dir=PATH, or continue from its weights in a new "
                               f"directory with resume_from={run_dir}/LATEST "
                               "local_run_dir=NEW_PATH (only n_examples, n_epochs,")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_resumable_keys_may_change_on_relaunch(finished_run, tmp_path):
    import train
    run_dir = copy_of(finished_run, tmp_path)
    config = resolved([*FAST, "n_examples=16", "eval_every=4", "n_eval_examples=16",
                       "wandb.project=other", "keep_checkpoints=1", "save_hf_format=false",
                       "trainer=FSDPTrainer", f"local_run_dir={run_dir}"])
    assert train.check_run_dir(config) is False  # not refused; complete, as nothing is added


def test_relaunching_a_finished_run_says_it_is_complete(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    result = run_subprocess([*FAST, "n_examples=16", "eval_every=8", f"local_run_dir={run_dir}"],
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        f"run in {run_dir} is complete: 16 examples trained, final weights in "
        f"{run_dir}/LATEST/policy.pt; to train further, relaunch with more examples, e.g. "
        "n_examples=32")
    assert "run directory:" not in result.stdout  # stopped before anything was built


def test_a_larger_n_examples_trains_further(finished_run, tmp_path):
    import train
    run_dir = copy_of(finished_run, tmp_path)
    config = resolved([*FAST, "n_examples=24", "eval_every=8", f"local_run_dir={run_dir}"])
    assert train.check_run_dir(config) is True
    config = resolved([*FAST, "n_examples=15", "eval_every=8", f"local_run_dir={run_dir}"])
    assert train.check_run_dir(config) is False  # 15 rounds up to the 16 already trained


def test_resume_from_into_a_new_directory_may_change_settings(finished_run, tmp_path):
    import train
    config = resolved([*FAST, "n_examples=32", "lr=1e-2", f"resume_from={finished_run}/LATEST",
                       f"local_run_dir={tmp_path}/new"])
    assert train.check_run_dir(config) is True
    assert not (tmp_path / "new").exists()


def test_readme_lists_the_resumable_keys_of_the_code():
    import train
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("Keys that may change on resume:"))
    listed = [k.strip(" `.*") for k in line.split(":", 1)[1].split(",")]
    assert listed == list(train.RESUMABLE_KEYS)


# ----------------------------------------------------------------------------- training further

# beta-DPO draws from the loss's random generator in training and evaluation, and sampling during
# evaluation from the global RNG: an evaluation that used the training RNG would show here.
FURTHER = [*FAST, "eval_every=16", "save_hf_format=false", "loss=dpo", "loss.beta=0.1",
           "loss.mode_loss=beta_DPO", "loss.mode_weight=0.25", "loss.a=0.6",
           "sample_during_eval=true", "n_eval_model_samples=2"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = policy_state(a), policy_state(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def samples_by_step(run_dir: Path) -> dict:
    import json
    out = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record)
    return out


@pytest.mark.slow
def test_an_evaluation_leaves_the_training_rng_as_it_was(tmp_path):
    """An evaluation's draws (beta-DPO's pair selection, the samples) depend only on the seed and
    the step, and training's RNG states are as before it: so an evaluation that one run of the
    same length would not have made (where a finished run stopped) changes nothing after it."""
    from test_train import make_trainer
    trainer = make_trainer(FURTHER[len(FAST):], tmp_path)
    states = (trainer.loss_generator.get_state(), torch.get_rng_state())
    first = trainer.evaluate()
    assert torch.equal(trainer.loss_generator.get_state(), states[0])
    assert torch.equal(torch.get_rng_state(), states[1])
    torch.rand(3, generator=trainer.loss_generator), torch.rand(3)  # other training RNG states
    assert trainer.evaluate() == first
    records = samples_by_step(trainer.run_dir)[0]
    assert len(records) == 4 and records[:2] == records[2:]


@pytest.mark.slow
def test_a_finished_run_relaunched_with_more_examples_ends_as_one_longer_run(tmp_path):
    """Issue 28: 40 examples (evaluated at 0, 16, 32 and, at its end, 40), relaunched with
    n_examples=64, trains on bit for bit as one 64-example run (evaluated at 0, 16, 32, 48, 64):
    the same data order, schedule and RNG, and the extra evaluation at 40 changes nothing."""
    run_dir = run_in_process([*FURTHER, "n_examples=40", f"local_run_dir={tmp_path}/run"])
    with open(run_dir / "metrics.jsonl", "a") as f:  # a write cut short by a kill
        f.write('{"counters/examples": 48, "loss/tr')
    result = run_subprocess([*FURTHER, "n_examples=64", f"local_run_dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {run_dir}/LATEST at 40 examples (5 updates)" in result.stdout
    assert "training further than the finished run, to n_examples=64" in result.stdout
    assert f"dropped 1 unreadable line(s) of {run_dir / 'metrics.jsonl'}" in result.stdout
    whole = run_in_process([*FURTHER, "n_examples=64", f"local_run_dir={tmp_path}/whole"])
    assert same_weights(run_dir, whole)
    extra = {"loss/eval", "counters/examples"}  # the finished run's last evaluation, at 40
    rows = [r for r in logged_values(run_dir) if not (extra <= r.keys() and
                                                      r["counters/examples"] == 40)]
    assert rows == logged_values(whole)  # every line parses, and the same values
    samples = samples_by_step(run_dir)
    assert sorted(samples) == [0, 16, 32, 40, 48, 64]
    del samples[40]
    assert samples == samples_by_step(whole)


def write_pairs(path: Path, n: int) -> Path:
    """A TRL-format preference file of n pairs (train and test split alike)."""
    import json
    path.write_text("".join(json.dumps({"prompt": f"\n\nHuman: add {i} and 1\n\nAssistant:",
                                        "chosen": f" {i + 1}", "rejected": f" {i}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.slow
def test_a_finished_epoch_relaunched_with_more_epochs_ends_as_one_longer_run(tmp_path):
    """20 pairs: 2 batches of 8 per epoch. One epoch, relaunched with n_epochs=2, goes on into
    the second epoch (its own shuffle) as a 2-epoch run does."""
    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    args = [*FAST, "n_examples=null", "eval_batch_size=8", "eval_every=16", "loss=dpo",
            "loss.beta=0.1", f"datasets=[{data}]", "save_hf_format=false"]
    run_dir = run_in_process([*args, "n_epochs=1", f"local_run_dir={tmp_path}/run"])
    assert torch.load(run_dir / "LATEST" / "trainer_state.pt",
                      weights_only=True)["example_counter"] == 16
    run_in_process([*args, "n_epochs=2", f"local_run_dir={run_dir}"])
    whole = run_in_process([*args, "n_epochs=2", f"local_run_dir={tmp_path}/whole"])
    assert torch.load(run_dir / "LATEST" / "trainer_state.pt",
                      weights_only=True)["example_counter"] == 32
    assert same_weights(run_dir, whole)
    key = "loss/train"
    assert [m[key] for m in read_metrics(run_dir) if key in m] == [
        m[key] for m in read_metrics(whole) if key in m]
