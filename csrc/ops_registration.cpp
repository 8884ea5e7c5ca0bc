// The emu_fast operator schemas. Backends register implementations with TORCH_LIBRARY_IMPL
// (cpu/ops_cpu.cpp, cuda/*.cu); fake (meta) implementations live in emu_fast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(emu_fast, m) {
  // Token embeddings with image vectors written into the slots whose id is slot_token_id, in
  // row-major order: input_ids [B,T] int64, embed_table [V,H], slot_values [S,H] -> [B,T,H].
  // S must equal the number of slots; slot_token_id < 0 means no slots (S must be 0).
  m.def("splice_embeddings(Tensor input_ids, Tensor embed_table, Tensor slot_values, int slot_token_id) -> Tensor");

  // One decode step of attention for B sequences (row b uses cache slot b): rotates q and k at
  // positions[b], appends k and v at index cache_lens[b] of k_cache/v_cache [Bmax,Hkv,S,D],
  // and attends over entries [0, cache_lens[b]]. q [B,Hq,D], k/v [B,Hkv,D], cache_lens and
  // positions int64 [B], rope_cos/rope_sin float32 [P, D/2]. Returns [B,Hq,D].
  // split_counters (CUDA; int32, at least B * Hkv, all zero): lets the last of the blocks that
  // share a row and KV head merge their partial results in the same launch (no second kernel);
  // the op leaves them zero again, so a caller keeps one buffer for every call on a stream. The
  // CPU kernel checks and ignores them.
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_lens, Tensor positions, Tensor rope_cos, Tensor rope_sin, float scale, "
        "Tensor(c!)? split_counters=None) -> Tensor");

  // The regression head: out = rms_norm(hidden) @ head_weight^T, and, when up_weight is given,
  // next_input = out @ up_weight^T (Emu2's project_up); otherwise next_input is [B,0] and the
  // output itself is the next input (Emu1). Each weight is read once for the whole batch.
  m.def("regression_head(Tensor hidden, Tensor norm_weight, float eps, Tensor head_weight, Tensor? up_weight) -> (Tensor, Tensor)");

  // Per-step glue. gemv: x [B,K] @ weight[N,K]^T with float32 accumulation, for small B.
  m.def("gemv(Tensor x, Tensor weight) -> Tensor");
  // The decode step's fused projections. norm_gemv: rms_norm(x; norm_weight, eps) @ weight^T,
  // the normalized rows rounded to the dtype as rms_norm rounds them (the QKV and gate/up
  // projections with their norm as the GEMV's prologue). gemv_add: residual + x @ weight^T, the
  // product rounded to the dtype, then the sum (the o and down projections with the residual
  // add as their epilogue). residual is [B, N].
  m.def("norm_gemv(Tensor x, Tensor norm_weight, float eps, Tensor weight) -> Tensor");
  m.def("gemv_add(Tensor x, Tensor weight, Tensor residual) -> Tensor");
  // The gate/up projection with SiLU * mul as its epilogue: gate_up_weight [2I, K] = [gate rows;
  // up rows] -> silu_mul(norm_gemv(x, norm_weight, eps, gate_up_weight)) [B, I], rounded as that
  // composition rounds (each product to the dtype, silu(gate) to the dtype, then the product).
  m.def("norm_gemv_silu(Tensor x, Tensor norm_weight, float eps, Tensor gate_up_weight) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // Returns (rms_norm(x + residual), x + residual).
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // gate_up [B, 2I] = [gate | up] -> silu(gate) * up [B, I].
  m.def("silu_mul(Tensor gate_up) -> Tensor");

  // Weight-only quantized GEMVs (emu_fast/quantize.py defines the schemes; layouts in
  // kernels/quantized_gemv.h): x [B,K] float32/bfloat16 -> [B,N] in x's dtype, the weight
  // dequantized in registers, float32 accumulation, for small B.
  // gemv_int8: qweight int8 [N,K], scales float32 [N]: x @ (qweight * scales[:, None])^T.
  m.def("gemv_int8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  // gemv_int4: qweight uint8 [N, ceil(K/32)*16] (two values a byte), scales float32
  // [N, ceil(K/group_size)], group_size a multiple of 32.
  m.def("gemv_int4(Tensor x, Tensor qweight, Tensor scales, int group_size) -> Tensor");
}
