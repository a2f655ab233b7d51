"""wandb as a new user meets it (issue 11 item 1): `train.py wandb.enabled=true` with no login
anywhere trains, logs offline into the run directory and says how to upload it; never a prompt."""
import os
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, read_metrics


def no_login_env(home):
    """The test process's environment without any wandb setting (conftest sets WANDB_MODE=disabled
    for the test process) and with HOME an empty directory: no ~/.netrc, no wandb settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_train_with_wandb_and_no_login_logs_offline_into_the_run_dir(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-u", "train.py", *FAST, "n_examples=16", "wandb.enabled=true",
         f"local_run_dir={run_dir}"],
        cwd=ROOT, env=no_login_env(home), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    assert list(offline[0].glob("*.wandb"))  # the logged history, ready for `wandb sync`
    assert (f"so this run logs offline to {offline[0]}; upload it later with: "
            f"wandb sync {offline[0]}") in result.stdout
    assert (run_dir / "LATEST" / "policy.pt").is_file()
    assert read_metrics(run_dir)[-1]["counters/examples"] == 16
    # the run id is kept for a resume, so the relaunch continues the same wandb run
    assert offline[0].name.endswith(offline_run_id(run_dir))
    assert not (home / ".netrc").exists()  # no key was asked for or saved


def offline_run_id(run_dir):
    import torch
    state = torch.load(run_dir / "LATEST" / "trainer_state.pt", weights_only=True)
    return state["wandb_run_id"]
