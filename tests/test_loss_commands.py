"""The reference repositories' loss command lines, verbatim, and one per TRL loss type, two steps each
on the embedded model."""
import math

import pytest
import torch

from conftest import FAST, read_metrics, run_in_process

DPO_NAMES = {"rewards_{s}/chosen", "rewards_{s}/rejected", "rewards_{s}/accuracies",
             "rewards_{s}/margins", "logps_{s}/chosen", "logps_{s}/rejected", "loss/{s}"}
TDPO_NAMES = {"kl_{s}/chosen", "kl_{s}/rejected", "kl_{s}/margin"}
BETA_DPO_NAMES = {"record_{s}/gap_mean", "record_{s}/gap_std", "record_{s}/mask_count",
                  "record_{s}/beta_used"}

COMMANDS = {
    "dpo": ("loss=dpo loss.beta=0.1", DPO_NAMES),
    "cdpo": ("loss=dpo loss.beta=0.1 loss.label_smoothing=0.1", DPO_NAMES),
    "ipo": ("loss=ipo loss.beta=0.1", DPO_NAMES),
    "reference_free": ("loss=dpo loss.beta=0.1 loss.reference_free=true", DPO_NAMES),
    "tdpo2": ("loss=tdpo loss.alpha=0.5 loss.beta=0.1", DPO_NAMES | TDPO_NAMES),
    "tdpo1": ("loss=tdpo loss.beta=0.1 loss.if_tdpo2=false", DPO_NAMES | TDPO_NAMES),
    "beta_dpo": ("loss=dpo loss.beta=0.1 loss.mode_loss=beta_DPO loss.mode_weight=0.2 loss.a=0.6",
                 DPO_NAMES | BETA_DPO_NAMES),
}


def names(template, split):
    return {n.format(s=split) for n in template}


