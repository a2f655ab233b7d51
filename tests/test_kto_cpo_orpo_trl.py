"""KTO, CPO (SimPO, AlphaPO) and ORPO against TRL 1.16's own trainer code, the oracle (test-only).

As tests/test_losses_trl.py: TRL's methods run unbound on a small stand-in object holding only the
attributes they read. For CPO and ORPO the stand-in model returns logits we choose (leaves), TRL's
`get_batch_loss_metrics` does its own log-softmax, averaging and cross-entropy, and we compare, in
float64, the whole loss (pair term plus NLL) and its gradient with respect to the logits to 1e-5
relative. For KTO the stand-in model returns per-token log-probs (the main and the mismatched
sequences) and TRL's `_compute_loss` runs with precomputed references, as in test_losses_trl.
Also: one hand-worked value per formula, arithmetic in the comment.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import kto_cpo_orpo as K
import losses


# TRL's trainer modules, imported by the tests that use them (about 3 s: not while collecting,
# which every test worker of both CI lanes does); a test skips where TRL is absent.
def cpo_trainer():
    return pytest.importorskip("trl.experimental.cpo.cpo_trainer")


def orpo_trainer():
    return pytest.importorskip("trl.experimental.orpo.orpo_trainer")


def kto_trainer():
    return pytest.importorskip("trl.trainer.kto_trainer")


D = torch.float64
B, T, V = 5, 8, 11  # pairs, sequence length, vocabulary
CPU = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _pairs(seed):
    """Chosen rows then rejected rows: a prompt of 1-3 tokens shared by the pair, completions of
    1..T-p tokens, right padding; logits are float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2 * B, T), generator=g)
    attention = torch.zeros(2 * B, T, dtype=torch.long)
    labels = torch.full((2 * B, T), -100)
    for i in range(B):
        p = int(torch.randint(1, 4, (1,), generator=g))
        for row in (i, B + i):
            c = int(torch.randint(1, T - p + 1, (1,), generator=g))
            ids[row, :p] = ids[i, :p]
            attention[row, :p + c] = 1
            labels[row, p:p + c] = ids[row, p:p + c]
            ids[row, p + c:] = 0
    logits = (torch.randn(2 * B, T, V, generator=g, dtype=D) * 2).requires_grad_(True)
    return ids, attention, labels, logits


def _trl_batch(ids, attention, labels):
    return {"chosen_input_ids": ids[:B], "chosen_attention_mask": attention[:B], "chosen_labels": labels[:B],
            "rejected_input_ids": ids[B:], "rejected_attention_mask": attention[B:],
            "rejected_labels": labels[B:]}


def _stand_in(trainer_cls, logits, **fields):
    """A stand-in trainer: TRL's own methods bound to a namespace with the fields they read."""
    fake = SimpleNamespace(is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False,
                           accelerator=CPU, **fields)
    fake.concatenated_inputs = trainer_cls.concatenated_inputs
    fake.get_batch_logps = trainer_cls.get_batch_logps
    fake.concatenated_forward = lambda model, batch: trainer_cls.concatenated_forward(fake, model, batch)
    for name in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_cls, name):
            setattr(fake, name, getattr(trainer_cls, name).__get__(fake))
    model = lambda input_ids, **kw: SimpleNamespace(logits=logits)  # noqa: E731
    return fake, model


def _token_logps(logits, ids):
    """(2B, T-1) log p(token t+1 | prefix), our own log-softmax."""
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _sums(logits, ids, mask):
    per_token = _token_logps(logits, ids) * mask[:, 1:]
    return per_token.sum(1), mask[:, 1:].sum(1).to(D)


def trl_cpo(ids, attention, labels, logits, **config):
    fields = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0)
    fields.update(config)
    fake, model = _stand_in(cpo_trainer().CPOTrainer, logits, **fields)
    loss, _ = cpo_trainer().CPOTrainer.get_batch_loss_metrics(fake, model, _trl_batch(ids, attention, labels))
    return loss


