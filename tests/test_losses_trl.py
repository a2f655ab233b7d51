"""Every loss against TRL 1.16's own DPOTrainer loss code, the oracle (a test-only dependency).

TRL's `DPOTrainer._compute_loss` is run unbound on a small stand-in object holding only the
attributes it reads, with a stand-in model whose output holds per-token log-probs we choose, and
with precomputed reference log-probs (so no reference model runs). We compare, in float64, the
mean loss and its gradient with respect to each policy sequence log-prob to 1e-5 relative.
The per-token log-probs are leaves: a sequence log-prob is their sum, so d loss / d (sequence
log-prob) is the gradient at any of its completion tokens (all equal, checked).

Also: one hand-worked value per loss on a single pair, arithmetic in the comment.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import losses

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

D = torch.float64
B, T = 6, 7  # pairs, sequence length (position 0 is prompt; 1..T-1 may be completion)



def compute(spec, fields, *args, **kwargs):
    """spec.compute on a losses.BatchLogps made from {field: tensor} ('public.<field>': LD-DPO's)."""
    public = {k[len("public."):]: v for k, v in fields.items() if k.startswith("public.")}
    logps = losses.BatchLogps(**{k: v for k, v in fields.items() if not k.startswith("public.")},
                              public=losses.BatchLogps(**public) if public else None)
    return spec.compute(logps, *args, **kwargs)

def _case(seed, dtype=D):
    """Random per-token log-probs, completion masks of varied lengths, reference sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (2 * B,), generator=g)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, T - n:] = 1  # completion at the end, prompt first
    per_token = (-torch.rand(2 * B, T - 1, generator=g, dtype=D) * 2).to(dtype)
    per_token = (per_token * mask[:, 1:]).requires_grad_(True)
    ref = (-torch.rand(2 * B, generator=g, dtype=D) * 2 * lengths).to(dtype)
    return per_token, mask, ref


def _log_sum_sq(per_token, seed=7):
    """A stand-in for TRL's per-token `log_sum_sq_probs` (logsumexp_v 2 log p(v)): any values at or
    below the token's own 2 log p work for the comparison; random ones in [2 log p - 1, 2 log p]."""
    g = torch.Generator().manual_seed(seed)
    return (2 * per_token.detach() - torch.rand(per_token.shape, generator=g, dtype=per_token.dtype))


def trl_loss(per_token, mask, ref, loss_type, weights=None, **config):
    """TRL 1.16's loss for this batch (chosen rows first, then rejected, as its collator)."""
    fields = dict(beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
                  f_alpha_divergence_coef=0.5, discopop_tau=0.05, use_weighting=False, ld_alpha=None)
    fields.update(config)
    zeros = torch.zeros_like(per_token)

    class Model:
        training = True

        def __call__(self, **kw):
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                   is_top1=torch.zeros_like(per_token, dtype=torch.bool),
                                   log_sum_sq_probs=_log_sum_sq(per_token))
    model = Model()
    fake = SimpleNamespace(
        model=model, ref_model=None, precompute_ref_logps=True, aux_loss_enabled=False,
        loss_types=list(loss_type) if isinstance(loss_type, (list, tuple)) else [loss_type],
        args=SimpleNamespace(discopop_tau=fields["discopop_tau"]),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        **{k: v for k, v in fields.items() if k != "discopop_tau"})
    fake.loss_weights = weights or [1.0] * len(fake.loss_types)
    if fields["ld_alpha"] is not None:  # TRL's cached reference holds LD-DPO's combination
        ref = ref_ld(ref, mask, fields["ld_alpha"])
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return trl_dpo.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)


def sequence_grads(per_token, mask, loss):
    """d loss / d (sequence log-prob) per row, from the per-token gradient."""
    (g,) = torch.autograd.grad(loss, per_token)
    m = mask[:, 1:].bool()
    seq = torch.stack([g[i][m[i]][0] for i in range(2 * B)])
    for i in range(2 * B):  # every completion token of a row carries the same gradient
        assert torch.allclose(g[i][m[i]], seq[i].expand(int(m[i].sum())), rtol=1e-12, atol=0)
    return seq


def _public_mask(mask):
    """(2B, T-1): the first min(len_chosen, len_rejected) completion tokens of each pair's rows,
    found by counting (not TRL's cumsum): completions are the last n positions of a row."""
    lengths = mask[:, 1:].sum(1)
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    public = torch.zeros(2 * B, T - 1, dtype=torch.bool)
    for i in range(2 * B):
        start = T - 1 - int(lengths[i])
        public[i, start:start + int(shared[i])] = True
    return public


