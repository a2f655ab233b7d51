"""The router load-balancing loss of mixture-of-experts models (moe.RouterLoss)."""
import math

import torch

import packing
import scoring
from conftest import FAST, run_subprocess
from test_train import make_trainer

MIXTRAL = ["model.from_config.model_type=mixtral", "+model.from_config.num_local_experts=4",
           "+model.from_config.num_experts_per_tok=2", "model.block_name=MixtralDecoderLayer"]


def test_aux_loss_equals_the_models_own_and_reaches_the_router(tmp_path):
    trainer = make_trainer([*MIXTRAL, "loss=dpo", "loss.beta=0.1", "router_aux_loss_coef=0.01"],
                           tmp_path)
    batch = trainer.rank_slice(next(iter(trainer.train_iterator())), 0, 1)
    usual = packing.lay_out(batch, trainer.sides, False, False, None)  # one row per sequence
    with trainer.router_loss.collecting():
        trainer.policy_logps(scoring.batch_logps, trainer.policy, trainer.reference, batch, usual,
                             trainer.loss, trainer.loss_args, trainer.config.logps_chunk_size)
    collected = list(trainer.router_loss.losses)
    assert len(collected) == 2  # chosen and rejected; the reference model adds none
    own = trainer.policy(input_ids=batch["chosen_input_ids"],
                         attention_mask=batch["chosen_attention_mask"],
                         output_router_logits=True).aux_loss
    torch.testing.assert_close(collected[0], own, rtol=1e-6, atol=1e-7)
    base = torch.zeros((), requires_grad=True)
    loss, metrics = trainer.router_loss.add_to(base)
    torch.testing.assert_close(loss, 0.01 * (collected[0] + collected[1]) / 2)
    trainer.policy.zero_grad()
    metrics["aux_loss"].backward()
    routers = [(n, p) for n, p in trainer.policy.named_parameters() if ".gate." in n or "router" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in routers)
    out = trainer.train_step(next(iter(trainer.train_iterator())))
    assert math.isfinite(out["aux_loss/train"])
    assert math.isfinite(trainer.evaluate()["aux_loss/eval"])


def test_null_uses_the_model_config_and_zero_is_off(tmp_path):
    trainer = make_trainer([*MIXTRAL, "loss=sft"], tmp_path / "a")
    assert trainer.router_loss.coef == trainer.policy.config.router_aux_loss_coef > 0
    off = make_trainer([*MIXTRAL, "loss=sft", "router_aux_loss_coef=0"], tmp_path / "b")
    assert "aux_loss/train" not in off.train_step(next(iter(off.train_iterator())))


def test_refused_on_a_dense_model(tmp_path):
    result = run_subprocess([*FAST, "router_aux_loss_coef=0.01", f"local_run_dir={tmp_path}/x"],
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: router_aux_loss_coef=0.01 needs a mixture-of-experts model")
