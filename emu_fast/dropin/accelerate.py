"""The drop-in: emu_fast.accelerate(model) swaps an Emu model's generate_image for the KV-cached
path. Same signature, same result (up to float rounding), on the model's own device and dtype.
emu_fast.accelerate(pipe) on the Emu2-Gen diffusers pipeline accelerates its
`multimodal_encoder` and returns the pipeline, whose own __call__ then runs unchanged.

What differs between the model classes (where the LLaMA and the tokenizer are, which modules
hold the head and project_up, n, how prompt images are encoded, generate_image's signature) is
asked of the model's family (emu_fast.dropin.families); nothing here branches on it.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

import torch

from ..decoder import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN, EmuDecoder
from .families import EmuFamily, check_tokenizer, family_of
from .prompts import check_request, embed_prompts
from .model_checks import check_linear, check_weights_loaded
from ..quant.apply import prepare_quantization, quantized_buffers, resolve_device
from .walk import llama_body_of
from ..parallel import check_model_shardable, resolve_group


def _weight_addresses(model, family: EmuFamily):
    """Where every weight the decoder reads lives, to notice later if the model's weights were
    replaced or moved (load_state_dict(assign=True), .to(), ...)."""
    lm = family.lm(model)
    body = llama_body_of(lm)
    addresses = [p.data_ptr() for p in body.parameters() if p is not body.embed_tokens.weight]
    addresses += [t.data_ptr() for t in quantized_buffers(lm)]  # weight-only int8/int4
    return addresses + [m.weight.data_ptr() for m in (family.head(model), family.project_up(model)) if m is not None]


def accelerate(model, *, max_batch: Optional[int] = DEFAULT_MAX_BATCH,
               max_seq_len: Optional[int] = DEFAULT_MAX_SEQ_LEN, kernels: str = "auto",
               weights: Optional[str] = None, group_size: Optional[int] = None, device=None, tensor_parallel=None):
    """Replace `model.generate_image` (this instance only) with the emu_fast path and return the
    model. The KV cache grows to the largest request; `max_batch` prompts of up to `max_seq_len`
    tokens (prompt + n generated embeddings) are optional limits (None: no limit besides
    memory), and requests over them raise ValueError. The original method stays at
    `model._emu_fast_original_generate_image`; `model.emu_fast_decoder` is the EmuDecoder.

    kernels: "auto" (default: our kernels where we have them, each batch size's first step
    checked against ATen, falling back to ATen with a warning on a mismatch; ATen on devices we
    have no kernels for), "custom" (ours, unchecked) or "aten" (the portable step, any device).
    A model split over devices (Hugging Face accelerate's device_map, as in the Emu2 README)
    runs each layer where its weights are; offloaded (meta) weights are refused.

    weights: weight-only quantization of the decoder body's projections (q/k/v/o_proj,
    gate/up/down_proj of every layer; embeddings, norms, the regression head and project_up stay
    in the model's dtype; activations stay in it too, except that on the CPU bfloat16
    activations enter the quantized GEMVs as int16 blocks, emu_fast.quant.schemes.round_inputs_to_int16,
    and emu_fast.set_quantized_activations("int8") opts in to int8 blocks, faster with int4):
      None    (default) the model's weights as they are: float, or a model already quantized
              with emu_fast.quant.apply.quantize_decoder_linears_ / loaded with
              emu_fast.quant.io.load_quantized (run in its own scheme).
      "int8"  symmetric per output row: scale = max|w| / 127, q = round(w / scale) in [-127, 127].
      "int4"  symmetric in groups of `group_size` consecutive inputs of a row (default
              128, a multiple of 32): scale = max|w| / 7 per group, q in [-7, 7], two a byte.
    The model is quantized in place (Int8Linear / Int4Linear modules replace the projections
    and the float weights are released layer by layer), so its own forward keeps working on
    the same quantized weights; emu_fast.quant.schemes defines the schemes exactly. An unknown scheme,
    or one that differs from the model's existing quantization, raises ValueError before
    anything changes.

    device: where the model is to run (default: where it is). With weights="int8" / "int4", a
    model loaded on the CPU is quantized onto the device layer by layer (each projection's float
    weight copied over a chunk of rows at a time and quantized there; see
    emu_fast.quant.apply.quantize_decoder_linears_), then the rest of the model follows: a
    model too large for the GPU in its float dtype ends up there quantized. The device then
    holds the quantized model and one chunk of float rows at most. Without weights the model is
    moved as model.to(device) would.

    tensor_parallel: a torch.distributed ProcessGroup this process is a rank of (gloo for a model
    on the CPU, NCCL for one on CUDA; e.g. torch.distributed.group.WORLD under torchrun). Every
    rank loads the model and calls accelerate and generate_image alike; each rank's decoder holds
    its share of every layer (whole heads, a slice of the MLP) and reads only that each step, two
    all-reduces a layer summing the shares (emu_fast.parallel). Every rank gets the same images;
    ranks called with different prompts raise ValueError, and a rank that dies or hangs makes
    the others raise within the group's timeout."""
    pipeline = _pipeline_encoder(model)
    if pipeline is not None:  # the Emu2-Gen pipeline: its encoder is the model
        accelerate(pipeline, max_batch=max_batch, max_seq_len=max_seq_len, kernels=kernels, weights=weights,
                   group_size=group_size, device=device, tensor_parallel=tensor_parallel)
        return model
    family = family_of(model)
    lm = family.lm(model)
    target = resolve_device(device, "accelerate")                  # a bad device, group or scheme fails
    tp = resolve_group(tensor_parallel, "accelerate")
    if tp is not None:  # the group's backend must serve where the model will run
        tp.check_device(target if target is not None else family.head(model).weight.device, "accelerate")
    quant = prepare_quantization(model, weights, group_size, apply=False)  # before anything changes
    head = check_linear(family.head(model), family.head_name(model))
    up_module = family.project_up(model)
    up = None if up_module is None else check_linear(up_module, family.up_name(model))
    check_model_shardable(tp, lm.config, quant, "accelerate")
    body = llama_body_of(lm)
    check_weights_loaded([("model.layers", body.layers), ("model.norm", body.norm),
                          ("model.embed_tokens", body.embed_tokens), (family.head_name(model), family.head(model))]
                         + ([(family.up_name(model), up_module)] if up_module is not None else []))
    if family.tokenizer_path is not None:  # a model with its own tokenizer: checked now, not at the first call
        check_tokenizer(family.tokenizer(model), body.embed_tokens.weight.shape[0])
    if target is not None:  # quantize onto the device layer by layer (if asked), then move the rest
        prepare_quantization(model, weights, group_size, device=target)
        model.to(target)
        head, up = family.head(model).weight, None if up_module is None else up_module.weight  # moved
    decoder = EmuDecoder.from_llama(lm, head, up, max_batch=max_batch, max_seq_len=max_seq_len,
                                    kernels=kernels, weights=weights, group_size=group_size,
                                    tensor_parallel=tensor_parallel)
    if not hasattr(model, "_emu_fast_original_generate_image"):
        model._emu_fast_original_generate_image = model.generate_image
    model.emu_fast_decoder = decoder
    model._emu_fast_family = family
    model._emu_fast_n = family.n(model)
    model._emu_fast_weights = _weight_addresses(model, family)
    model.generate_image = types.MethodType(_method_for(family), model)
    return model


