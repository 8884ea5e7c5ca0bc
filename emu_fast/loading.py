"""Emu checkpoints straight into a ready (quantized) decoder, a tensor at a time.

    gen = emu_fast.from_pretrained("path/to/Emu2-Gen", weights="int4", device="cuda")
    embeds = gen.generate_image(["an oil painting of a cat"])      # [B, n, D]

No model object is built: the language model's tensors are read one at a time (safetensors
memory-mapped, pickles with torch.load(mmap=True, weights_only=True)), cast to `dtype`, moved to
`device` and, with weights="int8" / "int4", quantized there as each projection arrives (its float
copy freed at once), straight into the stacked q/k/v and gate/up buffers the decoder reads.
Vision and lm_head tensors are never read. Peak host memory is about one tensor (a safetensors
file is mapped anew for each; a pickle shard while it is read); peak device memory the result
plus one float projection.

Layouts (docs/model-classes.md; every name is checked, a tensor at a time, before the decoder
exists, so a bad checkpoint never yields a decoder that runs):
- the hub's Emu2 / Emu2-Gen: a pipeline folder (its `multimodal_encoder/` and `tokenizer/`), the
  `multimodal_encoder/` folder itself, or its index file: `config.json` (EmuConfig), safetensors
  shards (`model.bf16-0000N-of-0000M.safetensors` + `model.safetensors.index.bf16.json`) or fp32
  pickle shards (`pytorch_model-000NN-of-000MM.bin` + `pytorch_model.bin.index.json`); names
  `model.decoder.lm.model.*`, top-level `project_down.weight` / `project_up.weight`;
- native Emu2: one torch.save'd dict (maybe under "module"), `decoder.lm.model.*`, head
  `decoder.lm.stu_regress_head.weight` (upstream renames it project_down) or `project_down.weight`,
  feedback `vl_adapter.projection.weight` (renamed project_up) or `project_up.weight`;
- Emu1: one torch.save'd dict (maybe under "module"), `decoder.lm.model.*`,
  `decoder.lm.stu_regress_head.weight`, no feedback projection;
- a file written by emu_fast (`save_quantized` of a model, or `EmuGenerator.save_quantized`):
  the language model's state dict with `qweight` / `scales`, loaded as it is.
Files other than the hub's carry no config: pass `config=` (the LLaMA's config.json, a dict or a
transformers config), unless a `config.json` sits beside the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .config import LlamaShape, check_llama_config
from .decoder import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN, EmuDecoder, _check_kernels, _check_limit
from .families import DEFAULT_PLACEHOLDER, check_tokenizer, family_named
from .layer_weights import LayerWeights
from .packing import _release_freed_host_memory
from .prompts import check_request, embed_prompts, image_placeholder
from .quantize import DEFAULT_GROUP_SIZE, check_group_size, check_scheme, quantize_int4, quantize_int8
from .quantize import MIN_SCALE, int4_groups, int4_row_bytes
from .quantized_io import FORMAT as QUANTIZED_FORMAT
from .quantized_io import parse_metadata
from .quantized_io import _DTYPES as SAFETENSORS_DTYPES
from .quantized_linear import resolve_device

PathLike = Union[str, os.PathLike]
INDEX_FILES = ("model.safetensors.index.bf16.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# What the layer tensors are called after the LLaMA prefix, and where they go.
PROJECTIONS = {"self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1), "self_attn.v_proj": ("qkv", 2),
               "self_attn.o_proj": ("o", 0), "mlp.gate_proj": ("gate_up", 0), "mlp.up_proj": ("gate_up", 1),
               "mlp.down_proj": ("down", 0)}
NORMS = ("input_layernorm", "post_attention_layernorm")
LLAMA_PREFIXES = ("model.decoder.lm.", "decoder.lm.")
# Outside the language model: read never (vision tower, LM head), or the two projections.
SKIPPED = re.compile(r"^(model\.visual\.|visual\.|ln_visual\.|cformer\.|model\.decoder\.lm\.lm_head\.|"
                     r"decoder\.lm\.lm_head\.|lm_head\.|.*rotary_emb\.inv_freq$)")
HEADS = {"decoder.lm.stu_regress_head.weight": "head", "stu_regress_head.weight": "head",
         "project_down.weight": "head", "decoder.lm.project_down.weight": "head",
         "vl_adapter.projection.weight": "up", "project_up.weight": "up", "decoder.lm.project_up.weight": "up"}


class CheckpointError(ValueError):
    """A checkpoint emu_fast cannot load, naming the file and the tensor."""


# ------------------------------------------------------------------------------------ layouts


@dataclass
class Checkpoint:
    """Where the tensors are and what they are: files, each tensor's file, the config."""
    files: List[Path]
    weight_map: Dict[str, Path]          # every tensor name -> its file (index or file contents)
    config: dict                         # LLaMA fields (+ d_model, vision_config for the hub)
    family: str
    n: int
    tokenizer_dir: Optional[Path] = None
    quantized: Optional[dict] = None     # emu_fast metadata of a pre-quantized file
    shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = field(default_factory=dict)


