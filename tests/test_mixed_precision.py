"""mixed_precision (issue 11 item 7): float32 master weights and optimizer state, forward and
backward under torch.autocast (BasicTrainer, TensorParallelTrainer) or FSDP's MixedPrecisionPolicy;
pure bf16 weights lose updates smaller than bf16's resolution, mixed precision keeps them."""
import math

import pytest
import torch

import logps
import optim
from conftest import FAST, compose, run_in_process
from utils import ConfigError

# One AdamW update of about lr per weight: far below bf16's spacing (2^-7 relative, 7.6e-6 at
# |w| = 1e-3), so rounding to bf16 keeps every weight of at least that size.
ONE_SMALL_STEP = [*FAST, "loss=sft", "n_examples=8", "batch_size=8", "optimizer=AdamW", "lr=1e-6",
                  "warmup_steps=0", "save_hf_format=false", "do_first_eval=false"]


def initial_and_final(tmp_path, name, *extra):
    import train
    import utils
    overrides = [*ONE_SMALL_STEP, f"local_run_dir={tmp_path}/{name}", *extra]
    initial, _ = train.build_models(compose(overrides), utils.build_tokenizer("embedded"))
    run_dir = run_in_process(overrides)
    final = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    return {k: v.detach() for k, v in initial.state_dict().items()}, final


def changed_fraction(initial, final):
    """Fraction of the weights with |w| >= 1e-3 whose value changed."""
    changed = total = 0
    for name, before in initial.items():
        big = before.float().abs() >= 1e-3
        changed += (final[name].float() != before.float())[big].sum().item()
        total += big.sum().item()
    return changed / total


