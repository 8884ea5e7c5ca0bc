// EmuDecoder::decode on CUDA: the decode step captured once per batch size into CUDA graphs
// and replayed, so a step costs one graph launch per device instead of hundreds of kernel
// launches from the host. A model on one GPU is one graph; a model split over GPUs is one graph
// per part (a device's run of layers; the head), with the hidden state copied between them.
// Compiled only into CUDA builds.
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

// Each captured part reads its input from `in` and leaves its results in `out`/`next`; all
// three are static buffers (the latter two live in the graph's private memory pool). The KV
// caches, the device-side lengths and the weights are fixed addresses too, so one capture
// serves every later call with the same batch size.
// A part is replayed on the stream it was captured on (one per device): the cuBLAS calls it
// holds (GEMMs for batches our GEMV kernels do not take) use the workspace cuBLAS keeps for that
// stream, so replaying on another stream could overlap them with other work using the same
// workspace there.
struct EmuDecoder::Graph {
  struct Piece {
    at::cuda::CUDAGraph graph;
    at::Tensor in, out, next;
  };
  std::vector<c10::cuda::CUDAStream> streams;  // one per device the parts use, captured on
  std::vector<std::unique_ptr<Piece>> pieces;  // one per part of parts_
  c10::cuda::CUDAStream stream_on(const at::Device& d) const {
    for (const auto& s : streams)
      if (s.device() == d) return s;
    TORCH_INTERNAL_ASSERT(false, "emu_fast: no capture stream for ", d);
  }
};

namespace {

// Tells the allocator `t` (made on another stream) is in use on `stream` until then.
void used_on(const at::Tensor& t, c10::cuda::CUDAStream stream) {
  if (t.defined() && t.numel() > 0) t.record_stream(stream);
}

// Work queued on `waiter` from now on starts after what is queued on `first` now (same device).
// (A plain CUDA event: ATen's CUDAEvent header pulls in all of ATen's CUDA context.)
void order_after(c10::cuda::CUDAStream first, c10::cuda::CUDAStream waiter) {
  const c10::cuda::CUDAGuard device(first.device());
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  const cudaError_t recorded = cudaEventRecord(event, first.stream());
  const cudaError_t waited = recorded == cudaSuccess ? cudaStreamWaitEvent(waiter.stream(), event, 0) : recorded;
  C10_CUDA_CHECK(cudaEventDestroy(event));  // released once the wait is satisfied
  C10_CUDA_CHECK(waited);
}

}  // namespace

bool EmuDecoder::graphs_possible() const {
  for (const Part& p : parts_)
    if (!p.device.is_cuda()) return false;
  return true;
}

