"""Weight-only quantization (int8, int4) of the decoder body's projections:

- schemes.py: the schemes in plain PyTorch (quantize, dequantize, int4 packing, the activation
  roundings the CPU kernels apply) and REGISTRY, one QuantScheme per scheme;
- modules.py: Int8Linear / Int4Linear, the nn.Linear replacements;
- apply.py: quantizing a model in place, and the scheme policy of accelerate / EmuDecoder;
- io.py: save_quantized / load_quantized (safetensors).
"""
