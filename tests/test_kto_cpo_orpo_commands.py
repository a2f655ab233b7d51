"""KTO, CPO, SimPO, AlphaPO and ORPO from the command line: two steps each on the embedded model
and data, and on user files (paired, unpaired); refusals of data that does not fit the loss."""
import json
import math

import pytest

from conftest import FAST, compose, read_metrics, run_in_process
from preference_datasets import DatasetFormatError
from utils import ConfigError

QUICK = ["n_examples=16", "n_eval_examples=8", "eval_batch_size=8"]
PAIRED = {"rewards_train/chosen", "rewards_train/rejected", "rewards_train/margins", "logps_train/chosen",
          "logps_train/rejected", "loss/train"}
KTO = {"kto_train/kl", "rewards_train/chosen", "rewards_train/rejected", "count_train/desirable",
       "count_train/undesirable", "loss/train"}
COMMANDS = {
    "kto": ("loss=kto", KTO),
    "kto_weighted": ("loss=kto loss.desirable_weight=1.5 loss.undesirable_weight=0.5", KTO),
    "apo_zero_unpaired": ("loss=kto loss.loss_type=apo_zero_unpaired", KTO),
    "cpo": ("loss=cpo", PAIRED | {"nll_train/chosen"}),
    "simpo": ("loss=simpo loss.beta=2.0", PAIRED),
    "alphapo": ("loss=simpo loss.alpha=0.25 loss.beta=2.0", PAIRED),
    "orpo": ("loss=orpo", PAIRED | {"nll_train/chosen", "orpo_train/log_odds_ratio"}),
}


def _train_rows(run_dir):
    return [m for m in read_metrics(run_dir) if "loss/train" in m]


def check_run(which, rows):
    command, expected = COMMANDS[which]
    assert len(rows) == 2 and expected <= set(rows[0]), set(rows[0])
    assert all(math.isfinite(v) for m in rows for v in m.values())
    first = rows[0]
    if which in ("kto", "apo_zero_unpaired"):
        # policy == reference: every ratio and the KL estimate are 0; 1 - sig(0) = sig(0) = 1/2
        assert first["loss/train"] == pytest.approx(0.5, abs=1e-6)
        assert first["count_train/desirable"] == first["count_train/undesirable"] == 4  # 8 = 4 + 4
    if which == "kto_weighted":
        assert first["loss/train"] == pytest.approx(0.5 * (1.5 + 0.5) / 2, abs=1e-6)
    if which == "orpo":
        # loss = NLL + beta * -(mean logsig(log odds)), with beta 0.1: both terms are logged
        pair = -0.1 * first["orpo_train/log_odds_ratio"]
        assert first["loss/train"] == pytest.approx(first["nll_train/chosen"] + pair, rel=1e-5)
    if which == "cpo":
        assert first["loss/train"] > first["nll_train/chosen"]  # + the (positive) sigmoid term
    if which == "simpo":
        assert "nll_train/chosen" not in first


COMPUTED = {}


