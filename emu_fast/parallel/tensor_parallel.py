"""Tensor parallelism over a torch.distributed group: every rank holds a share of every layer and
reads only that share each step, so N ranks read 1/N of the weights each (a pipeline split, by
contrast, runs its devices one after another).

The cut (Megatron's, as gpt-fast's tp.py makes it): q/k/v and gate/up by output rows (whole heads
and whole KV heads per rank, GQA groups kept together; its slice of the MLP), o and down by input
columns (the matching slices), so each rank's o and down give a partial sum of the whole output,
which the C++ decoder sums over the group with two all-reduces a layer (torch.distributed's
functional all-reduce: gloo on the CPU, NCCL on CUDA). Embeddings, norms, the regression head and
project_up are replicated. Quantized projections cut the same way: int8 rows with their scales,
int4 only where its groups do not straddle a shard (the scheme says: QuantScheme.shard_check).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..layer_weights import LayerWeights


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel group as the decoder uses it: the group, this process's rank in it, its
    size, its backend per device type, and its name (what the C++ all-reduce looks it up by)."""

    group: object
    rank: int
    size: int
    backends: dict
    name: str

    def check_device(self, device: torch.device, who: str) -> None:
        """The group's backend must serve tensors on `device` (gloo: CPU, NCCL: CUDA)."""
        kind = torch.device(device).type
        if kind not in self.backends:
            have = ", ".join(f"{b} ({d})" for d, b in self.backends.items())
            raise ValueError(f"emu_fast.{who}: the tensor-parallel group's backend serves {have}, but the model is on "
                             f"{kind}: use a gloo group for a model on the CPU, an NCCL group for one on CUDA")

    def collective_device(self, device) -> torch.device:
        """Where small tensors for this group's own collectives go: the CPU with gloo, else the
        model's own GPU (`device`, the decoder's), whatever the calling thread's current one."""
        if "cpu" in self.backends:
            return torch.device("cpu")
        return torch.device(device)


# What each backend moves tensors of (a group made without naming a backend lists its own:
# "cpu:gloo,cuda:nccl").
_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu", "cuda")}


