// CPU emulation of the slice of the CUDA runtime and device language that csrc/ uses.
//
// Each CUDA thread is a fiber (ucontext) that runs until it reaches a synchronisation
// point (__syncthreads*, a warp intrinsic, optionally an atomic); the scheduler in
// emu_runtime.cpp then picks the next fiber at random. Blocks of a grid run one after the
// other. Every rendezvous is checked: a block barrier must be reached by every live
// thread of the block at the same source line, a warp intrinsic's mask may only name
// lanes that arrive at the same intrinsic with the same mask. Violations, deadlocks and
// faults on the guard pages around device buffers end the launch with an error that
// cudaGetLastError() reports (so the launch functions' check_launch throws it).
//
// What this cannot model: two threads running at the same time between sync points
// (plain shared/global accesses never interleave here), the memory model, timing. See
// benches/notes/cuda_cpu.md.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaMemcpyKind { cudaMemcpyDefault = 4 };

extern "C" {
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream);
}

namespace emu {

struct Fiber;
extern thread_local Fiber* current;
uint3& thread_idx();
uint3& block_idx();
dim3& block_dim();
dim3& grid_dim();

// Block-wide barrier; returns the OR of every thread's predicate.
int block_barrier(int line, int pred, const char* what);
// Warp rendezvous: every lane of mask posts value; returns the values of the group (by lane).
const uint64_t* warp_sync(int line, unsigned mask, uint64_t value, int kind);
// Called before each atomic: a chance for another thread to run first.
void atomic_point();
void* static_shared(size_t size, size_t align);
void* dynamic_shared();
unsigned lane_id();
// Error if the source lane of a shuffle is not in mask.
void check_source_lane(int line, unsigned mask, int src);

enum WarpKind { kShfl = 1, kShflUp, kShflDown, kShflXor, kBallot, kMatchAny, kSyncwarp, kAll, kAny };

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp value");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T> inline T shfl(int line, int kind, unsigned mask, T v, int arg, int width) {
  const uint64_t* all = warp_sync(line, mask, to_bits(v), kind);
  const int lane = static_cast<int>(lane_id());
  const int seg = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case kShfl: src = seg + (arg & (width - 1)); break;
    case kShflUp: src = (lane - seg) >= arg ? lane - arg : lane; break;
    case kShflDown: src = (lane - seg) + arg < width ? lane + arg : lane; break;
    case kShflXor: src = ((lane ^ arg) & ~(width - 1)) == seg ? (lane ^ arg) : lane; break;
  }
  check_source_lane(line, mask, src);
  return from_bits<T>(all[src]);
}

template <typename T> inline T load_global(const T* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

#define __syncthreads() ((void)::emu::block_barrier(__LINE__, 0, "__syncthreads"))
#define __syncthreads_or(p) (::emu::block_barrier(__LINE__, (p) ? 1 : 0, "__syncthreads_or") != 0)
#define __syncwarp(...) ((void)::emu::warp_sync(__LINE__, ::emu::syncwarp_mask(__VA_ARGS__), 0, ::emu::kSyncwarp))
#define __shfl_sync(mask, v, src, ...) ::emu::shfl(__LINE__, ::emu::kShfl, mask, v, src, ::emu::width_arg(__VA_ARGS__))
#define __shfl_up_sync(mask, v, d, ...) ::emu::shfl(__LINE__, ::emu::kShflUp, mask, v, d, ::emu::width_arg(__VA_ARGS__))
#define __shfl_down_sync(mask, v, d, ...) \
  ::emu::shfl(__LINE__, ::emu::kShflDown, mask, v, d, ::emu::width_arg(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, o, ...) ::emu::shfl(__LINE__, ::emu::kShflXor, mask, v, o, ::emu::width_arg(__VA_ARGS__))
#define __ballot_sync(mask, p) ::emu::ballot(__LINE__, mask, (p) ? 1 : 0)
#define __all_sync(mask, p) (::emu::ballot(__LINE__, mask, (p) ? 1 : 0) == (mask))
#define __any_sync(mask, p) (::emu::ballot(__LINE__, mask, (p) ? 1 : 0) != 0u)
#define __match_any_sync(mask, v) ::emu::match_any(__LINE__, mask, v)

namespace emu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned m) { return m; }
inline int width_arg() { return 32; }
inline int width_arg(int w) { return w; }
inline unsigned ballot(int line, unsigned mask, int pred) {
  const uint64_t* all = warp_sync(line, mask, static_cast<uint64_t>(pred), kBallot);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l]) r |= 1u << l;
  return r;
}
template <typename T> inline unsigned match_any(int line, unsigned mask, T v) {
  const uint64_t* all = warp_sync(line, mask, to_bits(v), kMatchAny);
  const uint64_t mine = to_bits(v);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l] == mine) r |= 1u << l;
  return r;
}
}  // namespace emu

// Integer min/max overloads as CUDA's device headers provide them.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
using std::isinf;
using std::isnan;

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __float_as_uint(float x) { return ::emu::from_bits<unsigned>(::emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::emu::from_bits<float>(::emu::to_bits(x)); }
inline int __float_as_int(float x) { return ::emu::from_bits<int>(::emu::to_bits(x)); }
inline float __int_as_float(int x) { return ::emu::from_bits<float>(::emu::to_bits(x)); }
template <typename T> inline T __ldg(const T* p) { return ::emu::load_global(p); }

// Atomics: fibers never run at the same time, so a plain read-modify-write is atomic; the
// scheduling point before it lets another thread's atomic go first.
template <typename T> inline T atomicAdd(T* p, T v) {
  ::emu::atomic_point();
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T> inline T atomicMax(T* p, T v) {
  ::emu::atomic_point();
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
  ::emu::atomic_point();
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T> inline T atomicExch(T* p, T v) {
  ::emu::atomic_point();
  const T old = *p;
  *p = v;
  return old;
}
template <typename T> inline T atomicCAS(T* p, T cmp, T v) {
  ::emu::atomic_point();
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}

namespace emu {
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
  void run(void (*body)(void*), void* ctx) const;
  template <typename... P> struct Bound {
    const Launch* l;
    void (*k)(P...);
    template <typename... A> void operator()(A&&... args) const {
      // Kernel parameters are copied once per launch and passed by value to every thread.
      struct Ctx {
        void (*k)(P...);
        std::tuple<std::decay_t<P>...> args;
      } ctx{k, std::tuple<std::decay_t<P>...>(static_cast<P>(args)...)};
      l->run([](void* c) { auto* x = static_cast<Ctx*>(c); std::apply(x->k, x->args); }, &ctx);
    }
  };
  template <typename... P> Bound<P...> go(void (*k)(P...)) const { return Bound<P...>{this, k}; }
};
}  // namespace emu