@pytest.mark.parametrize("which", list(COMMANDS))
def test_command_line_runs_two_steps(which, tmp_path):
    run_dir = run_in_process([*FAST, *QUICK, *COMMANDS[which][0].split(), f"local_run_dir={tmp_path}/{which}"])
    rows = _train_rows(run_dir)
    check_run(which, rows)
    COMPUTED[which] = rows[0]["tokens/computed"]
    if which == "apo_zero_unpaired" and "kto" in COMPUTED:
        # no KL term: the mismatched pairs are not scored (same batches, fewer token positions)
        assert COMPUTED["apo_zero_unpaired"] < COMPUTED["kto"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _paired_rows(n=24):
    return [{"prompt": f"Say {w}{i}:", "chosen": f" {w}{i}", "rejected": f" no{i}"}
            for i, w in zip(range(n), ["cat", "dog", "sun"] * n)]


def _unpaired_rows(n=24):
    return [{"prompt": f"Say {i}:", "completion": f" {i}" if i % 2 else " wrong", "label": bool(i % 2)}
            for i in range(n)]


@pytest.mark.parametrize("which,kind", [("kto", "unpaired"), ("kto", "paired"), ("cpo", "paired"),
                                        ("simpo", "paired"), ("orpo", "paired")])
def test_user_files(which, kind, tmp_path):
    path = _write(tmp_path / f"{kind}.jsonl", _unpaired_rows() if kind == "unpaired" else _paired_rows())
    run_dir = run_in_process([*FAST, *QUICK, f"datasets=[{path}]", *COMMANDS[which][0].split(),
                              f"local_run_dir={tmp_path}/{which}"])
    check_run(which, _train_rows(run_dir))
    if kind == "unpaired":  # evaluate.py reads the run's unpaired data: prompts, no pairs to rank
        check_evaluation_of_unpaired_data(run_dir)


def check_evaluation_of_unpaired_data(run_dir):
    from hydra import compose as compose_eval, initialize_config_dir
    import evaluate
    with initialize_config_dir(config_dir=evaluate.CONFIG_DIR, version_base=None):
        cfg = compose_eval("evaluate", overrides=[f"checkpoint={run_dir}/LATEST", "reward=implicit",
                                                  "n_prompts=4", "n_samples=2", "max_new_tokens=4"])
    results = evaluate.evaluate(cfg)
    assert results["implicit_accuracy"] == {"mean": None, "se": None, "ci95": None, "n": 0}
    assert results["n_prompts"] == 4 and math.isfinite(results["win_rate_vs_chosen"]["mean"])
    assert "implicit-reward accuracy    not measured (no pairs)" in evaluate.format_table(results)


def test_refusals(tmp_path):
    unpaired = _write(tmp_path / "unpaired.jsonl", _unpaired_rows())
    with pytest.raises(DatasetFormatError, match="unpaired examples .* use loss=kto"):
        run_in_process([*FAST, *QUICK, f"datasets=[{unpaired}]", "loss=dpo", f"local_run_dir={tmp_path}/a"])
    one_label = _write(tmp_path / "good.jsonl", [dict(r, label=True) for r in _unpaired_rows()])
    with pytest.raises(DatasetFormatError, match="all 24 examples are desirable"):
        run_in_process([*FAST, *QUICK, f"datasets=[{one_label}]", "loss=kto", f"local_run_dir={tmp_path}/b"])
    import train
    with pytest.raises(ConfigError, match="batch_size=1: loss=kto needs at least 2"):
        train.validate_loss_combination(compose([*FAST, "loss=kto", "batch_size=1"]))
    with pytest.raises(ValueError, match="loss.loss_type='dpo': must be one of sigmoid, hinge, ipo, simpo"):
        import losses
        losses.validate_loss_args({"name": "cpo", "beta": 0.1, "loss_type": "dpo"})
    with pytest.raises(ValueError, match="loss.label_smoothing=0.1: not used by loss_type=hinge"):
        losses.validate_loss_args({"name": "cpo", "beta": 0.1, "loss_type": "hinge", "label_smoothing": 0.1})


def test_reference_free_entries_build_no_reference(tmp_path):
    import train
    import utils
    from omegaconf import OmegaConf
    for name in ("cpo", "simpo", "orpo"):
        config = compose([*FAST, f"loss={name}", f"local_run_dir={tmp_path}"])
        OmegaConf.resolve(config)
        assert train.build_models(config, utils.build_tokenizer("embedded"))[1] is None, name


def _same_runs(a, b, keys):
    for key in keys:
        got, want = [m[key] for m in a if key in m], [m[key] for m in b if key in m]
        assert len(want) >= 2 and got == pytest.approx(want, rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_kto_precomputed_reference_equals_the_live_reference(tmp_path):
    # the KL sequences' reference log-probs come from the disk cache too
    common = [*FAST, *QUICK, "loss=kto"]
    live = read_metrics(run_in_process([*common, f"local_run_dir={tmp_path}/live"]))
    cached = read_metrics(run_in_process([*common, "precompute_ref_log_probs=true",
                                          f"local_run_dir={tmp_path}/cached"]))
    _same_runs(cached, live, ("loss/train", "loss/eval", "kto_train/kl", "rewards_train/chosen"))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kto", "orpo"])
def test_shared_prompts_and_packing_equal_plain_rows(loss, tmp_path):
    # share_prompt and packing are on by default; one row per sequence must train the same
    common = [*FAST, *QUICK, f"loss={loss}"]
    laid_out = read_metrics(run_in_process([*common, f"local_run_dir={tmp_path}/layout"]))
    plain = read_metrics(run_in_process([*common, "share_prompt=false", "packing=false",
                                         f"local_run_dir={tmp_path}/plain"]))
    _same_runs(laid_out, plain, ("loss/train", "loss/eval", "logps_train/chosen"))
    computed = [sum(m["tokens/computed"] for m in rows if "tokens/computed" in m) for rows in (laid_out, plain)]
    assert computed[0] < computed[1]  # the prompts were shared: the layout was in use


@pytest.mark.slow
def test_kto_with_lora_uses_the_adapter_off_reference(tmp_path):
    import train
    import utils
    from omegaconf import OmegaConf
    overrides = [*FAST, *QUICK, "loss=kto", "lora.r=4", f"local_run_dir={tmp_path}/lora"]
    config = compose(overrides)
    OmegaConf.resolve(config)
    assert train.build_models(config, utils.build_tokenizer("embedded"))[1] is None  # no second model
    rows = _train_rows(run_in_process(overrides))
    # the adapter starts at zero: policy == adapter-off reference, so the first loss is 1 - sig(0)
    assert rows[0]["loss/train"] == pytest.approx(0.5, abs=1e-6)
    assert rows[1]["kto_train/kl"] != 0 or rows[1]["loss/train"] != 0.5  # the adapter trained


@pytest.mark.slow
def test_kto_resumes_exactly(tmp_path, capsys):
    # the labelled batch schedule is rebuilt from (seed, epoch) and skipped to the resume point
    import shutil
    import torch
    common = [*FAST, *QUICK, "n_examples=32", "eval_every=16", "loss=kto"]
    whole = run_in_process([*common, f"local_run_dir={tmp_path}/whole"])
    resumed = run_in_process([*common, f"local_run_dir={tmp_path}/resumed"])
    shutil.rmtree(resumed / "LATEST")
    capsys.readouterr()
    run_in_process([*common, f"local_run_dir={tmp_path}/resumed"])
    assert "resuming from" in capsys.readouterr().out
    got = torch.load(resumed / "LATEST" / "policy.pt", weights_only=True)["state"]
    want = torch.load(whole / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    rows = [m for m in read_metrics(resumed) if "loss/train" in m]
    assert [m["counters/examples"] for m in rows][-2:] == [24, 32]