def resolve_group(group, who: str) -> Optional[TensorParallel]:
    """None for no tensor parallelism; a torch.distributed ProcessGroup this process belongs to,
    checked, as a TensorParallel; anything else a clear error."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"emu_fast.{who}: tensor_parallel needs torch.distributed, which this PyTorch lacks")
    if not isinstance(group, dist.ProcessGroup) and group == dist.GroupMember.NON_GROUP_MEMBER:  # new_group's
        raise ValueError(f"emu_fast.{who}: this process (global rank {dist.get_rank()}) is not a member of the "
                         f"tensor_parallel group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"emu_fast.{who}: tensor_parallel must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD after init_process_group), got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"emu_fast.{who}: torch.distributed is not initialized; call "
                           f"torch.distributed.init_process_group first (torchrun sets up its environment)")
    backend = str(dist.get_backend(group))
    backends = {}
    for part in backend.split(","):
        if ":" in part:
            device, name = part.split(":", 1)
            backends[device] = name
        else:
            backends.update({device: part for device in _BACKEND_DEVICES.get(part, ())})
    if not backends:
        raise ValueError(f"emu_fast.{who}: the tensor_parallel group's backend {backend!r} is not one emu_fast "
                         f"knows (gloo, nccl)")
    return TensorParallel(group, dist.get_rank(group), dist.get_world_size(group), backends, group.group_name)


def check_shardable(tp: TensorParallel, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                    scheme, group_size: Optional[int], who: str) -> None:
    """Whole heads, whole KV heads and an even slice of the MLP per rank; for a quantized model,
    column shards the scheme can cut (int4: no group across two ranks)."""
    n = tp.size

    def fits(d):  # whole heads, whole KV heads, an even MLP slice and, quantized, whole groups
        return (heads % d == 0 and kv_heads % d == 0 and intermediate % d == 0 and
                (scheme is None or all(scheme.shard_check(k // d, group_size) is None
                                       for k in (heads * head_dim, intermediate))))

    if heads % n or kv_heads % n or intermediate % n:
        splits = [d for d in range(2, kv_heads + 1) if fits(d)]
        raise ValueError(f"emu_fast.{who}: {heads} attention heads, {kv_heads} KV heads and {intermediate} MLP "
                         f"channels do not split over {n} tensor-parallel ranks (each rank takes whole heads); "
                         f"this model splits over {', '.join(map(str, splits)) or 'no group size'}")
    if scheme is not None:
        for name, inputs in (("o_proj", heads * head_dim // n), ("down_proj", intermediate // n)):
            why = scheme.shard_check(inputs, group_size)
            if why is not None:
                raise ValueError(f"emu_fast.{who}: {name} cannot be cut over {n} ranks: {why}; pick a group_size "
                                 f"that divides {inputs}")


def check_model_shardable(tp: Optional[TensorParallel], config, quant, who: str) -> None:
    """check_shardable on a Hugging Face LLaMA config and the scheme prepare_quantization gives
    ((name, group_size) or None), before anything is quantized or packed."""
    if tp is None:
        return
    from ..config import LlamaShape
    from ..quant.schemes import REGISTRY

    shape = LlamaShape.from_hf(config)
    scheme = None if quant is None else REGISTRY[quant[0]]
    check_shardable(tp, shape.heads, shape.kv_heads, shape.head_dim, config.intermediate_size, scheme,
                    None if quant is None else quant[1], who)


def _rows(t: Optional[torch.Tensor], blocks: Sequence[int], rank: int, n: int) -> Optional[torch.Tensor]:
    """Rank's share of each block of rows (t's rows are the blocks stacked), stacked again."""
    if t is None:
        return None
    parts, row = [], 0
    for size in blocks:
        share = size // n
        parts.append(t[row + rank * share : row + (rank + 1) * share])
        row += size
    return torch.cat(parts).contiguous()


def shard_layer(w: LayerWeights, tp: TensorParallel, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                scheme=None, group_size: Optional[int] = None) -> LayerWeights:
    """This rank's share of one layer (a copy of its slices; the norms are shared as they are)."""
    n, r = tp.size, tp.rank
    qkv_blocks = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    mlp_blocks = (intermediate, intermediate)
    q_in, i_in = heads * head_dim // n, intermediate // n

    def columns(weight, scales, share):
        k0, k1 = r * share, (r + 1) * share
        if scheme is None:
            return weight[:, k0:k1].contiguous(), None
        q, s = scheme.input_columns(weight, scales, k0, k1, group_size)
        return q.contiguous(), s.contiguous()

    o, o_scales = columns(w.o, w.o_scales, q_in)
    down, down_scales = columns(w.down, w.down_scales, i_in)
    return LayerWeights(input_norm=w.input_norm, post_norm=w.post_norm,
                        qkv=_rows(w.qkv, qkv_blocks, r, n), qkv_scales=_rows(w.qkv_scales, qkv_blocks, r, n),
                        gate_up=_rows(w.gate_up, mlp_blocks, r, n),
                        gate_up_scales=_rows(w.gate_up_scales, mlp_blocks, r, n),
                        o=o, o_scales=o_scales, down=down, down_scales=down_scales)


def shard_layers(layers: List[List[torch.Tensor]], tp: TensorParallel, heads: int, kv_heads: int, head_dim: int,
                 scheme=None, group_size: Optional[int] = None, who: str = "EmuDecoder") -> List[List[torch.Tensor]]:
    """Every layer of the binding's lists (pack_layers') as this rank's share, checked first."""
    intermediate = layers[0][4].shape[0] // 2
    check_shardable(tp, heads, kv_heads, head_dim, intermediate, scheme, group_size, who)
    out = []
    for parts in layers:
        out.append(shard_layer(LayerWeights.from_list(parts), tp, heads, kv_heads, head_dim, intermediate, scheme,
                               group_size).as_list())
    return out


def _digest(tensors: Sequence[torch.Tensor], extra: Sequence) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(extra)).encode())
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def check_same_inputs(tp: TensorParallel, who: str, tensors: Sequence[torch.Tensor], extra: Sequence = (),
                      device=None) -> None:
    """Every rank must run the same request (its share of the same computation): a digest of the
    inputs gathered from every rank; ValueError on every rank when they differ, before any of them
    runs it (a rank that runs other prompts would get another rank's partial sums)."""
    import torch.distributed as dist

    mine = torch.tensor([_digest(tensors, extra)], dtype=torch.int64, device=tp.collective_device(device))
    gathered = [torch.empty_like(mine) for _ in range(tp.size)]
    try:
        dist.all_gather(gathered, mine, group=tp.group)
    except RuntimeError as e:
        raise RuntimeError(f"emu_fast.{who}: the tensor-parallel ranks could not compare their inputs (a rank may "
                           f"have died or hung past the group's timeout): {e}") from e
    digests = [int(g.item()) for g in gathered]
    if len(set(digests)) > 1:
        differ = [i for i, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"emu_fast.{who}: the tensor-parallel ranks were called with different inputs or run "
                         f"differently set decoders (ranks {differ} differ from rank 0); every rank must make the "
                         f"same call with the same prompts on a decoder made the same way")