@pytest.mark.slow
def test_pure_bf16_loses_a_small_update_and_mixed_precision_keeps_it(tmp_path):
    initial, final = initial_and_final(tmp_path, "pure", "model.policy_dtype=bfloat16",
                                       "model.reference_dtype=bfloat16")
    assert all(v.dtype == torch.bfloat16 for v in final.values())
    assert changed_fraction(initial, final) == 0.0  # the whole update was rounded away

    initial, final = initial_and_final(tmp_path, "mixed", "mixed_precision=bf16")
    assert all(v.dtype == torch.float32 for v in final.values())  # float32 master weights
    assert changed_fraction(initial, final) > 0.9
    optimizer = torch.load(tmp_path / "mixed" / "LATEST" / "optimizer.pt", weights_only=True)["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer["state"].values())


def test_mixed_precision_settings_are_checked():
    import train
    cases = {
        "mixed_precision=bf32": "mixed_precision=bf32 must be null, bf16 or fp16",
        "mixed_precision=bf16 model.policy_dtype=bfloat16":
            "mixed_precision=bf16 keeps float32 master weights, but model.policy_dtype=bfloat16; "
            "set model.policy_dtype=float32 (or mixed_precision=null for pure bfloat16)",
        "mixed_precision=fp16 model.fsdp_policy_mp=bfloat16":
            "mixed_precision=fp16 and model.fsdp_policy_mp=bfloat16 disagree; set only "
            "mixed_precision (model.fsdp_policy_mp is its older name)",
        "+model.fsdp_policy_mp=float16":  # a DPO-repository model preset that sets it
            "model.fsdp_policy_mp=float16 in the model preset is the older name of mixed_precision; "
            "remove it and set mixed_precision=fp16",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as e:
            train.validate_config(compose([*FAST, *overrides.split()]), 1)
        assert str(e.value) == message
    # the DPO repository's FSDP-only name is one spelling of mixed_precision: the config holds only
    # the new key, agreeing with an explicit one or alone
    for extra in (["mixed_precision=bf16"], []):
        config = compose([*FAST, *extra, "model.fsdp_policy_mp=bfloat16"])
        train.validate_config(config, 1)
        assert config.mixed_precision == "bf16" and "fsdp_policy_mp" not in config.model
    assert compose([*FAST, "model.fsdp_policy_mp=null"]).mixed_precision is None


def kernel_inputs(seed=0, n_rows=10, hidden=24, vocab=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n_rows // 2 + 1, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (2, n_rows // 2 + 1), generator=g)
    labels[:, 0] = -100
    return h, w, labels


def test_chunked_output_layer_under_autocast_matches_its_forward():
    """Under bf16 autocast the chunked kernel's logits are bf16 products (as the model's own head
    under autocast); backward must recompute the same logits, so a chunk size that recomputes
    gives the gradient of one that keeps every row."""
    h, w, labels = kernel_inputs()
    grads, values = {}, {}
    for chunk in (1, 1024):  # 1: every block after the first is recomputed in backward
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = logps.completion_logps(h, w, labels, chunk_size=chunk)
            full = logps.get_batch_logps(torch.nn.functional.linear(h, w).float(), labels)
        out.sum().backward()
        values[chunk], grads[chunk] = out.detach(), (h.grad.clone(), w.grad.clone())
        torch.testing.assert_close(out.detach(), full.detach(), rtol=0, atol=1e-5)
    for a, b in zip(grads[1], grads[1024]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_token_kl_under_autocast_recomputes_the_forwards_logits():
    """The streamed TDPO kernel's gradient is the gradient of its forward's (bf16-product)
    logits: worked out here on full logits made by the same autocast product."""
    h, w, labels = kernel_inputs(seed=1)
    ref_h, ref_w, _ = kernel_inputs(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        margin, kl, _ = logps.completion_token_kl(h, ref_h.detach(), w, ref_w.detach(), labels,
                                                  chunk_size=3, vocab_chunk_size=7)
        z = torch.nn.functional.linear(h, w).float().detach().requires_grad_()
        zr = torch.nn.functional.linear(ref_h, ref_w).float().detach()
    (margin.sum() + kl.sum()).backward()
    want_margin, want_kl, _ = logps.tdpo_get_batch_logps(z, zr, labels)
    torch.testing.assert_close(margin.detach(), want_margin.detach(), rtol=0, atol=1e-5)
    (want_margin.sum() + want_kl.sum()).backward()
    dz = z.grad.reshape(-1, z.shape[-1])
    torch.testing.assert_close(w.grad, dz.t() @ h.detach().reshape(-1, h.shape[-1]),
                               rtol=0, atol=1e-5)


def test_loss_scaler_skips_an_overflow_halves_and_grows():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scaler = optim.LossScaler(optimizer)
    assert scaler.scale(torch.tensor(2.0)).item() == 2.0 * 2 ** 16
    p.grad = torch.full((3,), 2.0 ** 17)
    scaler.unscale([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    assert scaler.update(math.inf) is False
    assert optimizer.param_groups[0]["loss_scale"] == 2 ** 15
    for _ in range(optim.LossScaler.GROWTH_INTERVAL):
        assert scaler.update(1.0) is True
    assert optimizer.param_groups[0]["loss_scale"] == 2 ** 16
    # saved and restored with the optimizer
    state = optimizer.state_dict()
    other = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    other.load_state_dict(state)
    assert optim.LossScaler(other).group["loss_scale"] == 2 ** 16


@pytest.mark.slow
def test_fp16_mixed_precision_trains_and_saves_its_loss_scale(tmp_path):
    run_dir = run_in_process([*FAST, "loss=dpo", "loss.beta=0.1", "n_examples=16",
                              "mixed_precision=fp16", "save_hf_format=false",
                              f"local_run_dir={tmp_path}/run"])
    final = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in final.values())
    optimizer = torch.load(run_dir / "LATEST" / "optimizer.pt", weights_only=True)["state"]
    assert optimizer["param_groups"][0]["loss_scale"] == 2.0 ** 16  # two steps, no overflow
    assert optimizer["param_groups"][0]["loss_scale_good_steps"] == 2


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_equals_basic_bf16_mixed_precision(tmp_path):
    """One setting, the same meaning: FSDP's MixedPrecisionPolicy (every op in bf16) against
    autocast (matrix products in bf16) on the same global batches; both keep float32 weights."""
    from test_distributed import COMMON, assert_same_losses, policy_state, train_2proc
    train_2proc("FSDPTrainer", tmp_path / "fsdp", "mixed_precision=bf16")
    run_in_process([*COMMON, "mixed_precision=bf16", f"local_run_dir={tmp_path}/basic"])
    worst = assert_same_losses(tmp_path / "fsdp", tmp_path / "basic", rtol=2e-2)
    got, want = policy_state(tmp_path / "fsdp"), policy_state(tmp_path / "basic")
    assert all(v.dtype == torch.float32 for v in got.values())
    # AdamW's first updates are about lr x sign(gradient), so bf16's different rounding flips a
    # few small entries: compare the whole update (final - initial) of the two runs instead
    import train
    import utils
    initial, _ = train.build_models(compose([*COMMON, f"local_run_dir={tmp_path}/x"]),
                                    utils.build_tokenizer("embedded"))
    initial = initial.state_dict()
    fsdp_update = torch.cat([(got[k] - initial[k]).flatten() for k in want])
    basic_update = torch.cat([(want[k] - initial[k]).flatten() for k in want])
    cosine = torch.nn.functional.cosine_similarity(fsdp_update, basic_update, dim=0).item()
    relative = ((fsdp_update - basic_update).norm() / basic_update.norm()).item()
    assert cosine > 0.98 and relative < 0.25, (worst, cosine, relative)  # measured 0.993, 0.11