def _fail(path, message: str):
    raise CheckpointError(f"emu_fast.from_pretrained: {os.fspath(path)}: {message}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        _fail(path, f"not readable JSON ({type(e).__name__}: {e})")
    if not isinstance(data, dict):
        _fail(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def _find_files(path: Path) -> Tuple[List[Path], Path]:
    """(files, folder) of a checkpoint path: a folder (a pipeline's, its
    multimodal_encoder/, or one holding an index or a single weights file), an index, or a file."""
    if not path.exists():
        raise FileNotFoundError(f"emu_fast.from_pretrained: {os.fspath(path)} does not exist")
    if path.is_dir():
        if (path / "multimodal_encoder").is_dir():  # the Emu2-Gen pipeline's folder
            path = path / "multimodal_encoder"
        for name in INDEX_FILES:
            if (path / name).is_file():
                return _find_files(path / name)
        singles = [path / n for n in SINGLE_FILES if (path / n).is_file()]
        singles += sorted(p for p in path.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES
                          and p not in singles)
        if not singles:
            _fail(path, f"holds no checkpoint (an index {', '.join(INDEX_FILES)}, or a .safetensors / "
                        f"{' / '.join(PICKLE_SUFFIXES)} file)")
        if len(singles) > 1 and not (path / SINGLE_FILES[0]).is_file() and not (path / SINGLE_FILES[1]).is_file():
            _fail(path, f"holds several weight files and no index ({', '.join(p.name for p in singles[:4])}): "
                        "pass the one to load")
        return [singles[0]], path
    if path.name.endswith(".json"):
        index = _read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            _fail(path, "is not a checkpoint index (no weight_map)")
        files = sorted({path.parent / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            _fail(path, f"names shard(s) that are not there: {', '.join(absent)}")
        return files, path.parent
    if path.suffix not in (".safetensors",) + PICKLE_SUFFIXES:
        _fail(path, f"is not a checkpoint file (.safetensors, {', '.join(PICKLE_SUFFIXES)} or an index .json)")
    return [path], path.parent


class _Reader:
    """One shard, read a tensor at a time. safetensors: memory-mapped anew for each tensor and
    unmapped once it is converted, so the host holds the pages of one tensor, not of the shard.
    A pickle: torch.load(mmap=True, weights_only=True), its tensors mapped, not read, until
    asked for (the whole shard's mapping lives until the reader closes)."""

    def __init__(self, path: Path):
        self.path = path
        self._state = None
        try:
            if path.suffix == ".safetensors":
                with self._open() as handle:
                    self.metadata = handle.metadata() or {}
                    self._shapes = {k: (tuple(handle.get_slice(k).get_shape()),
                                        SAFETENSORS_DTYPES.get(handle.get_slice(k).get_dtype(),
                                                                handle.get_slice(k).get_dtype()))
                                    for k in handle.keys()}
            else:
                self._state = _load_pickle(path)
                self.metadata = {}
                self._shapes = {k: (tuple(t.shape), t.dtype) for k, t in self._state.items()}
        except CheckpointError:
            raise
        except Exception as e:  # a truncated or corrupt file, whatever the library raises
            _fail(path, f"not a readable checkpoint ({type(e).__name__}: {e})")

    def _open(self):
        from safetensors import safe_open

        return safe_open(os.fspath(self.path), framework="pt", device="cpu")

    def keys(self) -> List[str]:
        return list(self._shapes)

    def shape_dtype(self, name: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        return self._shapes[name]

    @contextlib.contextmanager
    def tensor(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor, valid inside the block (its mapping is released after it)."""
        if self._state is not None:
            yield self._state[name]
            return
        try:
            handle = self._open()
            t = handle.get_tensor(name)
        except Exception as e:
            _fail(self.path, f"{name} could not be read ({type(e).__name__}: {e})")
        try:
            yield t
        finally:
            del t, handle

    def close(self):
        self._state = None


def _load_pickle(path: Path) -> Dict[str, torch.Tensor]:
    import pickle

    try:
        try:
            state = torch.load(os.fspath(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            # the legacy (pre-zip) format cannot be mapped: read whole, still weights only
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        _fail(path, "needs code to unpickle, and emu_fast loads weights only (torch.load(weights_only=True)): "
                    f"{str(e).splitlines()[0]}")
    if isinstance(state, dict) and set(state) == {"module"} or (isinstance(state, dict) and "module" in state
                                                                and isinstance(state["module"], dict)):
        state = state["module"]  # DeepSpeed-style wrapping, as Emu's own files have it
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        _fail(path, "is not a state dict of tensors (nor one under 'module')")
    return state


def _canonical(name: str) -> Optional[str]:
    """The tensor's role: "embed", "norm", "head", "up", "layers.<i>.<param>" (param e.g.
    "self_attn.q_proj.weight"), None for a tensor never read, or "?" for one not understood."""
    if SKIPPED.match(name):
        return None
    if name in HEADS:
        return HEADS[name]
    for prefix in LLAMA_PREFIXES + ("",):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest in ("model.embed_tokens.weight",):
                return "embed"
            if rest == "model.norm.weight":
                return "norm"
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", rest)
            if m:
                return f"layers.{int(m.group(1))}.{m.group(2)}"
    return "?"


def _family(names: List[str], config: dict, quantized: Optional[dict], where: Path) -> str:
    if quantized is not None and quantized.get("family") in ("emu1", "emu2", "emu2-hub"):
        return quantized["family"]
    if any(n.startswith("model.decoder.lm.") for n in names) or "vision_config" in config:
        return "emu2-hub"
    if any(HEADS.get(n) == "up" for n in names):
        return "emu2"
    if "decoder.lm.stu_regress_head.weight" in names or "stu_regress_head.weight" in names:
        return "emu1"
    _fail(where, "holds no Emu regression head (decoder.lm.stu_regress_head.weight or project_down.weight): "
                 "not an Emu checkpoint")


def _config_from(config, folder: Path, hub_config: Optional[dict]) -> dict:
    if config is None:
        if hub_config is not None:
            return hub_config
        beside = folder / "config.json"
        if beside.is_file():
            return _read_json(beside)
        _fail(folder, "has no config.json; pass config= (the language model's config.json, a dict, or a "
                      "transformers config)")
    if isinstance(config, (str, os.PathLike)):
        return _read_json(Path(config))
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"emu_fast.from_pretrained: config must be a path, a dict or a transformers config, "
                    f"got {type(config).__name__}")


def read_checkpoint(path: PathLike, config=None, n: Optional[int] = None) -> Checkpoint:
    """Every file, tensor name, shape and dtype of the checkpoint at `path`, its config, family
    and n: the headers only (nothing but pickles' tensor maps is read)."""
    files, folder = _find_files(Path(path))
    hub_config = None
    if (folder / "config.json").is_file():
        candidate = _read_json(folder / "config.json")
        if "vision_config" in candidate or "d_model" in candidate:
            hub_config = candidate
    weight_map, shapes, quantized = {}, {}, None
    for f in files:
        reader = _Reader(f)
        try:
            if reader.metadata.get("format") == QUANTIZED_FORMAT:
                quantized = parse_metadata(reader.metadata, f, fail=_fail)
                try:  # what a generator's save adds: n
                    quantized["n"] = int(reader.metadata.get("n", 0)) or None
                except ValueError as e:
                    _fail(f, f"damaged metadata ({type(e).__name__}: {e})")
            for name in reader.keys():
                if name in weight_map:
                    _fail(f, f"{name} is also in {weight_map[name].name}")
                weight_map[name] = f
                shapes[name] = reader.shape_dtype(name)
        finally:
            reader.close()
    if quantized is not None and config is None and hub_config is None and not (folder / "config.json").is_file():
        cfg = quantized["config"]  # a file emu_fast wrote carries the language model's shape
    else:
        cfg = _config_from(config, folder, hub_config)
    names = list(weight_map)
    family = _family(names, cfg, quantized, files[0])
    if n is None:
        n = (quantized or {}).get("n") or (cfg.get("vision_config") or {}).get("n_query") or cfg.get("n_query") \
            or cfg.get("n_causal") or family_named(family).default_n
    tokenizer_dir = None
    for candidate in (folder.parent / "tokenizer", folder / "tokenizer", folder):
        if (candidate / "tokenizer_config.json").is_file():
            tokenizer_dir = candidate
            break
    return Checkpoint(files, weight_map, cfg, family, int(n), tokenizer_dir, quantized, shapes)


# ------------------------------------------------------------------------------------ the plan


def _shape_of(cfg: dict, where: Path) -> LlamaShape:
    """The LLaMA shape of a config dict (config.LlamaShape, as from_llama reads a model's), with
    the checks a model's config gets; a missing or bad field is a CheckpointError."""
    from types import SimpleNamespace

    fields = SimpleNamespace(**{"rms_norm_eps": 1e-6, **{k: v for k, v in cfg.items() if isinstance(k, str)}})
    try:
        shape = LlamaShape.from_hf(fields)
        shape = LlamaShape(*(int(getattr(shape, f)) for f in ("hidden", "layers", "heads", "kv_heads",
                                                              "intermediate")),
                           eps=float(shape.eps), rope_theta=float(shape.rope_theta))
    except (AttributeError, TypeError, ValueError) as e:
        _fail(where, f"its config lacks a LLaMA field or has a bad one ({type(e).__name__}: {e})")
    check_llama_config(fields)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        _fail(where, f"its config's {shape.heads} heads / {shape.kv_heads} KV heads do not divide hidden "
                     f"{shape.hidden}")
    return shape


class _Slots:
    """The decoder's tensors, allocated on the device as their first part arrives, filled in
    place: per layer the two norms and four (stacked) projections, float or quantized."""

    def __init__(self, shape: LlamaShape, dtype, device, scheme: Optional[str], group_size: Optional[int]):
        self.shape, self.dtype, self.device, self.scheme, self.group = shape, dtype, device, scheme, group_size
        s = shape
        kv = s.kv_heads * s.head_dim
        # rows of each part of each stacked projection, and its input size
        self.parts = {"qkv": ([s.hidden, kv, kv], s.hidden), "o": ([s.hidden], s.hidden),
                      "gate_up": ([s.intermediate, s.intermediate], s.hidden), "down": ([s.hidden], s.intermediate)}
        self.layers: List[Dict[str, torch.Tensor]] = [{} for _ in range(s.layers)]

    def expected(self, has_up: bool) -> set:
        names = {"embed", "norm", "head"} | ({"up"} if has_up else set())
        for i in range(self.shape.layers):
            names |= {f"layers.{i}.{n}.weight" for n in NORMS}
            names |= {f"layers.{i}.{p}.weight" for p in PROJECTIONS}
        return names

    def projection_shape(self, param: str) -> Tuple[int, int]:
        stack, part = PROJECTIONS[param]
        rows, k = self.parts[stack]
        return rows[part], k

    def _buffer(self, i: int, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        layer = self.layers[i]
        if key not in layer:
            layer[key] = make()
        return layer[key]

    def put_projection(self, i: int, param: str, w: torch.Tensor) -> None:
        """A float projection [rows, K] into its stacked slot, quantized on the way if asked."""
        stack, part = PROJECTIONS[param]
        rows, k = self.parts[stack]
        r0, r1 = sum(rows[:part]), sum(rows[:part + 1])
        total = sum(rows)
        if self.scheme is None:
            buf = self._buffer(i, stack, lambda: torch.empty(total, k, dtype=self.dtype, device=self.device))
            buf[r0:r1].copy_(w)
        elif self.scheme == "int8":
            q, s = quantize_int8(w, device=self.device)
            self._buffer(i, stack, lambda: torch.empty(total, k, dtype=torch.int8, device=self.device))[r0:r1] = q
            self._buffer(i, stack + ".scales", lambda: torch.empty(total, dtype=torch.float32,
                                                                   device=self.device))[r0:r1] = s
        else:
            q, s = quantize_int4(w, self.group, device=self.device)
            self._buffer(i, stack, lambda: torch.empty(total, int4_row_bytes(k), dtype=torch.uint8,
                                                       device=self.device))[r0:r1] = q
            self._buffer(i, stack + ".scales", lambda: torch.empty(total, int4_groups(k, self.group),
                                                                   dtype=torch.float32, device=self.device))[r0:r1] = s

    def put_quantized(self, i: int, param: str, kind: str, t: torch.Tensor) -> None:
        """A pre-quantized projection's qweight or scales into its stacked slot, as stored."""
        stack, part = PROJECTIONS[param]
        rows, _ = self.parts[stack]
        r0, r1 = sum(rows[:part]), sum(rows[:part + 1])
        key = stack if kind == "qweight" else stack + ".scales"
        self._buffer(i, key, lambda: torch.empty((sum(rows),) + tuple(t.shape[1:]), dtype=t.dtype,
                                                 device=self.device))[r0:r1] = t.to(self.device)

    def decoder_layers(self) -> List[List[torch.Tensor]]:
        return [LayerWeights(layer["input_layernorm"], layer["qkv"], layer["o"], layer["post_attention_layernorm"],
                             layer["gate_up"], layer["down"], *(layer.get(f"{p}.scales") for p in self.parts))
                .as_list() for layer in self.layers]


def estimate_bytes(config: dict, *, dtype: torch.dtype = torch.bfloat16, weights: Optional[str] = None,
                   group_size: Optional[int] = None, head_dim_out: int = 0) -> Dict[str, int]:
    """What from_pretrained keeps on the device for a language model of this config, in bytes:
    "layers" (the decoder layers' projections, quantized as asked, and norms), "embed" (the
    embedding table in `dtype`), "head" (final norm, regression head [head_dim_out, hidden] and,
    for Emu2, project_up, in `dtype`), and "float_layer" (one layer's projections in `dtype`; a
    quantized load holds one projection of it at a time beside the result)."""
    shape = _shape_of(config, Path("<config>"))
    size = torch.empty(0, dtype=dtype).element_size()
    kv = shape.kv_heads * shape.head_dim
    projections = [(shape.hidden + 2 * kv, shape.hidden), (shape.hidden, shape.hidden),
                   (2 * shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate)]
    group = (group_size or DEFAULT_GROUP_SIZE) if weights == "int4" else None

    def stored(rows, k):
        if weights is None:
            return rows * k * size
        if weights == "int8":
            return rows * k + rows * 4
        return rows * int4_row_bytes(k) + rows * int4_groups(k, group) * 4

    layer = sum(stored(r, k) for r, k in projections) + 2 * shape.hidden * size
    float_layer = sum(r * k for r, k in projections) * size
    return {"layers": shape.layers * layer, "embed": int(config.get("vocab_size") or 0) * shape.hidden * size,
            "head": (shape.hidden + 2 * head_dim_out * shape.hidden) * size, "float_layer": float_layer}


# ------------------------------------------------------------------------------------ the generator


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
        project_up for Emu2), filling the placeholders' slots in row-major order."""
        texts = check_request(texts, placeholder)
        if self.tokenizer is None:
            raise ValueError("emu_fast: this generator has no tokenizer (none beside the checkpoint); pass "
                             "tokenizer= to emu_fast.from_pretrained")
        if prompt_image_embeds is not None and not isinstance(prompt_image_embeds, torch.Tensor):
            raise TypeError("emu_fast: prompt_image_embeds must be a tensor [images * n, hidden]")
        embeds, mask = embed_prompts(self.tokenizer, self.embed_tokens, texts, image_placeholder(self.n), placeholder,
                                     prompt_image_embeds)
        return self.decoder.generate(embeds.to(self.decoder.input_device), mask, self.n)

    def memory_summary(self) -> dict:
        """The decoder's memory_summary plus the embedding table's bytes."""
        summary = self.decoder.memory_summary()
        summary["embed_tokens"] = self.embed_tokens.numel() * self.embed_tokens.element_size()
        return summary

    def save_quantized(self, path: PathLike) -> None:
        """Write this generator's quantized weights (and its head, feedback projection, config, n
        and family) to one safetensors file that from_pretrained loads as it is."""
        from safetensors.torch import save_file

        from .quantized_io import VERSION

        if self.weights is None:
            raise ValueError("emu_fast: this generator's weights are not quantized (from_pretrained(weights=...))")
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
        metadata = {"format": QUANTIZED_FORMAT, "version": VERSION, "scheme": self.weights,
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
                    progress: Optional[bool] = None) -> EmuGenerator:
    """A ready text-to-embeddings generator (EmuGenerator) from an Emu checkpoint (module
    docstring: the layouts), its language model read a tensor at a time onto `device` (default
    CPU) in `dtype`, quantized there with weights="int8" / "int4" (group_size: int4's group,
    default 128) as each projection arrives. A file written by emu_fast is loaded in its own
    scheme (weights must then be None or the same). tokenizer: a tokenizer or its folder (default:
    the pipeline's `tokenizer/` beside the checkpoint); config / n: for files that carry neither.
    progress: a tqdm bar (default: on a terminal, for loads over 1 GB)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"emu_fast.from_pretrained: dtype must be torch.float32, bfloat16 or float16, got {dtype!r}")
    _check_limit("max_batch", max_batch)
    _check_limit("max_seq_len", max_seq_len)
    _check_kernels(kernels)
    if weights is not None:
        check_scheme(weights, "from_pretrained")
    if group_size is not None:
        if weights != "int4":
            raise ValueError("emu_fast.from_pretrained: group_size applies to weights='int4' only")
        check_group_size(group_size, "from_pretrained")
    target = resolve_device(device, "from_pretrained") or torch.device("cpu")
    ckpt = read_checkpoint(path, config, n)
    where = ckpt.files[0]
    shape = _shape_of(ckpt.config, where)
    pre = ckpt.quantized
    if pre is not None:
        if weights is not None and weights != pre["scheme"]:
            _fail(where, f"holds {pre['scheme']} weights; weights={weights!r} asks for another scheme")
        scheme, group = pre["scheme"], (pre["group_size"] if pre["scheme"] == "int4" else None)
        if group_size is not None and group_size != group:
            _fail(where, f"holds int4 weights in groups of {group}; group_size={group_size} differs")
    else:
        scheme = weights
        group = (group_size or DEFAULT_GROUP_SIZE) if weights == "int4" else None
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
    slots = _Slots(shape, dtype, target, scheme, group)
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
        _check_shape(name, role, ckpt, shape, slots, scheme, group)
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
    total = sum(_nbytes(*ckpt.shapes[name]) for name in roles)
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
                        _place(t, roles[name], slots, other, dtype, target, pre is not None)
                    del t  # its mapping (the file's pages it touched) goes with it
                    if target.type == "cpu":
                        _release_freed_host_memory()  # the conversion's freed temporaries
                    if bar is not None:
                        bar.update(_nbytes(*ckpt.shapes[name]))
            finally:
                reader.close()
    finally:
        if bar is not None:
            bar.close()
    decoder = EmuDecoder(slots.decoder_layers(), other["norm"], other["head"], other.get("up"),
                         num_heads=shape.heads, num_kv_heads=shape.kv_heads, rms_eps=shape.eps,
                         max_batch=max_batch, max_seq_len=max_seq_len, rope_fn=_rope_fn(shape, dtype, target),
                         kernels=kernels,
                         weight_bits={None: 0, "int8": 8, "int4": 4}[scheme], group_size=group or 0)
    if tok is not None:
        check_tokenizer(tok, other["embed"].shape[0])
    tensors = {"slots": slots, **other}
    return EmuGenerator(decoder, other["embed"], tok, ckpt.n, family.name, ckpt.config, scheme, group, tensors)


def _rope_fn(shape: LlamaShape, dtype, device):
    """RoPE tables from theta, rounded to the model's dtype as a loaded model's rotary module
    hands them to its attention (4.31's cached tables are built in float32 and cast with the
    model; later versions cast cos/sin to the activations' dtype)."""
    from .rope import theta_rope_tables

    def tables(positions: int):
        cos, sin = theta_rope_tables(shape.head_dim, positions, shape.rope_theta, device)
        return cos.to(dtype).float(), sin.to(dtype).float()

    return tables


def _nbytes(shape, dtype) -> int:
    size = 1
    for s in shape:
        size *= s
    return size * (torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1)


def _check_shape(name, role, ckpt: Checkpoint, shape: LlamaShape, slots: _Slots, scheme, group) -> None:
    got, dtype = ckpt.shapes[name]
    f = ckpt.weight_map[name]
    if role == "embed":
        want = (got[0] if len(got) == 2 else -1, shape.hidden)
    elif role == "norm":
        want = (shape.hidden,)
    elif role == "head":
        want = (got[0] if len(got) == 2 else -1, shape.hidden)
    elif role == "up":
        want = (shape.hidden, got[1] if len(got) == 2 else -1)
    else:
        _, _, param = role.split(".", 2)
        kind = param.rsplit(".", 1)[1]
        param = param.rsplit(".", 1)[0]
        if param in NORMS:
            want = (shape.hidden,)
        else:
            rows, k = slots.projection_shape(param)
            if kind == "weight":
                want = (rows, k)
            elif kind == "qweight":
                want = (rows, k) if scheme == "int8" else (rows, int4_row_bytes(k))
                wanted_dtype = torch.int8 if scheme == "int8" else torch.uint8
                if dtype != wanted_dtype:
                    _fail(f, f"{name} is {dtype}; {scheme} qweights are {wanted_dtype}")
            else:
                want = (rows,) if scheme == "int8" else (rows, int4_groups(k, group))
                if dtype != torch.float32:
                    _fail(f, f"{name} is {dtype}; scales are torch.float32")
    if tuple(got) != tuple(want) or -1 in want:
        _fail(f, f"{name} has shape {list(got)}; the config ({shape.layers} layers, hidden {shape.hidden}, "
                 f"intermediate {shape.intermediate}, {shape.heads} heads / {shape.kv_heads} KV heads) gives "
                 f"{[w for w in want]}")
    if role in ("embed", "norm", "head", "up") or role.endswith(".weight"):
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            _fail(f, f"{name} is {dtype}, not a float tensor")


def _place(t: torch.Tensor, role: str, slots: _Slots, other: Dict[str, torch.Tensor], dtype, target,
           prequantized: bool) -> None:
    if role in ("embed", "norm", "head", "up"):
        other[role] = t.to(device=target, dtype=dtype, copy=True)
        return
    _, i, param = role.split(".", 2)
    i = int(i)
    base, kind = param.rsplit(".", 1)
    if base in NORMS:
        slots.layers[i][base] = t.to(device=target, dtype=dtype, copy=True)
    elif kind == "weight":
        w = t.to(device=target, dtype=dtype)  # the model's dtype first: quantized as the loaded model would be
        try:
            slots.put_projection(i, base, w)  # the quantizer refuses non-finite weights
        except ValueError as e:
            raise CheckpointError(f"emu_fast.from_pretrained: {role}: {e}") from None
        del w
    else:
        if kind == "scales" and not bool((torch.isfinite(t) & ((t == 0) | (t >= MIN_SCALE))).all()):
            raise CheckpointError(f"emu_fast.from_pretrained: {role} holds scales that are NaN, inf, negative or "
                                  f"subnormal; scales are 0 (an all-zero row or group) or at least {MIN_SCALE!r}")
        slots.put_quantized(i, base, kind, t)
