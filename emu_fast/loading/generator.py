"""EmuGenerator and from_pretrained: an Emu checkpoint read a tensor at a time (emu_fast.loading
.checkpoint), placed into the decoder's tensors (emu_fast.loading.slots), and the ready decoder
with the embedding table, the tokenizer and n."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import LlamaShape
from ..decoder import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN, EmuDecoder, _check_kernels, _check_limit
from ..dropin.families import DEFAULT_PLACEHOLDER, check_tokenizer, family_named
from ..dropin.packing import _release_freed_host_memory
from ..dropin.prompts import check_request, embed_prompts, image_placeholder
from ..quant.apply import resolve_device
from ..quant.io import FORMAT as QUANTIZED_FORMAT
from ..quant.io import VERSION as QUANTIZED_VERSION
from ..quant.schemes import GROUPED, REGISTRY, check_group_size, scheme_named
from ..parallel import check_shardable, resolve_group
from ..rope import theta_rope_tables
from .checkpoint import NORMS, PROJECTIONS, Checkpoint, PathLike, _canonical, _fail, _Reader, read_checkpoint
from .slots import Slots, check_shape, nbytes, place, shape_of


class EmuGenerator:
    """Text (and prompt-image vectors) to image embeddings: an EmuDecoder with the embedding
    table, the tokenizer and n, as emu_fast.from_pretrained builds it. generate_image(texts)
    returns what the model's own generate_image returns for those prompts, [B, n, D]."""

    def __init__(self, decoder: EmuDecoder, embed_tokens: torch.Tensor, tokenizer, n: int, family: str,
                 config: dict, scheme: Optional[str], group_size: Optional[int], tensors: Dict[str, object]):
        self.decoder, self.embed_tokens, self.tokenizer, self.n = decoder, embed_tokens, tokenizer, n
        self.family, self.config, self.weights, self.group_size = family, config, scheme, group_size
        self._tensors = tensors  # what the decoder reads (it borrows, never copies), kept for save_quantized

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @torch.no_grad()
    def generate_image(self, texts, prompt_image_embeds: Optional[torch.Tensor] = None,
                       placeholder: str = DEFAULT_PLACEHOLDER) -> torch.Tensor:
        """[B, n, D] for the prompts. Prompt images come as their `<image>`-slot vectors
        [images * n, hidden] (the vision tower is not loaded: encode them with it, then
        project_up for Emu2), filling the placeholders' slots in row-major order. While an
        emu_fast.Engine serves this generator, the call is one of its requests."""
        embeds, mask = self.prompt_inputs(texts, prompt_image_embeds, placeholder)
        from ..serving.engine import through_engine

        served = through_engine(self, embeds, mask)
        return served if served is not None else self.decoder.generate(embeds, mask, self.n)

    def prompt_inputs(self, texts, prompt_image_embeds: Optional[torch.Tensor] = None,
                      placeholder: str = DEFAULT_PLACEHOLDER):
        """The prompts as the decoder takes them: (inputs_embeds on its input device, attention_mask)."""
        texts = check_request(texts, placeholder)
        if self.tokenizer is None:
            raise ValueError("emu_fast: this generator has no tokenizer (none beside the checkpoint); pass "
                             "tokenizer= to emu_fast.from_pretrained")
        if prompt_image_embeds is not None and not isinstance(prompt_image_embeds, torch.Tensor):
            raise TypeError("emu_fast: prompt_image_embeds must be a tensor [images * n, hidden]")
        embeds, mask = embed_prompts(self.tokenizer, self.embed_tokens, texts, image_placeholder(self.n), placeholder,
                                     prompt_image_embeds)
        return embeds.to(self.decoder.input_device), mask

    def memory_summary(self) -> dict:
        """The decoder's memory_summary plus the embedding table's bytes."""
        summary = self.decoder.memory_summary()
        summary["embed_tokens"] = self.embed_tokens.numel() * self.embed_tokens.element_size()
        return summary

    def save_quantized(self, path: PathLike) -> None:
        """Write this generator's quantized weights (and its head, feedback projection, config, n
        and family) to one safetensors file that from_pretrained loads as it is."""
        from safetensors.torch import save_file

        if self.weights is None:
            raise ValueError("emu_fast: this generator's weights are not quantized (from_pretrained(weights=...))")
        if self.decoder.tensor_parallel is not None:
            raise ValueError("emu_fast: a tensor-parallel generator holds one rank's share of the weights; save the "
                             "quantized model from a generator loaded in one process")
        t = self._tensors
        out = {"model.embed_tokens.weight": t["embed"], "model.norm.weight": t["norm"],
               "project_down.weight": t["head"]}
        if t.get("up") is not None:
            out["project_up.weight"] = t["up"]
        s = t["slots"]
        for i, layer in enumerate(s.layers):
            for norm in NORMS:
                out[f"model.layers.{i}.{norm}.weight"] = layer[norm]
            for param, (stack, part) in PROJECTIONS.items():
                rows, _ = s.parts[stack]
                r0, r1 = sum(rows[:part]), sum(rows[:part + 1])
                out[f"model.layers.{i}.{param}.qweight"] = layer[stack][r0:r1]
                out[f"model.layers.{i}.{param}.scales"] = layer[stack + ".scales"][r0:r1]
        config = {k: self.config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "rms_norm_eps", "rope_theta")}
        metadata = {"format": QUANTIZED_FORMAT, "version": QUANTIZED_VERSION, "scheme": self.weights,
                    "group_size": str(self.group_size or 0), "family": self.family, "config": json.dumps(config),
                    "n": str(self.n)}
        save_file({k: v.detach().contiguous().cpu() for k, v in out.items()}, os.fspath(path), metadata=metadata)