def registry_loss(name, config, logits, ids, labels, attention):
    """The registry entry's whole loss on the log-probs the trainer supplies: completion sums (or
    means where the entry says), token counts and, for ORPO, the prompts' sums and counts."""
    config = dict(config, name=name)
    losses.validate_loss_args(config)
    spec, args = losses.get_loss(config), {k: v for k, v in config.items() if k != "name"}
    sums, tokens = _sums(logits, ids, (labels != -100).long())
    logps = sums / tokens if spec.average_log_prob(args) else sums
    prompt = (attention.bool() & (labels == -100)).long()
    prompt_sums, prompt_tokens = _sums(logits, ids, prompt)
    inputs = losses.BatchLogps(chosen=logps[:B], rejected=logps[B:], chosen_tokens=tokens[:B],
                               rejected_tokens=tokens[B:], prompt=prompt_sums[:B], prompt_tokens=prompt_tokens[:B])
    loss, _ = spec.compute(inputs, args, spec.init_state(), gather=lambda x: x, train=True)
    return loss


CPO_DEFAULTS = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0)


def ours_cpo(ids, attention, labels, logits, **config):
    return registry_loss("cpo", dict(CPO_DEFAULTS, **config), logits, ids, labels, attention)


def _assert_same(got, expected, logits):
    assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got.item(), expected.item())
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    (g_exp,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(g_got, g_exp, rtol=1e-5, atol=1e-12)


CPO_CASES = [
    {},
    {"beta": 0.5, "label_smoothing": 0.1},
    {"loss_type": "hinge", "beta": 0.3},
    {"loss_type": "ipo"},
    {"loss_type": "simpo", "cpo_alpha": 0.0},                       # SimPO
    {"loss_type": "simpo", "cpo_alpha": 0.5, "simpo_gamma": 1.0, "beta": 2.0, "label_smoothing": 0.2},
    {"loss_type": "simpo", "cpo_alpha": 0.0, "alpha": 0.25, "beta": 2.0},  # AlphaPO
    {"loss_type": "sigmoid", "alpha": -0.5},
    {"loss_type": "ipo", "alpha": 1.0, "cpo_alpha": 0.0},
]


@pytest.mark.parametrize("config", CPO_CASES, ids=[str(i) for i in range(len(CPO_CASES))])
def test_cpo_matches_trl(config):
    for seed in (0, 1):
        case = _pairs(seed)
        _assert_same(ours_cpo(*case, **config), trl_cpo(*case, **config), case[3])


def trl_orpo(ids, attention, labels, logits, beta=0.1):
    fake, model = _stand_in(orpo_trainer().ORPOTrainer, logits, beta=beta)
    loss, _ = orpo_trainer().ORPOTrainer.get_batch_loss_metrics(fake, model, _trl_batch(ids, attention, labels))
    return loss


def ours_orpo(ids, attention, labels, logits, beta=0.1):
    """ORPO's NLL runs over the chosen prompt and completion (TRL: 'computed over the full prompt
    and response'): the registry adds the prompts' log-probs to the completions'."""
    return registry_loss("orpo", {"beta": beta}, logits, ids, labels, attention)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(beta):
    # TRL's odds ratio upcasts with .float(), so its float64 inputs become float32: 1e-5 holds
    for seed in (0, 1):
        case = _pairs(seed)
        _assert_same(ours_orpo(*case, beta=beta), trl_orpo(*case, beta=beta), case[3])


def test_cpo_and_orpo_hand_values():
    one = torch.tensor([-1.0], dtype=D)
    two = torch.tensor([-2.0], dtype=D)
    # sigmoid, beta 1: s = -1 - (-2) = 1, loss = log(1 + e^-1) = 0.31326
    assert K.cpo_loss(one, two, beta=1.0)[0].item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)
    # simpo, beta 2, gamma 1: s = 1 - 0.5 = 0.5, loss = log(1 + e^-1)
    got = K.cpo_loss(one, two, beta=2.0, loss_type="simpo", simpo_gamma=1.0)[0]
    assert got.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)
    # AlphaPO alpha 1: r = 1 - e^{-logp}: r_c = 1 - e = -1.71828, r_r = 1 - e^2 = -6.38906;
    # hinge beta 1: relu(1 - 4.67078) = 0
    assert K.cpo_loss(one, two, beta=1.0, loss_type="hinge", alpha=1.0)[0].item() == 0.0
    # ORPO: log odds = (-1 + 2) - (log(1 - e^-1) - log(1 - e^-2)) = 1 - (-0.45868 + 0.14541) = 1.31327
    log_odds = 1 - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-2)))
    expected = 0.5 * math.log1p(math.exp(-log_odds))
    assert K.orpo_loss(one, two, beta=0.5)[0].item() == pytest.approx(expected, rel=1e-12)