def ref_ld(ref, mask, alpha):
    """Reference sums as LD-DPO sees them, with the reference's public part a fixed 40% of it."""
    public = 0.4 * ref
    return public + alpha * (ref - public)


def ours(per_token, mask, ref, config):
    """Our registry's loss on the sequence log-probs TRL sees (summed; averaged where the entry
    says), with LD-DPO's public sums and WPO's log-weights as the trainer supplies them."""
    spec = losses.get_loss(config)
    args = {k: v for k, v in config.items() if k != "name"}
    sums = (per_token * mask[:, 1:]).sum(1)
    tokens = mask[:, 1:].sum(1).to(per_token.dtype)
    public = (per_token * _public_mask(mask)).sum(1)
    wpo = ((per_token - _log_sum_sq(per_token)) * mask[:, 1:]).sum(1).detach()
    logps = {"chosen": sums[:B], "rejected": sums[B:],
             "reference_chosen": ref[:B], "reference_rejected": ref[B:],
             "public.chosen": public[:B], "public.rejected": public[B:],
             "public.reference_chosen": 0.4 * ref[:B], "public.reference_rejected": 0.4 * ref[B:],
             "chosen_wpo": wpo[:B], "rejected_wpo": wpo[B:],
             "chosen_tokens": tokens[:B], "rejected_tokens": tokens[B:]}
    if spec.average_log_prob(args):
        for side, n in (("chosen", tokens[:B]), ("rejected", tokens[B:])):
            for key in (side, f"reference_{side}"):
                logps[key], logps[f"public.{key}"] = logps[key] / n, logps[f"public.{key}"] / n
    loss, _ = compute(spec, logps, args, spec.init_state(), gather=lambda x: x, train=True)
    return loss


def assert_matches_trl(config, loss_type, weights=None, dtype=D, seeds=(0, 1, 2), value_only=False,
                       **trl_config):
    """Value and gradient equal TRL's. LD-DPO weighs a row's tokens differently (public / verbose),
    so there the gradient is compared per token rather than per sequence."""
    losses.validate_loss_args(config)
    grads = sequence_grads if config.get("ld_alpha") is None else token_grads
    for seed in seeds:
        per_token, mask, ref = _case(seed, dtype)
        expected = trl_loss(per_token, mask, ref, loss_type, weights, **trl_config)
        got = ours(per_token, mask, ref, config)
        assert torch.allclose(got, expected, rtol=1e-5, atol=0), (config, got.item(), expected.item())
        if not value_only:
            expected_grad = grads(per_token, mask, expected)
            got_grad = grads(per_token, mask, got)
            assert torch.allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-12), config


def token_grads(per_token, mask, loss):
    """d loss / d (per-token log-prob) at the completion tokens."""
    (g,) = torch.autograd.grad(loss, per_token)
    return g[mask[:, 1:].bool()]


# (our config, TRL loss_type, TRL's own fields): one per loss and per listed hyper-parameter value
SINGLE = [
    ({"name": "sigmoid", "beta": 0.1}, "sigmoid", {}),
    ({"name": "dpo", "beta": 0.3}, "sigmoid", {"beta": 0.3}),
    ({"name": "hinge", "beta": 0.5}, "hinge", {"beta": 0.5}),
    ({"name": "ipo", "beta": 0.1}, "ipo", {}),
    ({"name": "exo_pair", "beta": 0.1, "label_smoothing": 1e-3}, "exo_pair", {"label_smoothing": 1e-3}),
    ({"name": "exo_pair", "beta": 0.2, "label_smoothing": 0.2}, "exo_pair", {"beta": 0.2, "label_smoothing": 0.2}),
    ({"name": "nca_pair", "beta": 0.1}, "nca_pair", {}),
    ({"name": "robust", "beta": 0.1, "label_smoothing": 0.0}, "robust", {}),
    ({"name": "robust", "beta": 0.1, "label_smoothing": 0.1}, "robust", {"label_smoothing": 0.1}),
    ({"name": "bco_pair", "beta": 0.1}, "bco_pair", {}),
    ({"name": "sppo_hard", "beta": 0.1}, "sppo_hard", {}),
    ({"name": "aot", "beta": 0.1}, "aot", {}),
    ({"name": "aot", "beta": 0.1, "label_smoothing": 0.2}, "aot", {"label_smoothing": 0.2}),
    ({"name": "aot_unpaired", "beta": 0.1, "label_smoothing": 0.1}, "aot_unpaired", {"label_smoothing": 0.1}),
    ({"name": "aot_pair", "beta": 0.1}, "aot_unpaired", {}),
    ({"name": "apo_zero", "beta": 0.1}, "apo_zero", {}),
    ({"name": "apo_down", "beta": 0.1}, "apo_down", {}),
    ({"name": "discopop", "beta": 0.1}, "discopop", {}),
    ({"name": "discopop", "beta": 0.1, "discopop_tau": 0.5}, "discopop", {"discopop_tau": 0.5}),
    ({"name": "sigmoid_norm", "beta": 0.1}, "sigmoid_norm", {}),
]
F_DIVERGENCE_LOSSES = ["sigmoid", "hinge", "exo_pair", "robust", "discopop"]


