"""Reading an Emu checkpoint's headers: its files, every tensor's name, shape and dtype, its config,
family and n (read_checkpoint), and one shard a tensor at a time (_Reader). emu_fast.loading
puts them together into a decoder.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..dropin.families import family_named
from ..quant.io import FORMAT as QUANTIZED_FORMAT
from ..quant.io import SAFETENSORS_DTYPES, parse_metadata

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