@pytest.mark.parametrize("which", list(COMMANDS))
def test_command_line_runs_two_steps_with_its_metrics(which, tmp_path):
    command, expected = COMMANDS[which]
    run_dir = run_in_process([*FAST, "n_examples=16", *command.split(),
                              f"local_run_dir={tmp_path}/{which}"])
    metrics = read_metrics(run_dir)
    train_rows = [m for m in metrics if "loss/train" in m]
    eval_rows = [m for m in metrics if "loss/eval" in m]
    assert len(train_rows) == 2 and train_rows[-1]["counters/updates"] == 2
    assert names(expected, "train") <= set(train_rows[0])
    assert names(expected, "eval") <= set(eval_rows[0])
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    first = eval_rows[0]
    if which in ("dpo", "tdpo2", "tdpo1", "beta_dpo"):
        # Policy == reference before training: every DPO-family loss starts at ln 2.
        assert first["loss/eval"] == pytest.approx(math.log(2), abs=1e-5)
    if which == "cdpo":
        assert first["loss/eval"] == pytest.approx(math.log(2), abs=1e-5)  # smoothing symmetric at 0
    if which == "ipo":
        assert first["loss/eval"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # (0 - 1/2β)²
    if which == "beta_dpo":
        kept = int(8 * (1 - 0.2))  # int(B·(1 − mode_weight)) pairs per batch of 8
        assert train_rows[0]["record_train/mask_count"] == kept
    if which.startswith("tdpo"):
        assert first["kl_eval/chosen"] == pytest.approx(0.0, abs=1e-5)


def test_reference_free_builds_no_reference_model(tmp_path):
    import train
    from conftest import compose
    from omegaconf import OmegaConf
    import utils
    config = compose([*FAST, "loss=dpo", "loss.reference_free=true", f"local_run_dir={tmp_path}"])
    OmegaConf.resolve(config)
    policy, reference = train.build_models(config, utils.build_tokenizer("embedded"))
    assert reference is None
    config = compose([*FAST, "loss=dpo", f"local_run_dir={tmp_path}"])
    OmegaConf.resolve(config)
    assert train.build_models(config, utils.build_tokenizer("embedded"))[1] is not None


def test_beta_dpo_statistics_are_saved_and_restored(tmp_path):
    command = COMMANDS["beta_dpo"][0].split()
    run_dir = run_in_process([*FAST, "n_examples=32", "eval_every=16", *command,
                              f"local_run_dir={tmp_path}/b"])
    state = torch.load(run_dir / "step-16" / "trainer_state.pt", weights_only=True)["loss_state"]
    logged = [m for m in read_metrics(run_dir) if m.get("counters/examples") == 16
              and "record_train/gap_mean" in m][0]
    assert state["gap_mean"] == pytest.approx(logged["record_train/gap_mean"], rel=1e-6)
    assert state["gap_std"] == pytest.approx(logged["record_train/gap_std"], rel=1e-6)


LN2 = math.log(2)
EXO_EPS = 1e-3
# loss=NAME command -> the first training loss, where the policy still equals the reference:
# every log-ratio is 0 (the hand values of tests/test_losses_trl.py at delta = 0)
TRL_COMMANDS = {
    "sigmoid": ("loss=sigmoid loss.beta=0.1", LN2),
    "hinge": ("loss=hinge loss.beta=0.1", 1.0),                                   # relu(1 - 0)
    "exo_pair": ("loss=exo_pair", 0.5 * (-LN2 - math.log1p(-EXO_EPS)) + 0.5 * (-LN2 - math.log(EXO_EPS))),
    "nca_pair": ("loss=nca_pair", 2 * LN2),                                     # ln2 + ln2/2 + ln2/2
    "robust": ("loss=robust loss.label_smoothing=0.1", LN2),                   # (0.9 ln2 - 0.1 ln2) / 0.8
    "bco_pair": ("loss=bco_pair", 2 * LN2),
    "sppo_hard": ("loss=sppo_hard loss.beta=0.1", 50.0),                       # (0 - 5)^2 + (0 + 5)^2
    "aot": ("loss=aot", LN2),
    "aot_unpaired": ("loss=aot_unpaired", LN2),
    "aot_pair": ("loss=aot_pair", LN2),
    "apo_zero": ("loss=apo_zero", 1.0),                                         # 1 - 1/2 + 1/2
    "apo_down": ("loss=apo_down", 1.0),                                         # 1/2 + 1 - 1/2
    "discopop": ("loss=discopop", 0.5 * LN2 + 0.5),                              # sig(0) = 1/2 blend of ln2 and e^0
    "sigmoid_norm": ("loss=sigmoid_norm", LN2),
    "f_divergence": ("loss=sigmoid loss.f_divergence_type=js_divergence", LN2),  # f'(1) - f'(1) = 0 too
    # the added NLL is not known by hand: only its presence is checked
    "rpo": ("loss=sigmoid loss.rpo_alpha=1.0", None),
    "mpo": ("loss=mix", None),
}
QUICK = ["n_examples=16", "n_eval_examples=8", "eval_batch_size=8"]


@pytest.mark.parametrize("which", list(TRL_COMMANDS))
def test_trl_loss_command_line_runs_two_steps(which, tmp_path):
    command, first_loss = TRL_COMMANDS[which]
    run_dir = run_in_process([*FAST, *QUICK, *command.split(), f"local_run_dir={tmp_path}/{which}"])
    train_rows = [m for m in read_metrics(run_dir) if "loss/train" in m]
    assert len(train_rows) == 2
    assert names(DPO_NAMES, "train") <= set(train_rows[0])
    assert all(math.isfinite(v) for m in train_rows for v in m.values())
    if first_loss is not None:
        assert train_rows[0]["loss/train"] == pytest.approx(first_loss, rel=1e-5)
    if which == "rpo":
        # + rpo_alpha x chosen NLL: the loss exceeds DPO's ln 2 by exactly the logged NLL
        assert train_rows[0]["loss/train"] == pytest.approx(LN2 + train_rows[0]["nll_train/chosen"], rel=1e-5)
    if which == "mpo":
        row = train_rows[0]
        # 0.8 sigmoid + 0.2 bco_pair + 1.0 sft, each term logged under its own prefix
        assert row["sigmoid_train/loss"] == pytest.approx(LN2, rel=1e-5)
        assert row["bco_pair_train/loss"] == pytest.approx(2 * LN2, rel=1e-5)
        assert row["loss/train"] == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2 + row["sft_train/loss"], rel=1e-5)


def test_wpo_run_logs_weights_and_the_first_loss_is_their_mean_times_ln2(tmp_path):
    # policy == reference at the first step: every pair's sigmoid loss is ln 2, so the WPO loss is
    # ln 2 x the mean of the logged weights; each weight is a product of two probabilities in (0, 1]
    run_dir = run_in_process([*FAST, *QUICK, "loss=sigmoid", "loss.use_weighting=true",
                              f"local_run_dir={tmp_path}/wpo"])
    first = [m for m in read_metrics(run_dir) if "loss/train" in m][0]
    assert 0 < first["wpo_train/weights"] <= 1
    assert first["loss/train"] == pytest.approx(LN2 * first["wpo_train/weights"], rel=1e-5)


def test_ld_dpo_with_precomputed_reference_equals_the_live_reference(tmp_path):
    # LD-DPO's reference public sums come from the disk cache: the run is the live-reference run
    common = [*FAST, *QUICK, "loss=sigmoid", "loss.ld_alpha=0.5", "loss.use_weighting=true"]
    live = read_metrics(run_in_process([*common, f"local_run_dir={tmp_path}/live"]))
    cached = read_metrics(run_in_process([*common, "precompute_ref_log_probs=true",
                                          f"local_run_dir={tmp_path}/cached"]))
    for key in ("loss/train", "loss/eval", "rewards_train/margins", "logps_train/chosen"):
        got = [m[key] for m in cached if key in m]
        want = [m[key] for m in live if key in m]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7) and len(want) >= 2, key