@pytest.mark.parametrize("config,loss_type,trl_config", SINGLE,
                         ids=[c["name"] + str(i) for i, (c, _, _) in enumerate(SINGLE)])
def test_single_loss_matches_trl(config, loss_type, trl_config):
    assert_matches_trl(config, loss_type, **trl_config)


@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
@pytest.mark.parametrize("f_type", ["forward_kl", "js_divergence"])
def test_f_divergences_match_trl(name, f_type):
    extra = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    config = dict(name=name, beta=0.1, f_divergence_type=f_type, **extra)
    assert_matches_trl(config, name, f_divergence_type=f_type, **extra)


@pytest.mark.parametrize("coef", [0.5, 1.0, 1.5])
def test_alpha_divergence_matches_trl(coef):
    # TRL's alpha_divergence has no float64 branch (its clamp table stops at float32): compare in float32
    config = dict(name="sigmoid", beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef)
    assert_matches_trl(config, "sigmoid", dtype=torch.float32, f_divergence_type="alpha_divergence",
                       f_alpha_divergence_coef=coef)


MIXTURES = [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),       # MPO
    (["hinge", "ipo", "sigmoid_norm"], None, {}),                 # averaged terms from sums / tokens
    (["robust", "exo_pair", "aot"], [1.0, 0.5, 2.0], {"label_smoothing": 0.1}),
    (["apo_zero", "apo_down", "nca_pair", "sppo_hard", "discopop"], [0.1, 0.2, 0.3, 0.4, 0.5], {}),
    (["sft"], None, {}),
]


@pytest.mark.parametrize("terms,weights,shared", MIXTURES)
def test_mixtures_match_trl(terms, weights, shared):
    config = dict(name="mix", losses=terms, weights=weights, beta=0.1, **shared)
    assert_matches_trl(config, terms, weights, **shared)


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "apo_zero"])
def test_rpo_alpha_is_trls_loss_plus_weighted_sft(name):
    # TRL 1.16 dropped rpo_alpha for loss_type=[X, 'sft'] with loss_weights=[1, alpha]
    assert_matches_trl({"name": name, "beta": 0.1, "rpo_alpha": 0.7}, [name, "sft"], [1.0, 0.7])


# ---------------------------------------------------------------------------
# Hand-worked values: one pair, beta = 0.5, policy (c, r) = (-1, -3), reference (c, r) = (-2, -2):
# chosen log-ratio +1, rejected -1, so r_c = 0.5, r_r = -0.5 and beta delta = 0.5 (1 - (-1)) = 1.
# softplus(x) = log(1 + e^x), so -logsig(x) = softplus(-x); sig(1) = 0.7310585786.
# ---------------------------------------------------------------------------

def sp(x):
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