def _pipeline_encoder(obj):
    """The Emu model inside a pipeline (Emu2-Gen's `multimodal_encoder`), or None when `obj` is
    not a pipeline (an Emu model, or anything else: family_of says what it lacks)."""
    encoder = getattr(obj, "multimodal_encoder", None)
    if encoder is None or isinstance(obj, torch.nn.Module) and hasattr(obj, "generate_image"):
        return None
    return encoder


@functools.lru_cache(maxsize=None)
def _method_for(family: EmuFamily):
    """generate_image with the family's own signature (names, order, defaults), so every call
    the model's method takes (by keyword, by position) is taken the same way."""
    signature = family.signature()

    def generate_image(self, *args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            if "tokenizer" in kwargs and "tokenizer" not in signature.parameters:
                family.tokenizer(self, kwargs["tokenizer"])  # says the model has its own
            raise TypeError(f"emu_fast: {type(self).__name__}.generate_image{signature}: {e}") from None
        bound.apply_defaults()
        call = bound.arguments
        return _generate_image(self, call["text"], family.tokenizer(self, call.get("tokenizer")), call["image"],
                               call["placeholder"])

    generate_image.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + list(signature.parameters.values()))
    generate_image.__doc__ = f"emu_fast's KV-cached generate_image{signature} (the model's own is " \
                             "_emu_fast_original_generate_image)."
    return generate_image


@torch.no_grad()
def prompt_inputs(model, text, tokenizer, image: Optional[torch.Tensor], placeholder: str):
    """An accelerated model's prompts as the decoder takes them: (inputs_embeds on the decoder's
    input device, attention_mask), checked as generate_image checks them. Tokenized once: every
    later step appends one slot whose input is the previous output, so the cache covers the rest
    of upstream's loop."""
    text = check_request(text, placeholder)
    if image is not None and not isinstance(image, torch.Tensor):
        raise TypeError(f"emu_fast: prompt images must be a tensor [N, 3, H, W], got {type(image).__name__}")
    family: EmuFamily = model._emu_fast_family
    max_batch = model.emu_fast_decoder.max_batch
    if _weight_addresses(model, family) != model._emu_fast_weights:
        raise RuntimeError("emu_fast: the model's weights were replaced or moved after emu_fast.accelerate "
                           "(load_state_dict(assign=True), .to(), ...); call emu_fast.accelerate(model) again")
    if max_batch is not None and len(text) > max_batch:
        raise ValueError(f"emu_fast: {len(text)} prompts exceed the decoder's max_batch of {max_batch} "
                         f"(pass a larger max_batch to emu_fast.accelerate)")
    table = family.lm(model).model.embed_tokens.weight
    vectors = None if image is None else family.prompt_image_embeds(model, image)
    embeds, mask = embed_prompts(tokenizer, table, text, model.image_placeholder, placeholder, vectors)
    # A split model: prompts go in on the first layer's device, outputs come out on the head's.
    return embeds.to(model.emu_fast_decoder.input_device), mask


@torch.no_grad()
def _generate_image(self, text, tokenizer, image: Optional[torch.Tensor], placeholder: str) -> torch.Tensor:
    decoder: EmuDecoder = self.emu_fast_decoder
    embeds, mask = prompt_inputs(self, text, tokenizer, image, placeholder)
    from ..serving.engine import through_engine

    served = through_engine(self, embeds, mask)
    return served if served is not None else decoder.generate(embeds, mask, self._emu_fast_n)
