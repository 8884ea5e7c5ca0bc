"""emu_fast: KV-cached, fused-kernel generation of Emu's image embeddings.

    import emu_fast
    emu_fast.accelerate(model)           # Emu1, Emu2 (native or hub class), or the Emu2-Gen pipeline
    embeds = model.generate_image(["a photo of a cat"])   # same tensor, many times faster

For serving many users: emu_fast.Engine(model) (in-flight batching: submit / generate_async).
For embedding in other services: emu_fast.EmuDecoder (prefill / step / admit / retire) and the
torch.ops.emu_fast.* custom ops (emu_fast.ops).
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, ops, reference  # noqa: F401
from .decoder import EmuDecoder
from .dropin.accelerate import accelerate
from .dropin.families import family_of
from .loading import EmuGenerator, from_pretrained
from .ops import quantized_activations, set_quantized_activations
from .serving import Engine, EngineClosed, EngineFull

__all__ = ["accelerate", "Engine", "EngineClosed", "EngineFull", "EmuDecoder", "EmuGenerator", "family_of", "from_pretrained", "ops", "reference", "set_quantized_activations", "quantized_activations"]
__version__ = "0.1.0"
