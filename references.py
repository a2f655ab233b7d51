"""Where reference log-probs come from: small interchangeable kinds behind one interface.

The trainer holds one `Reference` and asks it for log-probs; it never checks which kind it has.
  * NoReference     - reference-free losses and SFT: there is nothing to compare with.
  * ModelReference  - a separate frozen model scored alongside the policy (the DPO repository's).
  * CachedReference - a ModelReference's per-sequence log-probs computed once before training and
                      kept on disk (precompute_ref_log_probs=true), after which the model is freed.
A new kind (the policy with its adapter disabled, a copy synced with the policy) is one more small
subclass: it yields its model from `_scope` (the scoring bodies are the base class's) and, if it
can, `generate`s; `after_step` and `checkpoint_states` let it follow the policy and be saved.
The cache file's format is ref_cache.py's; sampling.py fills samples.jsonl.
"""
import contextlib
import gc
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import tqdm
from torch.distributed.tensor import DTensor, distribute_tensor

import logps
import packing
import parallel
import ref_cache
from moe import router_loss_paused
from parallel import Ranks
from utils import ConfigError, rank0_print


class Reference:
    """The interface. Subclasses override what they can do."""
    # The frozen model it runs, if any (the trainer places, shards and frees it through this).
    model = None

    def prepare(self, batches: Callable[[], Iterable[Tuple[Dict, int]]],
                rank_slice: Callable[[Dict, int, int], Dict], sides: Tuple[str, ...]):
        """Called once before the first training step.

        Args:
            batches: returns an iterator of (global batch, micro-batches per batch) over every
                batch that training (the whole schedule) and evaluation will score.
            rank_slice: (global batch, part, n_parts) -> this rank's share of micro-batch `part`.
            sides: ('chosen', 'rejected') or ('chosen',).
        """

    chunk_size = None  # logps_chunk_size, for the kinds that run a model

    @contextlib.contextmanager
    def _scope(self):
        """Yields the model that scores as the reference, ready to run (kinds that run one)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference log-probs")
        yield

    def layout_logps(self, batch: Dict, layout, average: bool,
                     public_tokens: Optional[torch.Tensor] = None) -> Dict[str, logps.SideLogps]:
        """{side: logps.SideLogps} of the sides of a packing.Layout of `batch`, no gradient:
        (B,) log-probs (sums, or per-token means) and LD-DPO's public part (public_tokens)."""
        with torch.no_grad(), self._scope() as model:
            return packing.model_logps(model, layout, average, self.chunk_size, public_tokens)

    def sequence_logps(self, batch: Dict, side: str, average: bool) -> torch.Tensor:
        """(B,) log-probs of `side`'s label tokens in the usual layout, no gradient."""
        return self.layout_logps(batch, packing.plain_layout(batch, side), average)[side].logps

    def layout_states(self, layout, full: bool) -> torch.Tensor:
        """(R, L, H) final hidden states on a packing.Layout's rows, or (full) its logits, for
        token-level KL (TDPO)."""
        with self._scope() as model:
            return packing.model_states(model, layout, full)

    def output_layer(self):
        """(weight (V, H), bias (V,) or None), for token-level KL."""
        with self._scope() as model:
            return logps.output_layer(model)

    def generate(self, sample: Callable, batch: Dict) -> Optional[List[str]]:
        """`sample(model, batch)` with the reference's model, or None when it cannot generate."""
        return None

    def after_step(self, policy):
        """Called after every optimizer step (a reference synced with the policy acts here)."""

    def checkpoint_states(self) -> Dict[str, object]:
        """{file name: state} to save with each checkpoint (none for a fixed reference). Called on
        every rank (gathering a sharded state is collective); rank 0 writes the result."""
        return {}

    # -- how the policy is saved: all of it, except when the reference is the policy's base
    # (LoRA: only the adapter trains, so only the adapter is saved).

    def policy_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The part of the policy's full state dict that policy.pt keeps."""
        return state

    def policy_state_to_load(self, saved: Dict[str, torch.Tensor], policy) -> Dict[str, torch.Tensor]:
        """The full state dict to load into `policy` on resume, from a saved policy.pt."""
        return saved

    def plain_policy_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The policy's full state in the plain model's layout (for the Hugging Face export)."""
        return state

    def write_exports(self, directory: Path, state: Dict[str, torch.Tensor]):
        """Write extra files of the final checkpoint into `directory` (rank 0)."""

    def load_checkpoint_states(self, states: Dict[str, object]):
        """Restore what `checkpoint_states` saved, on resume: {file name: state}, every state
        file of the checkpoint besides the trainer's own (empty for a fixed reference, or a
        checkpoint written without one)."""


class NoReference(Reference):
    """Reference-free losses and SFT."""


class ModelReference(Reference):
    """A separate frozen model, scored on the same micro-batches as the policy.

    Args:
        model: the placed (moved or sharded) frozen model.
        chunk_size: completion positions per output-layer chunk (config logps_chunk_size).
        before_use: called before each use (FSDP gathers the root unit here, since the backbone
            and output layer are called directly rather than through the model's forward).
    """
    def __init__(self, model, chunk_size: int, before_use: Optional[Callable[[], None]] = None):
        self.model, self.chunk_size, self.before_use = model, chunk_size, before_use

    @contextlib.contextmanager
    def _scope(self):
        if self.before_use is not None:
            self.before_use()
        yield self.model

    def prepare(self, batches, rank_slice, sides):
        self.model.eval()

    def generate(self, sample: Callable, batch: Dict) -> Optional[List[str]]:
        return sample(self.model, batch)


# ----------------------------------------------------------------------------- cached on disk
# precompute_ref_log_probs=true: the reference scores every sequence once; the log-probs are kept
# on disk (reused by any run with the same reference weights and the same tokenised sequences) and
# looked up by a hash of each sequence, so no reference model stays in memory during training.



class ReferenceCacheMiss(RuntimeError):
    """A batch holds a sequence whose reference log-prob was not precomputed."""


class CachedReference(Reference):
    """Per-sequence reference log-probs precomputed by a ModelReference and cached on disk.

    Args:
        live: the model reference that scores the sequences the cache lacks; dropped once the
            cache is ready.
        fingerprint: ref_cache.weights_hash of the reference weights, taken before they were placed.
        ranks: this process among the ranks (each scores its share; rank 0 writes the file).
    """

    def __init__(self, live: ModelReference, fingerprint: str, ranks: Ranks):
        self.live, self.fingerprint, self.ranks = live, fingerprint, ranks
        self.entries, self.publics, self.dtype, self.path = None, None, None, None

    @property
    def model(self):
        return self.live.model if self.live is not None else None

    def prepare(self, batches, rank_slice, sides):
        """Load the log-probs of every training and evaluation sequence from the cache file, or
        compute and save them; then drop the reference model."""
        if self.entries is not None:
            return
        needed, pairs, n_batches = set(), set(), 0
        for batch, _ in batches():
            n_batches += 1
            for side in sides:
                needed.update(ref_cache.sequence_keys(batch, side))
            pairs.update(ref_cache.pair_keys(batch, sides))
        self.path = ref_cache.reference_cache_path(self.fingerprint, needed)
        loaded = ref_cache.load_reference_cache(self.path)
        if loaded is not None and needed.issubset(loaded[0]) and pairs.issubset(loaded[1]):
            rank0_print(f"precompute_ref_log_probs: loaded the reference log-probs of "
                        f"{len(needed)} sequences from {self.path}")
        else:
            rank0_print(f"precompute_ref_log_probs: scoring {len(needed)} sequences with the "
                        "reference model once")
            loaded = self.compute(batches(), n_batches, rank_slice, sides)
            if self.ranks.rank == 0:
                ref_cache.save_reference_cache(self.path, *loaded)
                rank0_print(f"precompute_ref_log_probs: saved them to {self.path}")
            self.ranks.barrier()
        self.entries, self.publics, self.dtype = loaded
        if self.live.model is not None:
            self.live = None  # training never needs the reference model again
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def compute(self, batches, n_batches: int, rank_slice, sides):
        """({sequence key: (sum, mean)}, {pair key: (chosen public, rejected public)}, dtype):
        each sequence scored once, on the same micro-batches (so the same padding) as training
        and evaluation, with LD-DPO's public sums of each pair from the same pass; each rank
        scores its own share, then the shares are merged."""
        self.live.prepare(batches, rank_slice, sides)  # e.g. model.eval()
        entries, publics, dtype = {}, {}, None
        for batch, n_parts in tqdm.tqdm(batches, total=n_batches, desc="Scoring with the reference",
                                        disable=self.ranks.rank != 0):
            for part in range(n_parts):
                micro = rank_slice(batch, part, n_parts)
                pairs = ref_cache.pair_keys(micro, sides)
                need_pairs = self.ranks.any_rank(any(p not in publics for p in pairs))
                shared = packing.shared_tokens(micro) if pairs else None
                found = {}
                for side in sides:
                    keys = ref_cache.sequence_keys(micro, side)
                    need = self.ranks.any_rank(any(k not in entries for k in keys))
                    if not (need or need_pairs):
                        continue
                    layout = packing.plain_layout(micro, side)
                    parts = self.live.layout_logps(micro, layout, False, shared)[side]
                    sums, found[side] = parts.logps, parts.public
                    counts = layout.selections[side].counts.to(sums.dtype)
                    # the same division the average=True path does, so the means are identical
                    means = sums / counts.clamp(min=1)
                    if need:
                        entries.update(zip(keys, zip(sums.tolist(), means.tolist())))
                    dtype = sums.dtype
                if need_pairs:
                    publics.update(zip(pairs, zip(found["chosen"].tolist(), found["rejected"].tolist())))
        return self.ranks.merge(entries), self.ranks.merge(publics), dtype

    # A live reference without a model of its own (the adapter-disabled policy, which costs no
    # memory) stays, and still says how the policy is saved.
    def _saver(self) -> Reference:
        return self.live if self.live is not None else NoReference()

    def checkpoint_states(self):
        return self._saver().checkpoint_states()

    def load_checkpoint_states(self, states):
        self._saver().load_checkpoint_states(states)

    def policy_state(self, state):
        return self._saver().policy_state(state)

    def policy_state_to_load(self, saved, policy):
        return self._saver().policy_state_to_load(saved, policy)

    def plain_policy_state(self, state):
        return self._saver().plain_policy_state(state)

    def write_exports(self, directory, state):
        self._saver().write_exports(directory, state)

    def sequence_logps(self, batch: Dict, side: str, average: bool) -> torch.Tensor:
        try:
            values = [self.entries[key][1 if average else 0] for key in ref_cache.sequence_keys(batch, side)]
        except KeyError:
            raise ReferenceCacheMiss(
                f"precompute_ref_log_probs: a {side} sequence of this batch has no precomputed "
                f"reference log-prob in {self.path}, which covers only the training and "
                "evaluation data this trainer was set up with; score it with the reference model "
                "(precompute_ref_log_probs=false) or rebuild the trainer") from None
        return torch.tensor(values, dtype=self.dtype, device=self.ranks.device)

    def layout_logps(self, batch, layout, average, public_tokens=None):
        """The cached log-probs of the layout's sides, and with public_tokens the pair's cached
        public sums (scored with the same shared lengths: `packing.shared_tokens` of the pair)."""
        out = {}
        for side, selection in layout.selections.items():
            total, public = self.sequence_logps(batch, side, average), None
            if public_tokens is not None:
                public = self._public(batch, side)
                if average:
                    public = public / selection.counts.clamp(min=1).to(public)
            out[side] = logps.SideLogps(total, public)
        return out

    def _public(self, batch: Dict, side: str) -> torch.Tensor:
        index = ("chosen", "rejected").index(side)
        try:
            public = [self.publics[key][index] for key in ref_cache.pair_keys(batch, ("chosen", "rejected"))]
        except KeyError:
            raise ReferenceCacheMiss(
                f"precompute_ref_log_probs: a pair of this batch has no precomputed LD-DPO public "
                f"reference log-prob in {self.path}; rebuild the trainer or use "
                "precompute_ref_log_probs=false") from None
        return torch.tensor(public, dtype=self.dtype, device=self.ranks.device)


# ----------------------------------------------------------------------------- weights of sharded models
# A reference that follows the policy reads and writes parameters that may be FSDP-sharded
# (DTensors): each rank updates its own shard; whole tensors are gathered only to be saved.

def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copy_full_into(param: torch.Tensor, full: torch.Tensor):
    """Write a whole tensor into a parameter, each rank keeping its own shard of it."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            # every rank holds the whole tensor (read from the checkpoint): no communication
            shard = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,
                                      param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)


