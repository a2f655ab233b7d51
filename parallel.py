"""Running on several devices: process groups, FSDP2 wrapping, tensor-parallel plans, and the
collective calls other modules need (through one small `Ranks` object, so that references.py and
checkpoints.py never need a trainer).

FSDP shards with PyTorch's FSDP2 (`fully_shard`); tensor parallelism splits the block projections
with PyTorch's native tensor parallelism (DeviceMesh + `parallelize_module`). Both run one process
per device under torchrun (train.py also spawns them itself over several local GPUs) and as a
single process with a one-rank process group.
"""
import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               parallelize_module)

from utils import ConfigError, all_gather_cat, broadcast_object, call


# ----------------------------------------------------------------------------- ranks

@dataclass
class Ranks:
    """This process's place among the ranks, and the collectives that code outside the trainer
    (the reference cache, checkpoints) needs. One process without a process group is rank 0 of 1.

    Attributes:
        rank, world_size: of the whole process group.
        splits_batch: whether the ranks split each batch between them (data parallelism); tensor
            parallelism does not: every rank sees the whole batch.
        device: where this rank's tensors live.
        tensor_parallel_size: under FSDP x TP, the consecutive ranks that split each layer and
            so see the same micro-batch (1: none).
        data_parallel_group: the process group of the ranks that split the batch when that is
            not all of them (FSDP x TP: this rank's place in every tensor-parallel group), or None.
    """
    rank: int
    world_size: int
    splits_batch: bool
    device: torch.device
    tensor_parallel_size: int = 1
    data_parallel_group: Optional[dist.ProcessGroup] = None

    @property
    def data_parallel_size(self) -> int:
        """Processes that split each batch between them."""
        return self.world_size // self.tensor_parallel_size if self.splits_batch else 1

    @property
    def data_rank(self) -> int:
        # tensor-parallel groups are consecutive ranks (the fastest-varying mesh dimension)
        return self.rank // self.tensor_parallel_size if self.splits_batch else 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized() and self.world_size > 1

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor over the data-parallel ranks."""
        if self.data_parallel_size == 1:
            return values
        return all_gather_cat(values, self.data_parallel_group)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any: ranks must run the same forwards."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_objects(self, value) -> list:
        """Every rank's picklable `value`, in rank order ([value] in one process)."""
        if not self.distributed:
            return [value]
        parts = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def merge(self, entries: dict) -> dict:
        """The union of every rank's dict (later ranks win on equal keys)."""
        merged = {}
        for part in self.gather_objects(entries):
            merged.update(part)
        return merged


def rank0_value(compute: Callable, *args):
    """compute(*args) run on rank 0 alone and its (picklable) value given to every rank, e.g. a
    hash of weights that only rank 0 holds; one process: compute(*args). Collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return compute(*args)
    return broadcast_object(compute(*args) if dist.get_rank() == 0 else None)


# ----------------------------------------------------------------------------- devices

def ensure_process_group():
    """A single process (e.g. `python train.py trainer=FSDPTrainer` on one device) still needs a
    process group for the mesh; an in-memory store needs no port."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def local_device() -> torch.device:
    # utils.init_distributed has already selected this rank's GPU.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def find_blocks(model, block_name: str) -> List[torch.nn.Module]:
    # By class name, including base classes: FSDP2 swaps a sharded module's class for a subclass.
    blocks = [m for m in model.modules()
              if any(c.__name__ == block_name for c in type(m).__mro__)]
    if not blocks:
        classes = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__
                          or "Block" in type(m).__name__})
        raise ConfigError(f"model.block_name={block_name}: {type(model).__name__} has no module of "
                          f"that class; candidates: {', '.join(classes) or 'none'}")
    return blocks


