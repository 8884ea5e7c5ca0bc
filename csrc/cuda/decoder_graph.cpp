// EmuDecoder::decode on CUDA: the decode step captured once per batch size into a CUDA graph
// and replayed, so a step costs one graph launch instead of hundreds of kernel launches from
// the host. Compiled only into CUDA builds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <sstream>

#include "decoder.h"
#include "self_check.h"
#include "step_kernels.h"

namespace emu_fast {

// The captured step reads its input from `x` and leaves its results in `out`/`next`; all three
// are static buffers (the latter two live in the graph's private memory pool). The KV cache,
// the device-side lengths and the weights are fixed addresses too, so one capture serves
// every later call with the same batch size.
// It is replayed on the stream it was captured on: the cuBLAS calls it holds (GEMMs for batches
// above limits::kGemvMaxBatch) use the workspace cuBLAS keeps for that stream, so replaying on
// another stream could overlap them with other work using the same workspace there.
struct EmuDecoder::Graph {
  explicit Graph(c10::cuda::CUDAStream s) : stream(s) {}
  c10::cuda::CUDAStream stream;
  at::cuda::CUDAGraph graph;
  at::Tensor x, out, next;
};

namespace {

// Tells the allocator `t` (made on another stream) is in use on `stream` until then.
void used_on(const at::Tensor& t, c10::cuda::CUDAStream stream) {
  if (t.defined() && t.numel() > 0) t.record_stream(stream);
}

// Work queued on `waiter` from now on starts after what is queued on `first` now. (A plain CUDA
// event: ATen's CUDAEvent header pulls in all of ATen's CUDA context.)
void order_after(c10::cuda::CUDAStream first, c10::cuda::CUDAStream waiter) {
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(event, first.stream());
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(waiter.stream(), event, 0) : recorded;
  C10_CUDA_CHECK(cudaEventDestroy(event));  // released once the wait is satisfied
  C10_CUDA_CHECK(waited);
}

}  // namespace

int64_t EmuDecoder::decode_with_graph(at::Tensor x, const at::Tensor& result) {
  const int64_t B = batch_, steps = result.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  if (graphs_.size() <= static_cast<size_t>(B)) graphs_.resize(B + 1);
  const bool capture = !graphs_[B];

  // Step 1 runs eagerly: it is a real step, and before a first capture it warms up, on the
  // capture stream itself, everything a capture must not trigger for the first time
  // (allocator pools, cuBLAS workspaces for batches above 8).
  const auto current = c10::cuda::getCurrentCUDAStream();
  const auto side = capture ? c10::cuda::getStreamFromPool() : current;
  at::Tensor out, next;
  if (capture) {
    current.synchronize();  // once per batch size: order the side stream after queued work
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    std::tie(out, next) = run_step(x);
    side.synchronize();
    // Made on the side stream, read on the current one below: tell the allocator.
    out.record_stream(current);
    next.record_stream(current);
  } else {
    std::tie(out, next) = run_step(x);
  }
  for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
  result.select(1, 0).copy_(out);

  if (capture) {
    auto g = std::make_shared<Graph>(side);
    g->x = at::empty({B, hidden_}, x.options());
    {
      const c10::cuda::CUDAStreamGuard stream_guard(side);
      // Thread-local capture: with the default global mode, an unrelated thread's CUDA call
      // that is illegal during capture (cudaMalloc, a sync) would invalidate ours, or fail
      // itself. Our own thread makes no such call between begin and end.
      g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        std::tie(g->out, g->next) = run_step(g->x);
      } catch (...) {
        // End the capture (stream, allocator pool) so the device stays usable, drop the
        // partial graph, and let the original error through; the next call captures anew.
        try {
          g->graph.capture_end();
        } catch (...) {
        }
        throw;
      }
      g->graph.capture_end();
    }
    // Capturing recorded the lengths increment without running it; nothing else changed.
    graphs_[B] = std::move(g);
  }

  if (steps == 1) return 1;
  // Hold the graph: a failed check below drops graphs_.
  const std::shared_ptr<Graph> held = graphs_[B];
  Graph& g = *held;
  // The graph's own self-check ("auto" mode, first replay after a capture): the same step eagerly
  // and replayed from the same cache must agree, or the decoder falls back to the ATen step.
  const bool check = capture && mode_ == "auto" && kernels_ == &custom_kernels() && self_check_enabled();
  // The replays run on g.stream, after what is queued on `current` (step 1, the result's
  // allocation); `current` waits for them before returning. Tensors made on `current` that the
  // replays read or write are marked as used on g.stream.
  order_after(current, g.stream);
  used_on(out, g.stream);
  used_on(next, g.stream);
  used_on(result, g.stream);
  int64_t ran = steps;
  {
    const c10::cuda::CUDAStreamGuard stream_guard(g.stream);
    for (int64_t i = 1; i < steps; ++i) {
      const at::Tensor input = up_.has_value() ? next : out;
      at::Tensor eager;
      if (check && i == 1) {
        eager = std::get<0>(run_step(input)).clone();
        rewind_lengths_locked(B);
      }
      g.x.copy_(input);
      g.graph.replay();
      if (eager.defined()) {
        const double bound = self_check_bound(final_norm_.scalar_type());
        const double error = relative_error(g.out, eager);
        if (!(error <= bound)) {
          std::ostringstream why;
          why << "emu_fast: self-check failed at batch size " << B << ": the CUDA graph replay of the decode step "
              << "disagrees with the same step run eagerly (relative error " << error << " > " << bound << ") on "
              << x.device() << ". This decoder now runs the ATen step without graphs (same results, slower). "
              << "Please report this with your GPU, driver and torch versions; EMU_FAST_SELF_CHECK=0 skips the check.";
          fall_back_locked(why.str());
          use_cuda_graphs_ = false;
          rewind_lengths_locked(B);
          out = std::get<0>(run_step(input));  // the ATen step, from the same cache
          for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
          result.select(1, i).copy_(out);
          ran = i + 1;
          break;
        }
      }
      for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
      out = g.out;
      next = g.next;
      result.select(1, i).copy_(out);
    }
  }
  order_after(g.stream, current);
  return ran;
}

// The bytes a new allocation on `device` can get: what the driver has free plus what the
// caching allocator holds reserved but unused (index 0 of its stats: all pools). -1 when the
// driver cannot say (the allocation then reports its own failure).
int64_t cuda_free_bytes(const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  const int64_t cached = stats.reserved_bytes[0].current - stats.allocated_bytes[0].current;
  return static_cast<int64_t>(free) + std::max<int64_t>(cached, 0);
}

// The static buffers of the captured graphs (their private pools are the allocator's to report).
int64_t EmuDecoder::graph_bytes() const {
  int64_t n = 0;
  for (const auto& g : graphs_) {
    if (!g) continue;
    for (const auto* t : {&g->x, &g->out, &g->next})
      if (t->defined()) n += static_cast<int64_t>(t->numel()) * t->element_size();
  }
  return n;
}

}  // namespace emu_fast