def mix_into(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], alpha: float):
    """target <- alpha * source + (1 - alpha) * target, pairwise, in place, shard by shard (TRL's
    SyncRefModelCallback._sync_target_model; TR-DPO, Gorbatovski et al. 2024, arXiv 2404.09656,
    eq. 5, where alpha = 1 is the hard update)."""
    with torch.no_grad():
        for t, s in zip(target, source):
            t_local = _local(t)
            t_local.mul_(1.0 - alpha).add_(_local(s).to(t_local.dtype), alpha=alpha)


# ----------------------------------------------------------------------------- TR-DPO

class SyncedReference(ModelReference):
    """A separate reference model that follows the policy (TR-DPO, Gorbatovski et al. 2024,
    arXiv 2404.09656; TRL's sync_ref_model): every `sync_steps` optimizer steps, right after the
    step, reference <- alpha * policy + (1 - alpha) * reference. It is saved with every checkpoint
    as reference.pt (a full state dict, like policy.pt) so a resumed run continues exactly.

    Args:
        model, chunk_size, before_use: as ModelReference (sharded like the policy under FSDP).
        alpha: ref_model_mixup_alpha.
        sync_steps: ref_model_sync_steps.
    """

    def __init__(self, model, chunk_size: int, before_use, alpha: float, sync_steps: int):
        super().__init__(model, chunk_size, before_use)
        self.alpha, self.sync_steps, self.steps = alpha, sync_steps, 0

    def after_step(self, policy):
        self.steps += 1
        if self.steps % self.sync_steps:
            return
        if hasattr(self.model, "reshard"):  # FSDP: drop a gathered copy that would go stale
            self.model.reshard()
        pairs = dict(policy.named_parameters())
        names = [n for n, _ in self.model.named_parameters()]
        mix_into((p for _, p in self.model.named_parameters()), (pairs[n] for n in names),
                 self.alpha)

    def checkpoint_states(self) -> Dict[str, object]:
        return {"reference.pt": parallel.full_model_state(self.model),
                "reference_sync.pt": {"optimizer_steps": self.steps}}

    def load_checkpoint_states(self, states: Dict[str, object]):
        parallel.load_full_model_state(self.model, states["reference.pt"])
        self.steps = states["reference_sync.pt"]["optimizer_steps"]