def _load_tokenizer(tokenizer, ckpt: Checkpoint):
    family = family_named(ckpt.family)
    if tokenizer is None and ckpt.tokenizer_dir is None:
        return None
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        where = Path(tokenizer) if tokenizer is not None else ckpt.tokenizer_dir
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(where))
        if family.tokenizer_path is not None:  # the native classes set the side in code
            tokenizer.padding_side = family.padding_side
    return tokenizer


def _progress(total_bytes: int, show: Optional[bool]):
    if show is None:
        show = sys.stderr.isatty() and total_bytes > (1 << 30)
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="emu_fast: loading",
                file=sys.stderr)


@torch.no_grad()
def from_pretrained(path: PathLike, *, dtype: torch.dtype = torch.bfloat16, device=None,
                    weights: Optional[str] = None, group_size: Optional[int] = None,
                    max_batch: Optional[int] = DEFAULT_MAX_BATCH, max_seq_len: Optional[int] = DEFAULT_MAX_SEQ_LEN,
                    kernels: str = "auto", tokenizer=None, config=None, n: Optional[int] = None,
                    progress: Optional[bool] = None, tensor_parallel=None) -> EmuGenerator:
    """A ready text-to-embeddings generator (EmuGenerator) from an Emu checkpoint (module
    docstring: the layouts), its language model read a tensor at a time onto `device` (default
    CPU) in `dtype`, quantized there with weights="int8" / "int4" (group_size: int4's group,
    default 128) as each projection arrives. A file written by emu_fast is loaded in its own
    scheme (weights must then be None or the same). tokenizer: a tokenizer or its folder (default:
    the pipeline's `tokenizer/` beside the checkpoint); config / n: for files that carry neither.
    progress: a tqdm bar (default: on a terminal, for loads over 1 GB).

    tensor_parallel: a torch.distributed ProcessGroup this process is a rank of (gloo for the CPU,
    NCCL for CUDA): the rank reads only its share of each projection from the checkpoint (its
    heads' and MLP slice's rows of q/k/v and gate/up, the matching input columns of o and down;
    emu_fast.parallel) and holds only that; every rank calls generate_image alike."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"emu_fast.from_pretrained: dtype must be torch.float32, bfloat16 or float16, got {dtype!r}")
    _check_limit("max_batch", max_batch)
    _check_limit("max_seq_len", max_seq_len)
    _check_kernels(kernels)
    asked = None if weights is None else scheme_named(weights, "from_pretrained")
    if group_size is not None:
        if asked is None or not asked.grouped:
            raise ValueError(f"emu_fast.from_pretrained: group_size applies to weights="
                             f"{' / '.join(repr(name) for name in GROUPED)} only")
        check_group_size(group_size, "from_pretrained")
    target = resolve_device(device, "from_pretrained") or torch.device("cpu")
    tp = resolve_group(tensor_parallel, "from_pretrained")
    if tp is not None:
        tp.check_device(target, "from_pretrained")
    ckpt = read_checkpoint(path, config, n)
    where = ckpt.files[0]
    shape = shape_of(ckpt.config, where)
    pre = ckpt.quantized
    if pre is not None:
        if weights is not None and weights != pre["scheme"]:
            _fail(where, f"holds {pre['scheme']} weights; weights={weights!r} asks for another scheme")
        scheme, group = pre["scheme"], REGISTRY[pre["scheme"]].group(pre["group_size"], "from_pretrained")
        if group_size is not None and group_size != group:
            _fail(where, f"holds {scheme} weights in groups of {group}; group_size={group_size} differs")
    else:
        scheme = weights
        group = None if asked is None else asked.group(group_size, "from_pretrained")
    if tp is not None:
        check_shardable(tp, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate,
                        None if scheme is None else REGISTRY[scheme], group, "from_pretrained")
    family = family_named(ckpt.family)
    tok = _load_tokenizer(tokenizer, ckpt)

    # Every name and shape, from the headers, before a byte of data is read.
    roles: Dict[str, str] = {}
    unknown = []
    for name in ckpt.weight_map:
        role = _canonical(name)
        if role == "?":
            unknown.append(name)
        elif role is not None:
            if role in roles.values() and role in ("embed", "norm", "head", "up"):
                other = next(k for k, v in roles.items() if v == role)
                _fail(ckpt.weight_map[name], f"{name} and {other} are both the model's {role}")
            roles[name] = role
    slots = Slots(shape, dtype, target, scheme, group, tp)
    has_up = family.name != "emu1"  # Emu1 feeds its outputs back as they are
    expected = slots.expected(has_up)
    if pre is not None:  # qweight / scales instead of each projection's weight
        expected = {e for e in expected if not any(e.endswith(f"{p}.weight") for p in PROJECTIONS)}
        expected |= {f"layers.{i}.{p}.{k}" for i in range(shape.layers) for p in PROJECTIONS
                     for k in ("qweight", "scales")}
    seen = set(roles.values())
    extra = sorted((n for n, r in roles.items() if r not in expected), key=str)
    if unknown or extra:
        bad = (unknown + extra)[:5]
        _fail(ckpt.weight_map[bad[0]], f"holds tensors this {family.name} config ({shape.layers} layers) does not "
                                       f"have: {', '.join(bad)}{' ...' if len(unknown) + len(extra) > 5 else ''}")
    missing = sorted(expected - seen)
    if missing:
        _fail(where, f"lacks the model's {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (as named "
                     "after the language model's prefix)")
    for name, role in roles.items():
        check_shape(name, role, ckpt, shape, slots, scheme, group)
    by_role = {r: n for n, r in roles.items()}
    vocab = ckpt.shapes[by_role["embed"]][0][0]
    config_vocab = int(ckpt.config.get("vocab_size") or 0)
    if config_vocab and vocab != config_vocab:
        _fail(ckpt.weight_map[by_role["embed"]], f"{by_role['embed']} has {vocab} rows; the config's vocab_size is "
                                                 f"{config_vocab}")
    if has_up and ckpt.shapes[by_role["up"]][0][1] != ckpt.shapes[by_role["head"]][0][0]:
        _fail(ckpt.weight_map[by_role["up"]], f"{by_role['up']} takes {ckpt.shapes[by_role['up']][0][1]} inputs; the "
                                              f"head {by_role['head']} gives {ckpt.shapes[by_role['head']][0][0]}")

    # The data: shard by shard, a tensor at a time, cast, moved, quantized, freed.
    by_file: Dict[Path, List[str]] = {}
    for name in roles:
        by_file.setdefault(ckpt.weight_map[name], []).append(name)
    total = sum(nbytes(*ckpt.shapes[name]) for name in roles)
    bar = _progress(total, progress)
    other: Dict[str, torch.Tensor] = {}
    try:
        for f in ckpt.files:
            if f not in by_file:
                continue
            reader = _Reader(f)
            try:
                for name in by_file[f]:
                    with reader.tensor(name) as t:
                        place(t, roles[name], slots, other, dtype, target, pre is not None)
                    del t  # its mapping (the file's pages it touched) goes with it
                    if target.type == "cpu":
                        _release_freed_host_memory()  # the conversion's freed temporaries
                    if bar is not None:
                        bar.update(nbytes(*ckpt.shapes[name]))
            finally:
                reader.close()
    finally:
        if bar is not None:
            bar.close()
    decoder = EmuDecoder(slots.decoder_layers(), other["norm"], other["head"], other.get("up"),
                         num_heads=shape.heads, num_kv_heads=shape.kv_heads, rms_eps=shape.eps,
                         max_batch=max_batch, max_seq_len=max_seq_len, rope_fn=_rope_fn(shape, dtype, target),
                         kernels=kernels, weight_bits=0 if scheme is None else REGISTRY[scheme].bits,
                         group_size=group or 0, tensor_parallel=tensor_parallel)
    if tok is not None:
        check_tokenizer(tok, other["embed"].shape[0])
    tensors = {"slots": slots, **other}
    return EmuGenerator(decoder, other["embed"], tok, ckpt.n, family.name, ckpt.config, scheme, group, tensors)


def _rope_fn(shape: LlamaShape, dtype, device):
    """RoPE tables from theta, rounded to the model's dtype as a loaded model's rotary module
    hands them to its attention (4.31's cached tables are built in float32 and cast with the
    model; later versions cast cos/sin to the activations' dtype)."""
    def tables(positions: int):
        cos, sin = theta_rope_tables(shape.head_dim, positions, shape.rope_theta, device)
        return cos.to(dtype).float(), sin.to(dtype).float()

    return tables
