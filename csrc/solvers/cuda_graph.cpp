// The relaxation's Picard steps captured as a CUDA graph and replayed (docs/engine.md "Relaxation",
// CUDA graphs). Compiled only with CUDA kernels (EQPROP_WITH_CUDA).
#ifdef EQPROP_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>

#include "solvers/relaxation.h"

namespace eqprop::solvers::detail {
namespace {

// Make `waiter` wait for the work queued so far on `done`.
void stream_wait(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& done) {
  cudaEvent_t ev;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(ev, done.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), ev, 0));
  C10_CUDA_CHECK(cudaEventDestroy(ev));
}

using MempoolId = decltype(at::cuda::graph_pool_handle());  // its namespace moved between torch versions

// Destroy a graph, releasing its hold on its memory pools. reset() may throw (an allocator
// assertion); the destructor calls reset() again and must not throw, so a graph whose reset
// failed is leaked rather than destroyed.
void drop_graph(std::unique_ptr<at::cuda::CUDAGraph>& g) {
  if (!g) return;
  try {
    g->reset();
    g.reset();
  } catch (...) {
    (void)g.release();
  }
}

// Per thread and device: a dedicated side stream, one graph memory pool, and the last graph
// captured into that pool.
//
// The stream is created here, not taken from torch's stream pool (getStreamFromPool hands the same
// few streams round-robin to every caller in the process, so other work could be queued on it
// during a capture); it is non-blocking, so it never synchronizes implicitly with the legacy
// default stream, and cuBLAS keeps one workspace for it.
//
// The pool is shared by the thread's successive captures, so repeated calls reuse its blocks
// instead of growing the allocator's reserve. A CUDAGraph counts references to its pool: its
// capture_begin increments the count of every allocator that routes captures to pools (the device
// caching allocator, and since torch 2.11 also the pinned-host allocator, under the same pool id),
// its destruction decrements them, and a capture_begin into a pool whose count fell to zero fails
// an internal assertion. Rather than holding the counts by hand (the host allocator's calls exist
// only in some torch versions), the previous graph is kept alive until the next capture into the
// pool has begun (it is destroyed once that capture has ended): the counts never reach zero between
// captures, in whatever allocators this torch version counts. The previous graph is never replayed again, so
// the new capture may reuse the blocks the previous one freed (the pool-sharing rule of CUDA graphs: replay
// in capture order).
//
// Invariant: `pool` is set exactly when `previous` holds a graph captured into it. A failed
// capture retires the pool (a fresh one is made by the next capture), because how far a failed
// capture_begin / capture_end got through their allocator calls depends on the torch version.
struct CaptureResources {
  cudaStream_t raw_stream = nullptr;
  std::optional<c10::cuda::CUDAStream> stream;
  std::optional<MempoolId> pool;
  std::unique_ptr<at::cuda::CUDAGraph> previous;

  CaptureResources() = default;
  CaptureResources(const CaptureResources&) = delete;
  CaptureResources& operator=(const CaptureResources&) = delete;
  ~CaptureResources() {  // at thread exit
    drop_graph(previous);
    if (raw_stream) (void)cudaStreamDestroy(raw_stream);  // pending work still completes
  }
  void retire_pool() {
    drop_graph(previous);
    pool.reset();
  }
};

// The calling thread's resources for the current device (the caller holds a CUDAGuard).
CaptureResources& capture_resources(c10::DeviceIndex device) {
  thread_local std::map<c10::DeviceIndex, std::unique_ptr<CaptureResources>> per_device;
  auto& res = per_device[device];
  if (!res) {
    auto r = std::make_unique<CaptureResources>();
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&r->raw_stream, cudaStreamNonBlocking));
    r->stream = c10::cuda::getStreamFromExternal(r->raw_stream, device);
    res = std::move(r);
  }
  return *res;
}

// The caller's stream waits for the side stream however the relaxation ends.
struct JoinStream {
  c10::cuda::CUDAStream caller, side;
  ~JoinStream() {
    try {
      stream_wait(caller, side);
    } catch (...) {  // an error already propagating says more
    }
  }
};

// Steps per graph at most: capture and instantiation grow with the nodes; past a few dozen steps
// launches are amortized anyway.
constexpr int64_t kMaxGraphSteps = 32;

// Undo what a failed capture left behind, whatever point it failed at: take the stream out of
// capture mode, remove the device allocator's routing to the pool (capture_end removes it only on
// success in some torch versions), clear the (non-sticky) CUDA error, and retire the pool.
void abandon_capture(CaptureResources& res, std::unique_ptr<at::cuda::CUDAGraph>& graph,
                     c10::DeviceIndex device, const MempoolId& pool) {
  try {
    graph->capture_end();
  } catch (...) {
  }
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
  } catch (...) {  // not routing any more: capture_end removed it, or capture_begin never added it
  }
  (void)cudaGetLastError();
  drop_graph(graph);
  res.retire_pool();
}

}  // namespace

// The first step runs eagerly on the side stream (lazy initialization — cuBLAS workspaces — must
// not happen inside a capture); then min(check_every, 32) steps are captured once and the graph is
// replayed, the host checking for running samples between replays; a tail shorter than a graph
// runs eagerly. A capture that fails (an operation of the field is not capturable) executes
// nothing, so no state changed: the capture is abandoned; with cuda_graph = auto the relaxation
// goes on eagerly with a warning, with on the error is raised.
// Returns the number of batched steps evaluated and whether a graph was replayed.
std::pair<int64_t, bool> relax_graphed(Relaxation& r, const RelaxOptions& opt, const at::Device& device) {
  const c10::cuda::CUDAGuard device_guard(device);
  CaptureResources& res = capture_resources(device.index());
  const JoinStream join{c10::cuda::getCurrentCUDAStream(), *res.stream};
  stream_wait(join.side, join.caller);
  const c10::cuda::CUDAStreamGuard stream_guard(*res.stream);
  bool replayed = false;
  int64_t t = 0;
  r.begin_group(0);
  r.step(t++);
  r.end_group(1);
  bool running = r.host_check();
  const int64_t k = std::min({opt.check_every, kMaxGraphSteps, opt.max_steps - t});
  if (running && k > 0) {
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    bool captured = false;
    // The thread's pool, or a fresh one (its first capture, or after a failure).
    const MempoolId pool = res.pool ? *res.pool : at::cuda::graph_pool_handle();
    try {
      // Thread-local mode: other threads' CUDA calls (the GIL is released) cannot break this
      // capture.
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      res.pool = pool;
      for (int64_t i = 0; i < k; ++i) r.step(t + i);
      graph->capture_end();
      // The new graph holds the pool's counts now. The previous one is destroyed only here, after
      // the capture: destroying an executable graph is no call to make while this thread captures.
      drop_graph(res.previous);
      res.previous = std::move(graph);  // held before anything else can throw
      captured = true;
    } catch (const std::exception& err) {
      abandon_capture(res, graph, device.index(), pool);
      if (opt.cuda_graph == CudaGraph::on) throw;
      TORCH_WARN("relax: capturing the step as a CUDA graph failed, relaxing eagerly instead: ", err.what());
    }
    for (; captured && running && opt.max_steps - t >= k; t += k) {
      r.begin_group(t);
      res.previous->replay();
      r.end_group(k);
      replayed = true;
      running = r.host_check();
    }
  }
  if (running) t = r.run_eager(t);  // the tail (everything, if the capture failed)
  return {t, replayed};
}

}  // namespace eqprop::solvers::detail
#endif  // EQPROP_WITH_CUDA
