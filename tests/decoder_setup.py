"""The tiny Emu-shaped setup the decoder tests share (tests/decoder/test_decoder.py and, on the CUDA
kernels, tests/emulators/test_cuda_emulation.py): a tiny LLaMA with an Emu1 or Emu2 regression head, its
prompts run through the tokenizer and splice, and the float32 upstream loop as the expected
output. Test modules import this, never each other."""
import torch

from emu_fast import EmuDecoder, ops, reference
from emu_fast.testing import tiny_llama

# Relative error per output vector of the whole loop against the float32 upstream loop.
LOOP_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}

PROMPTS = {
    1: ["a photo of a cat"],
    3: ["a photo of a cat", "an oil painting [<IMG_PLH>] of a dog riding a bicycle at dawn", "hi"],
}


class Setup:
    """A tiny LLaMA with an Emu1 (H->H head) or Emu2 (H->out head + project_up) regression head."""

    def __init__(self, kind, tokenizer, kv_heads=4, n=5, dtype=torch.float32, hidden=64, out_dim=24):
        self.kind, self.n, self.tok = kind, n, tokenizer
        tokenizer.padding_side = "right" if kind == "emu1" else "left"
        self.lm = tiny_llama(hidden=hidden, kv_heads=kv_heads, seed=3)
        g = torch.Generator().manual_seed(4)
        d = hidden if kind == "emu1" else out_dim
        self.head = torch.randn(d, hidden, generator=g) * hidden ** -0.5
        self.up = torch.randn(hidden, d, generator=g) * d ** -0.5 if kind == "emu2" else None
        # The oracle runs in float32 on the same (possibly bf16-rounded) weights.
        self.lm, self.head = self.lm.to(dtype), self.head.to(dtype)
        self.up = None if self.up is None else self.up.to(dtype)
        self.shape = reference.LlamaShape.from_hf(self.lm.config)
        self.w32 = {k: v.float() for k, v in reference.body_weights(self.lm).items()}
        self.placeholder = "[IMG]" + "<image>" * n + "[/IMG]"
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")

    def decoder(self, max_batch=4, max_seq_len=128, **kwargs):
        return EmuDecoder.from_llama(self.lm, self.head, self.up, max_batch=max_batch, max_seq_len=max_seq_len,
                                     **kwargs)

    def inputs(self, texts, images=None):
        texts = [t.replace("[<IMG_PLH>]", self.placeholder) + "[IMG]" for t in texts]
        tok = self.tok(texts, padding="longest", return_tensors="pt")
        table = self.lm.model.embed_tokens.weight.detach()
        if images is None:
            embeds = ops.splice_embeddings(tok.input_ids, table, table.new_empty(0, table.shape[1]), -1)
        else:
            embeds = ops.splice_embeddings(tok.input_ids, table, images.to(table.dtype), self.image_id)
        return embeds, tok.attention_mask

    def expected(self, texts, images=None):
        head32 = self.head.float()
        up32 = None if self.up is None else self.up.float()
        return reference.upstream_generate_image(
            body=lambda e, m: reference.llama_body(self.w32, self.shape, e, m),
            embed_tokens=lambda ids: self.w32["embed_tokens.weight"][ids],
            tokenizer=self.tok, texts=texts, n=self.n, image_placeholder=self.placeholder,
            regress=lambda h: h @ head32.t(), project_up=None if up32 is None else (lambda o: o @ up32.t()),
            prompt_image_embeds=None if images is None else images.float())
