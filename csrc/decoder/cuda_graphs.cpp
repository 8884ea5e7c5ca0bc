// EmuDecoder::decode on CUDA: the decode step captured once per batch size into CUDA graphs
// and replayed, so a step costs one graph launch per device instead of hundreds of kernel
// launches from the host. A model on one GPU is one graph; a model split over GPUs is one graph
// per part (a device's run of layers; the head), with the hidden state copied between them.
// Compiled only into CUDA builds.
#include <ATen/ATen.h>
// (torch's header trips GCC 12's -Winterference-size; nothing of ours is affected)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/core/CachingHostAllocator.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <utility>

#include "decoder/decoder.h"
#include "ops/checked.h"
#include "ops/op_set.h"

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

// The stream this thread captures on for `device`: its own, created once and never destroyed
// (tensors recorded on it may outlive any decoder). A stream from ATen's shared pool could be
// handed to another thread at the same time, whose work would then be captured into our graph.
c10::cuda::CUDAStream capture_stream(const at::Device& device) {
  thread_local std::vector<std::pair<c10::DeviceIndex, cudaStream_t>> streams;
  for (const auto& [index, stream] : streams)
    if (index == device.index()) return c10::cuda::getStreamFromExternal(stream, index);
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  streams.emplace_back(device.index(), stream);
  return c10::cuda::getStreamFromExternal(stream, device.index());
}

// Captures run_part(part) into piece->graph on the current stream, in its own memory pool. On
// any failure, ends what the capture began (the stream's capture mode, the allocator's routing
// into the pool, the pool itself) so the process's allocator is left as it was, and returns the
// error's text; "" on success.
template <typename Run>
std::string capture_piece(at::cuda::CUDAGraph& graph, const at::Device& device, Run&& run) {
  const at::cuda::MempoolId_t pool = at::cuda::graph_pool_handle();
  // Thread-local capture: with the default global mode, an unrelated thread's CUDA call that is
  // illegal during capture (cudaMalloc, a sync) would invalidate ours, or fail itself. Our own
  // thread makes no such call between begin and end.
  graph.capture_begin(pool, cudaStreamCaptureModeThreadLocal);
  std::string error;
  try {
    run();
  } catch (const std::exception& e) {
    error = e.what();
  }
  try {
    graph.capture_end();
    if (error.empty()) return "";
  } catch (const std::exception& e) {
    if (error.empty()) error = e.what();
  }
  // capture_end failed or the capture was abandoned: release what capture_begin set up (each
  // may already be undone; a second undo throws, which is fine).
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device.index(), pool);
  } catch (...) {
  }
  try {
    at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(pool);
  } catch (...) {
  }
  try {
    c10::cuda::CUDACachingAllocator::releasePool(device.index(), pool);
  } catch (...) {
  }
  (void)cudaGetLastError();  // a failed capture leaves a (non-sticky) error behind
  return error;
}

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
  // A collective inside a graph needs a backend that can be captured (NCCL can); not yet verified
  // on GPUs, so a tensor-parallel step runs op by op.
  if (tp_size_ > 1) return false;
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
    side.push_back(capture ? capture_stream(p.device) : graphs_[B]->stream_on(p.device));
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
    std::string error;
    for (const Part& part : parts_) {
      auto piece = std::make_unique<Graph::Piece>();
      piece->in = at::empty({B, hidden_}, x.options().device(part.device));
      const c10::cuda::CUDAStreamGuard stream_guard(g->stream_on(part.device));
      error = capture_piece(piece->graph, part.device, [&] {
        std::tie(piece->out, piece->next) = run_part(part, *kernels_, piece->in);
      });
      if (!error.empty()) break;
      g->pieces.push_back(std::move(piece));
    }
    if (!error.empty()) {
      // Step 1 has run and is in `result`: rather than lose it (and the cache entry it wrote)
      // to an exception, go on without graphs; the caller runs the remaining steps eagerly.
      TORCH_WARN("emu_fast: capturing the decode step into a CUDA graph failed (", error,
                 "); this decoder runs its steps without CUDA graphs from now on (same results, slower)");
      use_cuda_graphs_ = false;
      return 1;
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
  // However this function leaves (an exception included), the caller's streams wait for the
  // replays before anything else of theirs touches the cache, the lengths or `held`'s buffers.
  struct OrderBack {
    const std::vector<c10::cuda::CUDAStream>& graphs;
    const std::vector<c10::cuda::CUDAStream>& callers;
    ~OrderBack() {
      for (size_t d = 0; d < callers.size(); ++d) {
        try {
          order_after(graphs[d], callers[d]);
        } catch (...) {
        }
      }
    }
  } order_back{g.streams, current};
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
      at::Tensor eager, eager_next;
      if (check && i == 1) {
        auto [o, n] = run_step(input);
        eager = o.clone();
        eager_next = n.clone();
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
        const double error = std::max(relative_error(last.out, eager), relative_error(last.next, eager_next));
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