# ----------------------------------------------------------------------------- LoRA

class AdapterReference(Reference):
    """The policy itself with its LoRA adapter switched off (the base model), or switched to a
    second, frozen adapter (lora.reference_adapter, TRL's "option 3"): no second copy of the
    weights. Only the adapter trains, so only the adapter is saved (policy.pt), with a record of
    the base weights it needs (base_weights.pt: where they came from and their hash), checked on
    resume; the final checkpoint also gets the merged model and a PEFT adapter directory.

    Args:
        policy: the placed policy with peft's LoRA layers inside (lora.apply_lora).
        chunk_size: logps_chunk_size.
        adapter: None (base model) or lora.REFERENCE_ADAPTER.
        base_sources: where the base weights came from (model, archive, merged adapter).
        sync: (alpha, sync_steps) to sync the reference adapter with the policy's (TR-DPO).
    """
    def __init__(self, policy, chunk_size: int, adapter: Optional[str], base_sources: dict,
                 sync: Optional[Tuple[float, int]] = None):
        import lora
        self.lora, self.policy, self.chunk_size, self.adapter = lora, policy, chunk_size, adapter
        self.sync, self.steps = sync, 0
        self.layout = lora.lora_layout(policy)
        self.base_record = {"sources": base_sources,
                            "hash": ref_cache.weights_hash(policy, lambda n: not self._any_adapter(n))}

    @staticmethod
    def _any_adapter(name: str) -> bool:
        return "lora_" in name or ".modules_to_save." in name

    @contextlib.contextmanager
    def _scope(self):
        if hasattr(self.policy, "unshard"):  # FSDP: gather the root unit (a no-op in forward)
            self.policy.unshard()
        training = self.policy.training
        self.policy.eval()  # no adapter dropout in the reference
        try:
            with self.lora.active_adapter(self.policy, self.adapter), router_loss_paused():
                yield self.policy
        finally:
            self.policy.train(training)

    def output_layer(self):
        return logps.output_layer(self.policy)  # never adapted (train.py refuses lm_head)

    def generate(self, sample: Callable, batch: Dict) -> Optional[List[str]]:
        with self.lora.active_adapter(self.policy, self.adapter), router_loss_paused():
            return sample(self.policy, batch)

    def _reference_params(self):
        return [(n, p) for n, p in self.policy.named_parameters()
                if self.lora.is_adapter_key(n, self.lora.REFERENCE_ADAPTER)]

    def after_step(self, policy):
        self.steps += 1
        if self.sync is None or self.steps % self.sync[1]:
            return
        params = dict(policy.named_parameters())
        ref = self._reference_params()
        source = (params[n.replace(f".{self.lora.REFERENCE_ADAPTER}.", f".{self.lora.POLICY_ADAPTER}.")]
                  for n, _ in ref)
        mix_into((p for _, p in ref), source, self.sync[0])

    def checkpoint_states(self) -> Dict[str, object]:
        states = {"base_weights.pt": self.base_record}
        if self.sync is not None:
            states["reference.pt"] = {n: parallel.full_tensor(p) for n, p in self._reference_params()}
            states["reference_sync.pt"] = {"optimizer_steps": self.steps}
        return states

    def load_checkpoint_states(self, states: Dict[str, object]):
        saved = states.get("base_weights.pt")
        if saved is not None and saved["hash"] != self.base_record["hash"]:
            raise ConfigError(
                f"the checkpoint's adapter was trained on other base weights ({saved['sources']}, "
                f"hash {saved['hash'][:12]}) than this run has ({self.base_record['sources']}, hash "
                f"{self.base_record['hash'][:12]}); set model.name_or_path, model.archive and "
                "lora.merge_archive as that run did")
        if self.sync is not None:
            params = dict(self.policy.named_parameters())
            for name, tensor in states["reference.pt"].items():
                _copy_full_into(params[name], tensor)
            self.steps = states["reference_sync.pt"]["optimizer_steps"]

    def policy_state(self, state):
        return {k: v for k, v in state.items() if self.lora.is_policy_adapter_key(k)}

    def policy_state_to_load(self, saved, policy):
        full = {k: parallel.full_tensor(v) for k, v in policy.state_dict().items()}
        full.update(saved)
        return full

    def plain_policy_state(self, state):
        return self.lora.merged_state(state, self.layout)

    def write_exports(self, directory: Path, state):
        self.lora.write_peft_adapter(Path(directory) / "adapter", state, self.policy,
                                     self.base_record["sources"].get("model"))