def enable_activation_checkpointing(model):
    """Recompute each block in backward. Transformers checkpoints exactly its decoder layers (the
    blocks); the non-reentrant variant is the one that composes with FSDP2's and DTensor's hooks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def dispatch_across_gpus(model):
    """Split a model's layers evenly across the visible GPUs (the DPO repository's naive model
    parallelism, through accelerate's device map)."""
    try:
        import accelerate
    except ImportError:
        raise ConfigError("BasicTrainer on several GPUs splits the layers with accelerate: "
                          "pip install accelerate, or use trainer=FSDPTrainer")
    device_map = accelerate.infer_auto_device_map(
        model, max_memory=accelerate.utils.get_balanced_memory(model),
        no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    return accelerate.dispatch_model(model, device_map=device_map)


def clip_grad_norm_mixed(parameters, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters that may be DTensors on different meshes or
    placements mixed with plain tensors (which clip_grad_norm_ refuses to combine).

    Squared norms are summed per group of identical layout: a sharded group's local sums are added
    over its mesh, a replicated group (or plain tensors, identical on every rank) counts once. The
    clip coefficient is clip_grad_norm_'s."""
    groups = defaultdict(list)
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            groups[(g.device_mesh, tuple(g.placements))].append(g.to_local())
        else:
            groups[None].append(g)
    total = None
    for key, grads in groups.items():
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        sq = norms.square().sum()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                # FSDP over a tensor-parallel split shards it strided (_StridedShard): still
                # disjoint pieces, whose squares add up over the mesh dimension
                if placement.is_shard() or isinstance(placement, _StridedShard):
                    dist.all_reduce(sq, group=mesh.get_group(dim))
                elif not placement.is_replicate():
                    raise RuntimeError(f"cannot clip gradients with placement {placement}")
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        return 0.0
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for grads in groups.values():
            for g in grads:  # a DTensor's local tensor: scaling it scales the DTensor
                g.mul_(coef.to(g.device))
    return norm.item()


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- FSDP

def fsdp_mixed_precision(param_dtype: Optional[torch.dtype]) -> dict:
    """MixedPrecisionPolicy arguments for mixed precision in `param_dtype` (None: none): compute
    in it, reduce gradients in float32 and keep float32 sharded parameters for the optimizer (the
    FSDP2 tutorial's recipe, docs.pytorch.org/tutorials/intermediate/FSDP_tutorial.html)."""
    if param_dtype is None:
        return {}
    return dict(param_dtype=param_dtype, reduce_dtype=torch.float32)


def fsdp_shard(model, mesh, block_name: str, mixed_precision: dict, from_rank0: bool = False,
               tp_mesh=None):
    """fully_shard each block, then the root; registers `run_in_forward` on the root. With
    `tp_mesh`, each block is first split over it (FSDP x TP, as torchtitan composes them:
    tensor_parallelize, then fully_shard over the data-parallel dimension).

    Args:
        model: the whole model; with from_rank0, only rank 0's needs weights (the other ranks may
            pass one built on the meta device, as train.build_models does under FSDP).
        mesh: the device mesh FSDP shards over: all ranks; HSDP's (replicate, shard) mesh; or
            under FSDP x TP the "dp" dimension of a ("dp", "tp") mesh.
        block_name: the class name of the blocks that become FSDP units.
        mixed_precision: MixedPrecisionPolicy arguments (fsdp_mixed_precision).
        from_rank0: every rank takes its shards of rank 0's weights (collective).
        tp_mesh: the "tp" dimension of that mesh, or None (no tensor parallelism).

    Returns:
        The same model object, sharded.
    """
    # rank 0's whole tensors, referenced (not copied) until every rank has its shards of them
    full = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}
    if tp_mesh is not None:
        tensor_parallelize(model, tp_mesh, block_name, f"tensor_parallel_size={tp_mesh.size()}",
                           from_rank0)
    for block in find_blocks(model, block_name):
        fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(**mixed_precision))
    # The root's inputs are token ids, or (run_in_forward) a batch whose float tensors, if any,
    # must keep their precision; the blocks cast their own inputs.
    fully_shard(model, mesh=mesh,
                mp_policy=MixedPrecisionPolicy(**mixed_precision, cast_forward_inputs=False))
    if from_rank0:
        load_from_rank0(model, full)
        del full
    model.run_in_forward = call  # run_in_forward(fn, *args) -> fn(*args), inside FSDP's forward hooks
    register_fsdp_forward_method(model, "run_in_forward")
    # FSDP picks its root as the first unit to run forward; run the root once now so that a later
    # direct call of the backbone or a block cannot claim that role.
    with torch.no_grad():
        model.run_in_forward(lambda: None)
    model.reshard()
    return model