int64_t EmuDecoder::decode_with_graph(at::Tensor x, const at::Tensor& result) {
  const int64_t B = batch_, steps = result.size(1);
  if (graphs_.size() <= static_cast<size_t>(B)) graphs_.resize(B + 1);
  const bool capture = !graphs_[B];

  // The caller's current stream on every device the parts use, and the streams the graphs run on.
  std::vector<c10::cuda::CUDAStream> current, side;
  for (const Part& p : parts_) {
    bool seen = false;
    for (const auto& s : current) seen = seen || s.device() == p.device;
    if (seen) continue;
    current.push_back(c10::cuda::getCurrentCUDAStream(p.device.index()));
    side.push_back(capture ? c10::cuda::getStreamFromPool(false, p.device.index()) : graphs_[B]->stream_on(p.device));
  }
  auto current_on = [&current](const at::Device& d) {
    for (const auto& s : current)
      if (s.device() == d) return s;
    return c10::cuda::getCurrentCUDAStream(d.index());
  };

  // Step 1 runs eagerly: it is a real step, and before a first capture it warms up, on the
  // capture streams themselves, everything a capture must not trigger for the first time
  // (allocator pools, cuBLAS workspaces for large batches).
  at::Tensor out, next;
  if (capture) {
    for (const auto& s : current) s.synchronize();  // once per batch size: order the side streams after queued work
    {
      const c10::cuda::CUDAMultiStreamGuard streams(side);
      std::tie(out, next) = run_step(x);
    }
    for (const auto& s : side) s.synchronize();
    // Made on a side stream, read on the caller's below: tell the allocator.
    used_on(out, current_on(out.device()));
    used_on(next, current_on(out.device()));
  } else {
    std::tie(out, next) = run_step(x);
  }
  for (int64_t b = 0; b < B; ++b) lengths_[b] += 1;
  result.select(1, 0).copy_(out);

  if (capture) {
    auto g = std::make_shared<Graph>();
    g->streams = side;
    for (const Part& part : parts_) {
      auto piece = std::make_unique<Graph::Piece>();
      piece->in = at::empty({B, hidden_}, x.options().device(part.device));
      const c10::cuda::CUDAStreamGuard stream_guard(g->stream_on(part.device));
      // Thread-local capture: with the default global mode, an unrelated thread's CUDA call
      // that is illegal during capture (cudaMalloc, a sync) would invalidate ours, or fail
      // itself. Our own thread makes no such call between begin and end.
      piece->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        std::tie(piece->out, piece->next) = run_part(part, *kernels_, piece->in);
      } catch (...) {
        // End the capture (stream, allocator pool) so the device stays usable, drop the
        // partial graphs, and let the original error through; the next call captures anew.
        try {
          piece->graph.capture_end();
        } catch (...) {
        }
        throw;
      }
      piece->graph.capture_end();
      g->pieces.push_back(std::move(piece));
    }
    // Capturing recorded the lengths increments without running them; nothing else changed.
    graphs_[B] = std::move(g);
  }

  if (steps == 1) return 1;
  // Hold the graphs: a failed check below drops graphs_.
  const std::shared_ptr<Graph> held = graphs_[B];
  Graph& g = *held;
  // The graphs' own self-check ("auto" mode, first replay after a capture): the same step eagerly
  // and replayed from the same cache must agree, or the decoder falls back to the ATen step.
  const bool check = capture && mode_ == "auto" && kernels_ == &custom_kernels() && self_check_enabled();
  // The replays run on the graphs' streams, after what is queued on the caller's (step 1, the
  // result's allocation); the caller's streams wait for them before returning. Tensors made on
  // the caller's streams that the replays read or write are marked as used on the graphs'.
  for (size_t d = 0; d < current.size(); ++d) order_after(current[d], g.streams[d]);
  const c10::cuda::CUDAStream out_stream = g.stream_on(output_device());
  used_on(out, out_stream);
  used_on(next, out_stream);
  used_on(result, out_stream);
  int64_t ran = steps;
  {
    // The graphs' streams are current on their devices: replays launch there, and ATen orders a
    // copy between two devices after both devices' current streams.
    const c10::cuda::CUDAMultiStreamGuard streams(g.streams);
    for (int64_t i = 1; i < steps; ++i) {
      const at::Tensor input = up_.has_value() ? next : out;
      at::Tensor eager;
      if (check && i == 1) {
        eager = std::get<0>(run_step(input)).clone();
        rewind_lengths_locked(B);
      }
      for (size_t k = 0; k < g.pieces.size(); ++k) {
        Graph::Piece& piece = *g.pieces[k];
        piece.in.copy_(k == 0 ? input : g.pieces[k - 1]->out);
        piece.graph.replay();
      }
      const Graph::Piece& last = *g.pieces.back();
      if (eager.defined()) {
        const double bound = self_check_bound(final_norm_.scalar_type());
        const double error = relative_error(last.out, eager);
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
      out = last.out;
      next = last.next;
      result.select(1, i).copy_(out);
    }
  }
  for (size_t d = 0; d < current.size(); ++d) order_after(g.streams[d], current[d]);
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
    for (const auto& piece : g->pieces)
      for (const auto* t : {&piece->in, &piece->out, &piece->next})
        if (t->defined()) n += static_cast<int64_t>(t->numel()) * t->element_size();
  }
  return n;
}

}  // namespace emu_fast