def test_alphapo_reward_is_finite_where_probability_underflows():
    # exp(-800) is 0 in float64, so TRL's p ** -alpha would be inf; the same formula as expm1 is not
    r = K.alphapo_reward(torch.tensor([-800.0, -1.0], dtype=D), 0.01)
    assert torch.isfinite(r).all()
    assert r[1].item() == pytest.approx((1 - math.exp(-1.0) ** -0.01) / 0.01, rel=1e-12)


def test_orpo_upcasts_half_precision():
    half = torch.tensor([-0.5], dtype=torch.bfloat16), torch.tensor([-1.5], dtype=torch.bfloat16)
    losses, cr, rr = K.orpo_loss(*half, beta=0.1)
    assert losses.dtype == cr.dtype == torch.float32


def _kto_case(seed, labels):
    """Per-token log-probs (leaves) of the examples and of their mismatched pairs, completion at the
    end of each row, and precomputed reference sums for both."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        mask[i, T - int(torch.randint(1, T, (1,), generator=g)):] = 1
    kl_mask = mask[K.mismatched_order(n)]
    per_token = ((-torch.rand(n, T - 1, generator=g, dtype=D) * 2) * mask[:, 1:]).requires_grad_(True)
    kl_per_token = ((-torch.rand(n, T - 1, generator=g, dtype=D) * 2) * kl_mask[:, 1:]).requires_grad_(True)
    ref = -torch.rand(n, generator=g, dtype=D) * 2 * mask.sum(1)
    # the references' mismatched sums sit below the policy's, so the KL estimate is positive
    ref_kl = kl_per_token.detach().sum(1) - torch.rand(n, generator=g, dtype=D)
    return per_token, kl_per_token, mask, kl_mask, ref, ref_kl, torch.tensor(labels)


def trl_kto(case, gather=lambda x: x, **config):
    """TRL's KTO loss and its logged KL for this batch; `gather` stands in for other processes."""
    per_token, kl_per_token, mask, kl_mask, ref, ref_kl, labels = case
    fields = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
    fields.update(config)
    n, zeros = len(labels), torch.zeros_like(per_token)
    ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)

    class Model:
        training = True

        def __call__(self, input_ids, **kw):
            logps = kl_per_token if input_ids is kl_ids else per_token
            return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)
    model = Model()
    fake = SimpleNamespace(model=model, ref_model=None, precompute_ref_logps=True, aux_loss_enabled=False,
                           calculate_KL=fields["loss_type"] == "kto",
                           accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather),
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, **fields)
    fake._compute_kl_logps = kto_trainer().KTOTrainer._compute_kl_logps.__get__(fake)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(n, T), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(n, T), "KL_completion_mask": kl_mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = kto_trainer().KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]["kl"][0]