@contextlib.contextmanager
def gathered_for_generation(model, enabled: bool = True):
    """Each FSDP unit of `model` gathered once for a whole generation, not once per decoding step:
    FSDP otherwise all-gathers every block before each token's forward and frees it after, which
    for sampling costs more than the forwards (TRL gathers likewise for generation under ZeRO-3,
    its `ds3_gather_for_generation`). Yields whether the weights are gathered: then no forward
    communicates, so ranks may stop generating at different steps (no synced_gpus). Each rank
    holds the whole model meanwhile; enabled=False keeps the per-step gathers for a model too
    large for that. Either way what generation gathered is freed at the end (with per-step
    gathers, the root unit, which FSDP keeps after forward); the blocks reshard after forward
    again, the root never does."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield False
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else [model]
    if enabled:
        model.set_reshard_after_forward(False)
        for unit in units:
            unit.unshard()
    try:
        yield enabled
    finally:
        for unit in units:
            unit.reshard()
        if enabled:
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)  # the root, as FSDP sets it


def load_from_rank0(model, full_state: Dict[str, torch.Tensor]):
    """Give every rank its shards of rank 0's weights, and rank 0's buffers, after fully_shard.
    A rank whose model was built on the meta device first gets (uninitialised) storage for its
    shards and buffers, so no rank but 0 ever holds the whole model (FSDP2's meta-device
    initialisation, docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).
    Collective: every rank calls it.

    Args:
        model: a model sharded with fully_shard.
        full_state: rank 0's whole state dict, taken before sharding; {} on the other ranks.
    """
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=local_device())
    load_full_model_state(model, full_state)
    # Non-persistent buffers (rotary inv_freq tables) are in no state dict; on a meta-built rank
    # they are empty memory now, so they come from rank 0 too.
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in persistent:
                dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------- full state dicts

# Full state dicts gathered to rank 0 on the CPU (the other ranks take part and get {}).
FULL_STATE_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)

# Rank 0 alone reads the full state from disk and sends each rank its shard, so a node holds one
# copy of a checkpoint in memory, not one per process (the other ranks pass {}).
FULL_STATE_LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def is_sharded(model) -> bool:
    """Whether any parameter is a DTensor (FSDP or tensor parallelism)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (collective for a DTensor: every rank must call)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def full_model_state(model) -> Dict[str, torch.Tensor]:
    """The whole state dict of a model on the CPU; of a sharded (FSDP or tensor-parallel) one on
    rank 0, in the plain model's layout (fused tensor-parallel columns put back in order), and
    {} on other ranks."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = get_model_state_dict(model, options=FULL_STATE_SAVE)
    return {k: unfuse_columns(model, k, v) for k, v in state.items()}


def load_full_model_state(model, state: Dict[str, torch.Tensor]):
    """Load a plain model's full state dict into `model`; into a sharded model from rank 0
    (other ranks may pass {}), each rank keeping its shard."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    state = {k: fuse_columns(model, k, v) for k, v in state.items()}
    set_model_state_dict(model, state, options=FULL_STATE_LOAD)


def full_optimizer_state(model, optimizer) -> dict:
    """A sharded model's optimizer state, whole, keyed by parameter index as a plain
    optimizer.state_dict() is (so checkpoints resume across trainers); {} on ranks other than 0."""
    state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE_SAVE)
    if not state:
        return state
    state["state"] = {name: {k: unfuse_columns(model, name, v) for k, v in s.items()}
                      for name, s in state["state"].items()}
    return optimizer_state_by_index(model, state)


def load_full_optimizer_state(model, optimizer, state: dict):
    """Load full_optimizer_state's form, given on rank 0 (other ranks may pass {})."""
    if state:
        state = optimizer_state_by_name(model, state)
        state["state"] = {name: {k: fuse_columns(model, name, v) for k, v in s.items()}
                          for name, s in state["state"].items()}
    set_optimizer_state_dict(model, optimizer, state, options=FULL_STATE_LOAD)


# ----------------------------------------------------------------------------- sharded state dicts
# checkpoint_format=sharded: each rank saves and loads only its own shards
# (torch.distributed.checkpoint; see checkpoints.save_sharded).

