"""The command line and the config's numbers: unknown keys, the DPO repository's aliases,
non-finite values, n_examples rounding, and starting wandb without a login (issue 11 items 1 and
10, issue 12 items 9 and 15)."""
import os
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, compose, run_subprocess


# ----------------------------------------------------------------------------- unknown keys

def test_unknown_key_gets_one_line_naming_the_closest_known_key():
    result = run_subprocess([*FAST, "lr_rate=1e-3"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown key 'lr_rate'; did you mean 'lr'?"
    assert "Traceback" not in result.stdout + result.stderr


def test_every_unknown_key_gets_its_own_line_and_aliases_are_accepted():
    result = run_subprocess(["loss=dpo", "model.block=LlamaDecoderLayer", "loss.betta=0.1",
                             "n_exampels=8", "+lr_rat=1"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key 'loss.betta'; did you mean 'loss.beta'?",
        "error: unknown key 'n_exampels'; did you mean 'n_examples'?",
        "error: +lr_rat adds a key train.py never reads; keys can be added only under "
        "model.from_config or dataset_paths; did you mean 'lr'?"]


@pytest.mark.parametrize("args,expected", [
    (["model.block=GPT2Block"], ["model.block_name=GPT2Block"]),
    (["+model.from_config.num_local_experts=4"], ["+model.from_config.num_local_experts=4"]),
    (["+dataset_paths.mine=/data"], ["+dataset_paths.mine=/data"]),
    (["loss=dpo", "beta=0.1"], None),
    (["~lr"], ["~lr"]),
])
def test_command_line_check(args, expected):
    import train
    rewritten, problems = train.check_command_line(args)
    if expected is None:
        assert problems == ["unknown key 'beta'; did you mean 'loss.beta'?"]
    else:
        assert (rewritten, problems) == (expected, [])


def test_model_block_alias_sets_block_name():
    import train
    args, _ = train.check_command_line(["model=blank_model", "model.block=GPT2Block"])
    assert compose(args).model.block_name == "GPT2Block"


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("override,message", [
    ("lr=inf", "lr=inf must be a finite number"),
    ("lr=nan", "lr=nan must be a finite number"),
    ("max_grad_norm=nan", "max_grad_norm=nan must be a finite number"),
    ("max_grad_norm=-inf", "max_grad_norm=-inf must be a finite number"),
    ("minimum_log_interval_secs=nan", "minimum_log_interval_secs=nan must be a finite number"),
    ("minimum_log_interval_secs=inf", "minimum_log_interval_secs=inf must be a finite number"),
    ("seed=-1", "seed=-1 must be a non-negative integer"),
])
def test_non_finite_or_out_of_range_numbers_are_refused(override, message, tmp_path):
    import train
    from omegaconf import OmegaConf
    config = compose([*FAST, f"local_run_dir={tmp_path}/run", override])
    OmegaConf.resolve(config)
    with pytest.raises(train.ConfigError) as err:
        train.validate_config(config, 1)
    assert str(err.value) == message


@pytest.mark.parametrize("override", ["loss.beta=nan", "loss.beta=inf", "loss.beta=0",
                                      "loss.beta=-0.1"])
def test_bad_loss_beta_is_refused_from_the_command_line(override, tmp_path):
    result = run_subprocess([*FAST, "loss=dpo", override, f"local_run_dir={tmp_path}/run"],
                            timeout=120)
    assert result.returncode == 2
    # losses.validate_loss_args's wording; a non-finite beta fails its finite-number check.
    assert result.stderr.strip() == f"error: {override}: must be a number > 0"
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- n_examples rounding

def test_n_examples_rounding_is_announced_with_the_count_the_iterator_trains(tokenizer, capsys):
    import preference_datasets
    import train
    from omegaconf import OmegaConf
    config = compose([*FAST, "n_examples=36", "batch_size=8"])
    OmegaConf.resolve(config)
    train.note_rounding(config)
    assert capsys.readouterr().out == ("note: n_examples=36 is not a multiple of batch_size=8; "
                                       "training on 40 examples (5 batches of 8)\n")
    batches = preference_datasets.get_batch_iterator(
        ["synthetic"], tokenizer, batch_size=8, n_examples=36, max_length=128,
        max_prompt_length=64, silent=True)
    assert sum(len(b["prompt"]) for b in batches) == train.trained_examples(36, 8) == 40
    config = compose([*FAST, "n_examples=32", "batch_size=8"])
    train.note_rounding(config)
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- wandb

@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC",
                 "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_wandb_mode_follows_credentials_and_an_explicit_mode(no_wandb_login, monkeypatch):
    import utils
    assert utils.wandb_mode() == "offline"
    (no_wandb_login / ".netrc").write_text("machine example.com login user password x\n")
    assert utils.wandb_mode() == "offline"  # an entry for another host is no wandb login
    (no_wandb_login / ".netrc").write_text("machine api.wandb.ai login user password k\n")
    (no_wandb_login / ".netrc").chmod(0o600)
    assert utils.wandb_mode() == "online"
    (no_wandb_login / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert utils.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert utils.wandb_mode() == "disabled"


START_OFFLINE = """
import sys
sys.path.insert(0, {root!r})
import utils, wandb
run = utils.start_wandb(None, "dpo-test", {{"lr": 1e-3}}, {run_dir!r}, "sft_tiny")
wandb.log({{"loss/train": 0.5}}, step=8)
wandb.finish()
print("run id", run.id)
"""


@pytest.mark.slow
def test_wandb_without_a_login_logs_offline_into_the_run_dir(no_wandb_login, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in ("NETRC",)}
    env["HOME"] = str(no_wandb_login)
    result = subprocess.run([sys.executable, "-c", START_OFFLINE.format(root=str(ROOT),
                                                                        run_dir=str(run_dir))],
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(result.stdout.split()[-1])
    assert list(offline[0].glob("*.wandb"))  # the logged history, ready for `wandb sync`
    assert (f"wandb: no wandb credentials (WANDB_API_KEY or ~/.netrc), so this run logs offline "
            f"to {offline[0]}; upload it later with: wandb sync {offline[0]}") in result.stdout
    assert not (no_wandb_login / ".netrc").exists()  # nothing asked for a key or saved one


NO_WANDB_IMPORT = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import FAST, run_in_process
run_in_process([*FAST, "n_examples=8", "wandb.enabled=false", "local_run_dir={run_dir}"])
print("wandb imported:", "wandb" in sys.modules)
"""


def test_wandb_disabled_never_imports_wandb(tmp_path):
    script = NO_WANDB_IMPORT.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                    run_dir=tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "wandb imported: False"


# ----------------------------------------------------------------------------- --help

def group_lines(text: str) -> dict:
    """{group: [options]} from the '== Configuration groups ==' block of a --help text."""
    block = text.split("== Configuration groups")[1].split("==")[1]
    return {line.split(":")[0]: line.split(": ")[1].split(", ") for line in block.splitlines()
            if ": " in line}


@pytest.mark.slow
@pytest.mark.parametrize("program, groups", [("train.py", {"model", "loss", "reward"}), ("evaluate.py", {"reward"})])
def test_help_says_what_the_program_does_and_lists_only_its_groups(program, groups):
    result = run_subprocess(["--help"], timeout=120, script=program)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"{program}: ") and "powered by Hydra" not in out
    listed = group_lines(out)
    assert set(listed) == groups  # reward= is online training's judge; evaluate.py refuses model= and loss=
    for group, options in listed.items():
        assert options == sorted(p.stem for p in (ROOT / "config" / group).glob("*.yaml"))
    assert "README.md and docs/*.md" in out and "--hydra-help" in out
    assert ("datasets=[hh]" in out) == (program == "train.py")
    assert ("checkpoint=RUN/LATEST" in out) == (program == "evaluate.py")