def ours_kto(case, gather=lambda x: x, **config):
    """The registry's KTO entry on the log-probs the trainer supplies: the examples' sums in the
    chosen slots, the mismatched (KL) sequences' in the rejected slots, the labels."""
    per_token, kl_per_token, mask, kl_mask, ref, ref_kl, labels = case
    config = dict(dict(name="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto"),
                  **config)
    losses.validate_loss_args(config)
    spec, args = losses.get_loss(config), {k: v for k, v in config.items() if k != "name"}
    logps = losses.BatchLogps(chosen=per_token.sum(1), reference_chosen=ref, rejected=kl_per_token.sum(1),
                              reference_rejected=ref_kl, label=labels)
    loss, metrics = spec.compute(logps, args, spec.init_state(), gather=gather, train=True)
    return loss, metrics["kto/kl"].item()


KTO_CASES = [
    ({}, [True, False, True, True, False, False]),
    ({"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}, [True, True, True, False, True]),
    ({"loss_type": "apo_zero_unpaired", "beta": 0.3}, [False, True, False, True]),
    ({}, [True, True, True]),            # one label only: TRL's empty undesirable side
    ({"undesirable_weight": 2.0}, [False, False, False, False]),
]


@pytest.mark.parametrize("config,labels", KTO_CASES, ids=[str(i) for i in range(len(KTO_CASES))])
def test_kto_matches_trl(config, labels):
    for seed in (0, 1):
        case = _kto_case(seed, labels)
        expected, expected_kl = trl_kto(case, **config)
        got, kl = ours_kto(case, **config)
        assert kl == pytest.approx(expected_kl, rel=1e-12)
        if config.get("loss_type") != "apo_zero_unpaired":
            assert kl > 0  # the case was built so; a clamp at 0 would make the check empty
        assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got.item(), expected.item())
        (g_got,) = torch.autograd.grad(got, case[0], retain_graph=True)
        (g_exp,) = torch.autograd.grad(expected, case[0])
        assert torch.allclose(g_got, g_exp, rtol=1e-5, atol=1e-12)


def test_kto_kl_estimate_gathered_matches_trl():
    """Two processes: TRL averages the per-process means and clamps the result at 0; a negative
    mean on the other process pulls this one's estimate down (and, far enough, to 0)."""
    case = _kto_case(3, [True, False, True, False])
    for other in (-0.25, -1e3):
        other_mean = torch.tensor([other], dtype=D)
        gather = lambda x: torch.cat([x.reshape(-1), other_mean.to(x.dtype)])  # noqa: E731
        expected_loss, expected_kl = trl_kto(case, gather=lambda x: gather(x) if x.dtype == D else x)
        got_loss, kl = ours_kto(case, gather=gather)
        assert kl == pytest.approx(expected_kl, rel=1e-12, abs=0)
        assert torch.allclose(got_loss, expected_loss, rtol=1e-5, atol=0)
    assert kl == 0.0


def test_kto_hand_values():
    # kto, beta 1, kl 0.5: desirable r = 1: 1 - sig(0.5) = 0.37754; undesirable r = 1, weight 2:
    # 2 (1 - sig(0.5 - 1)) = 2 sig(0.5) = 1.24492
    losses, rewards = K.kto_loss(torch.tensor([1.0, 1.0], dtype=D), torch.zeros(2, dtype=D),
                                 torch.tensor([True, False]), torch.tensor(0.5, dtype=D), beta=1.0,
                                 undesirable_weight=2.0)
    sig = 1 / (1 + math.exp(-0.5))
    assert losses.tolist() == pytest.approx([1 - sig, 2 * sig], rel=1e-12)
    assert rewards.tolist() == [1.0, 1.0]
    # the KL estimate: mean(-1, 3) = 1 over mismatched pairs; mean(-3, 1) = -1 clamps to 0
    assert K.kto_kl(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0])).item() == 1.0
    assert K.kto_kl(torch.tensor([-2.0, 2.0]), torch.tensor([1.0, 1.0])).item() == 0.0


def test_mismatched_order_is_trls_rotation():
    # TRL's add_kl_completion_ids: [completions[-1]] + completions[:-1]
    completions = ["a", "b", "c", "d"]
    assert [completions[i] for i in K.mismatched_order(4).tolist()] == [completions[-1]] + completions[:-1]
