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

- checkpoint.py: the layouts read (every file, tensor name, shape and dtype, from the headers);
- slots.py: the decoder's tensors, each checkpoint tensor checked and placed into them;
- generator.py: from_pretrained and the EmuGenerator it returns.
"""
from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .generator import EmuGenerator, from_pretrained
from .slots import estimate_bytes

__all__ = ["Checkpoint", "CheckpointError", "EmuGenerator", "estimate_bytes", "from_pretrained", "read_checkpoint"]