def sharded_states(model, optimizer) -> dict:
    """{"policy": model state dict, "optimizer": optimizer state dict}, each rank's shards (plain
    tensors for a plain model), keyed by parameter name; the form checkpoints.save_sharded
    writes and checkpoints.load_sharded fills."""
    return {"policy": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded_states(model, optimizer, states: dict):
    """Put a sharded_states() dict, filled by checkpoints.load_sharded, into model and optimizer."""
    set_model_state_dict(model, states["policy"])
    set_optimizer_state_dict(model, optimizer, states["optimizer"])


def optimizer_state_by_index(model, state: dict) -> dict:
    """A name-keyed optimizer state (torch.distributed.checkpoint's full form) keyed by parameter
    index instead, as a plain optimizer.state_dict() is, so checkpoints resume across trainers."""
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {"state": {index[name]: v for name, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]])
                             for g in state["param_groups"]]}


def optimizer_state_by_name(model, state: dict) -> dict:
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                             for g in state["param_groups"]]}


# ----------------------------------------------------------------------------- tensor parallelism

# Which projections of a block are split how. Llama and GPT-NeoX (and most decoder models) carry
# their plan in transformers' config.base_model_tp_plan ("layers.*.self_attn.q_proj": "colwise",
# ...); GPT-2 has none (its projections are transformers' Conv1D, weights stored in x out, and its
# query/key/value projection is fused), so it gets its own.
GPT2_BLOCK_PLAN = {"attn.c_attn": "colwise_qkv", "attn.c_proj": "rowwise",
                   "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}


# Who asked for tensor parallelism, as the messages name it.
TP_TRAINER = "trainer=TensorParallelTrainer"


def block_tp_plan(cfg, setting: str = TP_TRAINER) -> Dict[str, str]:
    """{path inside a block: 'colwise' | 'rowwise' | 'colwise_qkv'} for a model of transformers
    config `cfg`; ConfigError naming `setting` where the model has none."""
    if cfg.model_type == "gpt2":
        return dict(GPT2_BLOCK_PLAN)
    plan = getattr(cfg, "base_model_tp_plan", None) or {}
    block_plan = {}
    for path, kind in plan.items():
        if "*." not in path:
            continue  # not inside a block (embeddings, norms); those stay replicated
        if kind not in ("colwise", "rowwise"):
            raise ConfigError(f"{setting}: {cfg.model_type}'s tensor-parallel "
                              f"plan shards {path} as {kind!r}; only colwise/rowwise are supported")
        block_plan[path.split("*.", 1)[1]] = kind
    if not block_plan:
        fix = "use trainer=FSDPTrainer" if setting == TP_TRAINER else "set tensor_parallel_size=1"
        raise ConfigError(f"{setting} has no tensor-parallel plan for "
                          f"model_type={cfg.model_type} (supported: llama, gpt_neox, gpt2 and "
                          f"models whose transformers config has a base_model_tp_plan); {fix}")
    return block_plan


def check_tensor_parallel(cfg, tp: int, setting: str = TP_TRAINER) -> Dict[str, str]:
    """block_tp_plan(cfg), after checking that the attention heads split over `tp` ranks. Takes
    the transformers config only, so train.py can refuse a model before loading its weights."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ConfigError(f"{setting}: {heads} attention heads ({kv_heads} key/value heads) "
                          f"cannot be split over {tp} processes")
    return block_tp_plan(cfg, setting)


def tensor_parallelize(model, mesh, block_name: str, setting: str = TP_TRAINER,
                       from_rank0: bool = False):
    """Split each block's projections over `mesh` (after Megatron-LM: query/key/value, gate/up and
    fc column-wise, the output projections row-wise, so each block needs one all-reduce in
    attention and one in the MLP; docs.pytorch.org/tutorials/intermediate/TP_tutorial.html).

    Args:
        setting: what asked for it, as errors name it.
        from_rank0: only split, with no communication: the other ranks' models may be on the
            meta device, and the caller gives every rank rank 0's weights afterwards
            (fsdp_shard, load_from_rank0). Otherwise the split parameters are scattered from
            rank 0 and the rest broadcast from it.
    """
    tp = mesh.size()
    plan = check_tensor_parallel(model.config, tp, setting)
    for block in find_blocks(model, block_name):
        styles = {}
        for path, kind in plan.items():
            module = block.get_submodule(path)
            # The split dimension: output features column-wise, input features row-wise
            # (nn.Linear stores its weight out x in, Conv1D in x out).
            out_dim = 1 if type(module).__name__ == "Conv1D" else 0
            size = module.weight.shape[1 - out_dim if kind == "rowwise" else out_dim]
            if size % tp:
                raise ConfigError(f"{setting}: {path} has {size} features, "
                                  f"not divisible by {tp} processes")
            styles[path] = tp_style(module, kind)
        parallelize_module(block, mesh, styles, src_data_rank=None if from_rank0 else 0)
        if model.config.model_type == "gpt2":
            # GPT-2 splits the fused projection's output at split_size; each rank now holds its
            # own heads' query/key/value, each split_size / tp wide.
            block.attn.split_size //= tp
    if from_rank0:
        return model
    # The split parameters were scattered from rank 0; the replicated ones must be identical too.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=0)
    return model


def tp_style(module, kind: str) -> ParallelStyle:
    if type(module).__name__ == "Conv1D":
        return Conv1DParallel(kind)
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    raise ConfigError(f"tensor-parallel style {kind!r} needs a Conv1D module")


class Conv1DParallel(ParallelStyle):
    """Column- or row-wise split of transformers' Conv1D (y = x @ W + b with W stored in x out),
    which torch's ColwiseParallel / RowwiseParallel do not accept (nn.Linear and nn.Embedding
    only). 'colwise_qkv' splits a fused [query | key | value] output so that each rank gets its
    own heads of all three: the columns are reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] before
    an ordinary Shard; the reordering is undone in full state dicts (unfuse_columns)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def _apply(self, module, device_mesh):
        tp = device_mesh.size()
        rowwise = self.kind == "rowwise"

        def partition(name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                data = param.data
                if rowwise:
                    placement = Shard(0) if pname == "weight" else Replicate()
                else:
                    dim = 1 if pname == "weight" else 0
                    placement = Shard(dim)
                    if self.kind == "colwise_qkv":
                        order = fused_column_order(data.shape[dim], 3, tp)
                        data = data.index_select(dim, order)
                        mod._tp_fused_columns = (3, tp)
                dt = distribute_tensor(data, mesh, [placement], src_data_rank=self.src_data_rank)
                mod.register_parameter(pname, torch.nn.Parameter(
                    dt, requires_grad=param.requires_grad))

        def prepare_input(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Shard(-1) if rowwise else Replicate()],
                                       run_check=False)
            return x

        def prepare_output(mod, output, mesh):
            want = Replicate() if rowwise else Shard(output.ndim - 1)
            if tuple(output.placements) != (want,):
                output = output.redistribute(placements=[want])
            return output.to_local()

        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


def fused_column_order(width: int, parts: int, tp: int) -> torch.Tensor:
    """Column order [part 0 of rank 0, part 1 of rank 0, ..., part 0 of rank 1, ...] for a width
    made of `parts` equal parts, each split over `tp` ranks."""
    return torch.arange(width).view(parts, tp, width // (parts * tp)).transpose(0, 1).reshape(-1)


def _fused_module(model, name: str):
    module_name, _, pname = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None, None
    fused = getattr(module, "_tp_fused_columns", None)
    return (fused, (1 if pname == "weight" else 0)) if fused else (None, None)


def unfuse_columns(model, name: str, tensor):
    """The plain model's layout of a full tensor (state or optimizer state) of parameter `name`."""
    fused, dim = _fused_module(model, name)
    if fused is None or not torch.is_tensor(tensor) or tensor.ndim <= dim:
        return tensor
    order = fused_column_order(tensor.shape[dim], *fused)
    return tensor.index_select(dim, torch.argsort(order))


def fuse_columns(model, name: str, tensor):
    fused, dim = _fused_module(model, name)
    if fused is None or not torch.is_tensor(tensor) or tensor.ndim <= dim:
        return tensor
    return tensor.index_select(dim, fused_column_order(tensor.shape[dim], *fused))
