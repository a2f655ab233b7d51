"""The router load-balancing loss of mixture-of-experts models (Mixtral, Qwen-MoE, ...), added to the
policy loss as TRL's DPOTrainer does (loss + router_aux_loss_coef * aux_loss).

Log-probs come from the backbone's hidden states (logps.py), never from the model's forward, so
the model's own aux_loss is never computed. RouterLoss therefore asks the backbone for its router
logits (output_router_logits=True) and, after each policy forward, computes the loss with the
model family's own transformers function (load_balancing_loss_func, Switch Transformer eqs. 4-6,
Fedus et al. 2021, arXiv 2101.03961), masked by the attention mask as the model's forward does.
"""
import contextlib
import contextvars
import inspect
import sys
from typing import Dict, Optional, Tuple

import torch

from utils import ConfigError

# Set while the trainer scores a batch: other forwards (checks, sampling) add no router loss.
_COLLECTING = contextvars.ContextVar("router_loss_collecting", default=False)
# Set while a reference scores with the policy's own backbone (LoRA's adapter-disabled
# reference): those forwards are not the policy's and add no router loss.
_PAUSED = contextvars.ContextVar("router_loss_paused", default=False)


# Which tokens are real in a forward whose attention mask is 4D (packing.py's layouts), since
# the router loss is masked per token, as with a (B, T) attention mask.
_TOKENS = contextvars.ContextVar("router_loss_tokens", default=None)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor):
    """(R, L) bool of real tokens, for the router loss of forwards inside this block."""
    token = _TOKENS.set(mask)
    try:
        yield
    finally:
        _TOKENS.reset(token)


@contextlib.contextmanager
def router_loss_paused():
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


def is_moe(model) -> bool:
    """Whether the model's forward takes output_router_logits (TRL's test)."""
    return "output_router_logits" in inspect.signature(type(model).forward).parameters


class RouterLoss:
    """Collects the router loss of the policy's forwards and adds it to a loss.

    Args:
        model: the policy (unplaced; the hooks survive FSDP sharding).
        coef: router_aux_loss_coef (None: the model config's own; 0: off).
    """

    def __init__(self, model, coef: Optional[float]):
        moe = is_moe(model)
        if coef is None:
            coef = getattr(model.config, "router_aux_loss_coef", 0.0) if moe else 0.0
        if coef and not moe:
            raise ConfigError(f"router_aux_loss_coef={coef} needs a mixture-of-experts model (one "
                              f"whose forward takes output_router_logits); {type(model).__name__} "
                              "has no router: set router_aux_loss_coef=null or 0")
        self.coef, self.losses = float(coef), []
        if self.coef:
            module = sys.modules[type(model).__module__]
            self.loss_fn = module.load_balancing_loss_func
            cfg = model.config
            self.n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
            self.top_k = cfg.num_experts_per_tok
            backbone = getattr(model, model.base_model_prefix)
            backbone.register_forward_pre_hook(self._ask_for_router_logits, with_kwargs=True)
            backbone.register_forward_hook(self._collect, with_kwargs=True)

    @contextlib.contextmanager
    def collecting(self):
        """Collect the router losses of the policy's forwards inside this block."""
        token = _COLLECTING.set(True)
        try:
            yield
        finally:
            _COLLECTING.reset(token)

    @staticmethod
    def _counted() -> bool:
        return _COLLECTING.get() and not _PAUSED.get()

    def _ask_for_router_logits(self, module, args, kwargs):
        if self._counted():
            kwargs["output_router_logits"] = True
        return args, kwargs

    def _collect(self, module, args, kwargs, output):
        if not self._counted():
            return
        router_logits = getattr(output, "router_logits", None)
        if router_logits:
            mask = kwargs.get("attention_mask")
            if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
                mask = _TOKENS.get()
            self.losses.append(self.loss_fn(router_logits, self.n_experts, self.top_k, mask))

    def add_to(self, loss: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss + coef x the mean router loss of the forwards since the last call,
        {"aux_loss": that mean}); (loss, {}) when off. Clears the collected losses."""
        collected, self.losses = self.losses, []
        if not self.coef or not collected:
            return loss, {}
        aux = torch.stack([a.to(loss.device).float() for a in collected]).mean()
        return loss + self.coef * aux.to(loss.dtype), {"aux_loss": aux}