# ----------------------------------------------------------------------------- the factory

def build_reference(policy, model, place: Callable, chunk_size: int,
                    precompute: bool, fingerprint: Optional[str], ranks: Ranks,
                    sync: Optional[Tuple[float, int]], base_sources: dict) -> Reference:
    """The reference kind for this run; the trainer never asks which one it got.

    Args:
        policy: the placed policy.
        model: the frozen reference model (unplaced), or None (reference-free loss, or LoRA).
        place: model -> (placed model, hook run before each use) (the trainer's placement).
        chunk_size: logps_chunk_size.
        precompute: precompute_ref_log_probs.
        fingerprint: ref_cache.weights_hash of `model` before placing (precompute only).
        ranks: this process among the ranks.
        sync: (ref_model_mixup_alpha, ref_model_sync_steps) when sync_ref_model, else None.
        base_sources: where the policy's base weights came from (recorded with a LoRA adapter).
    """
    if getattr(policy, "peft_config", None) is not None:  # a LoRA policy: see lora.py
        import lora
        has_second = any(lora.is_adapter_key(n, lora.REFERENCE_ADAPTER)
                         for n, _ in policy.named_parameters())
        live = AdapterReference(policy, chunk_size, lora.REFERENCE_ADAPTER if has_second else None,
                                base_sources, sync)
        if precompute:
            def keep(n):
                return not lora.is_policy_adapter_key(n)  # base + reference adapter
            return CachedReference(live, ref_cache.weights_hash(policy, keep), ranks)
        return live
    if model is None:
        return NoReference()
    placed, before_use = place(model)
    if sync is not None:
        return SyncedReference(placed, chunk_size, before_use, *sync)
    live = ModelReference(placed, chunk_size, before_use)
    if precompute:
        return CachedReference(live, fingerprint, ranks)
    return live