HAND = {
    # -logsig(1) = softplus(-1) = 0.3132616875
    "sigmoid": ({}, sp(-1)),
    # relu(1 - 1) = 0
    "hinge": ({}, 0.0),
    # sig(1)(logsig(1) - log(1 - 0.1)) + sig(-1)(logsig(-1) - log 0.1)
    "exo_pair": ({"label_smoothing": 0.1},
                 sig(1) * (-sp(-1) - math.log(0.9)) + sig(-1) * (-sp(1) - math.log(0.1))),
    # -logsig(0.5) - 0.5 logsig(-0.5) - 0.5 logsig(0.5) = sp(-0.5) + 0.5 sp(0.5) + 0.5 sp(-0.5)
    "nca_pair": ({}, 1.5 * sp(-0.5) + 0.5 * sp(0.5)),
    # ((1 - 0.1) sp(-1) - 0.1 sp(1)) / (1 - 0.2)
    "robust": ({"label_smoothing": 0.1}, (0.9 * sp(-1) - 0.1 * sp(1)) / 0.8),
    # -logsig(0.5) - logsig(0.5) = 2 sp(-0.5)
    "bco_pair": ({}, 2 * sp(-0.5)),
    # (1 - 1/(2 * 0.5))^2 + (-1 + 1)^2 = 0
    "sppo_hard": ({}, 0.0),
    # one pair: sorting changes nothing; policy margin 2, reference 0: -logsig(0.5 * 2) = sp(-1)
    "aot": ({}, sp(-1)),
    # sorted chosen ratio 1 minus sorted rejected ratio -1: again sp(-1)
    "aot_unpaired": ({}, sp(-1)),
    # 1 - sig(0.5) + sig(-0.5) = 2 sig(-0.5)
    "apo_zero": ({}, 2 * sig(-0.5)),
    # sig(0.5) + 1 - sig(0.5 (1 - (-1))) = sig(0.5) + 1 - sig(1)
    "apo_down": ({}, sig(0.5) + 1 - sig(1)),
    # z = 1, tau 0.05: mix = sig(20); (1 - mix) sp(-1) + mix e^-1
    "discopop": ({}, (1 - sig(20)) * sp(-1) + sig(20) * math.exp(-1)),
    # inputs taken as averaged log-probs: same arithmetic as sigmoid, sp(-1)
    "sigmoid_norm": ({}, sp(-1)),
    # (h - 1/(2 * 0.5))^2 with h = 2: (2 - 1)^2 = 1
    "ipo": ({}, 1.0),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_worked_value(name):
    extra, expected = HAND[name]
    spec = losses.LOSSES[name]
    pc, pr = torch.tensor([-1.0], dtype=D), torch.tensor([-3.0], dtype=D)
    rc, rr = torch.tensor([-2.0], dtype=D), torch.tensor([-2.0], dtype=D)
    out, cr, rjr = spec.fn(pc, pr, rc, rr, beta=0.5, **extra)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert cr.item() == pytest.approx(0.5) and rjr.item() == pytest.approx(-0.5)


def test_every_trl_loss_has_a_hand_value():
    assert {n for n, s in losses.LOSSES.items() if s.trl} | {"ipo"} == set(HAND)


def test_sft_term_is_token_weighted_over_the_global_batch():
    # rank 0 holds rows with 1 and 3 tokens (sum -8), rank 1 rows with 4 and 4 tokens (sum -4):
    # global token mean NLL = 12 / 12 = 1; rank 0 returns -(-8) * 2 / 12 = 4/3, rank 1 2/3,
    # and their average (what gradient averaging over ranks optimises) is 1.
    rank0, rank1 = torch.tensor([1.0, 3.0]), torch.tensor([4.0, 4.0])

    def gather(x):
        return torch.cat([rank0, rank1])
    a = losses.chosen_nll(torch.tensor([-2.0, -6.0]), rank0, gather)
    b = losses.chosen_nll(torch.tensor([-1.0, -3.0]), rank1, gather)
    assert a.item() == pytest.approx(4 / 3) and b.item() == pytest.approx(2 / 3)
    assert ((a + b) / 2).item() == pytest.approx(1.0)


# every TRL loss type but the sorting ones (TRL refuses WPO there), with WPO, LD-DPO and both
WPO_LD = [c for c in SINGLE if c[1] not in ("aot", "aot_unpaired") and c[0]["name"] != "dpo"]


@pytest.mark.parametrize("config,loss_type,trl_config", WPO_LD,
                         ids=[c["name"] + str(i) for i, (c, _, _) in enumerate(WPO_LD)])
@pytest.mark.parametrize("extra", [{"use_weighting": True}, {"ld_alpha": 0.3},
                                   {"use_weighting": True, "ld_alpha": 0.0}], ids=["wpo", "ld", "wpo+ld"])
def test_wpo_and_ld_dpo_match_trl(config, loss_type, trl_config, extra):
    # TRL 1.16's hinge with use_weighting cannot backpropagate (`per_sequence_loss *= weights`
    # writes over relu's saved output): its value is the oracle there, the gradient is ours alone
    value_only = loss_type == "hinge" and extra.get("use_weighting", False)
    assert_matches_trl(dict(config, **extra), loss_type, value_only=value_only, **trl_config, **extra)


@pytest.mark.parametrize("name", ["sigmoid", "aot"])
def test_ld_dpo_with_sorting_and_rpo_matches_trl(name):
    # LD-DPO with AOT's sort, and with RPO's NLL term (which TRL takes from the plain sums)
    assert_matches_trl({"name": name, "beta": 0.1, "ld_alpha": 0.5, "rpo_alpha": 0.7}, [name, "sft"],
                       [1.0, 0.7], ld_alpha=0.5)


# (TRL 1.16 crashes on WPO with an sft term: it multiplies the expanded scalar in place)
@pytest.mark.parametrize("terms,weights,shared", [(["sigmoid", "bco_pair"], [0.8, 0.2], {}),
                                                  (["ipo", "sigmoid_norm", "apo_zero"], None, {})])
def test_mixtures_with_wpo_and_ld_dpo_match_trl(terms, weights, shared):
    extra = {"use_weighting": True, "ld_alpha": 0.25}
    config = dict(name="mix", losses=terms, weights=weights, beta=0.1, **shared, **extra)
    assert_matches_trl(config, terms, weights, **shared, **extra)


def test_wpo_weights_and_ld_logps_hand_values():
    # WPO: chosen sum -2 over 4 tokens, rejected -3 over 3: exp(-0.5) * exp(-1) = exp(-1.5)
    w = losses.wpo_weights(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([4.0]), torch.tensor([3.0]))
    assert w.item() == pytest.approx(math.exp(-1.5))
    # LD-DPO: public part -2, total -5, alpha 0.5: -2 + 0.5 * (-3) = -3.5
    assert losses.ld_logps(torch.tensor([-5.0]), torch.tensor([-2.0]), 0.5).item() == pytest.approx(-3.5)


@pytest.mark.parametrize("config,fragment", [
    ({"name": "exo_pair", "beta": 0.1, "label_smoothing": 0.0}, "loss.label_smoothing=0"),
    ({"name": "nca_pair", "beta": 0.1, "f_divergence_type": "forward_kl"}, "loss.f_divergence_type="),
    ({"name": "sigmoid", "beta": 0.1, "f_divergence_type": "forward_kl", "reference_free": True},
     "loss.f_divergence_type="),
    ({"name": "sigmoid", "beta": 0.1, "f_divergence_type": "chi2"}, "loss.f_divergence_type="),
    ({"name": "discopop", "beta": 0.1, "discopop_tau": 0}, "loss.discopop_tau="),
    ({"name": "hinge", "beta": 0.1, "rpo_alpha": -1}, "loss.rpo_alpha="),
    ({"name": "mix", "beta": 0.1, "losses": ["sigmoid", "tdpo"]}, "loss.losses="),
    ({"name": "mix", "beta": 0.1, "losses": ["sigmoid", "sigmoid"]}, "loss.losses="),
    ({"name": "mix", "beta": 0.1, "losses": ["sigmoid", "sft"], "weights": [1.0]}, "loss.weights="),
    ({"name": "mix", "beta": 0.1, "losses": ["sigmoid", "robust"], "label_smoothing": 0.1}, "loss.label_smoothing="),
    ({"name": "mix", "beta": 0.1, "losses": ["hinge", "ipo"], "f_divergence_type": "forward_kl"},
     "loss.f_divergence_type="),
    ({"name": "mix", "losses": ["sigmoid"]}, "loss.beta"),
    ({"name": "aot", "beta": 0.1, "use_weighting": True}, "loss.use_weighting=true"),
    ({"name": "mix", "beta": 0.1, "losses": ["sigmoid", "aot_unpaired"], "use_weighting": True},
     "loss.use_weighting=true"),
    ({"name": "sigmoid", "beta": 0.1, "ld_alpha": 1.5}, "loss.ld_alpha="),
    ({"name": "hinge", "beta": 0.1, "use_weighting": 1}, "loss.use_weighting="),
])
def test_refusals_are_one_line_naming_the_key(config, fragment):
    with pytest.raises(ValueError) as e:
        losses.validate_loss_args(config)
    assert fragment in str(e.value) and "\n" not in str(e.value)
