#include "moe.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastdf {
namespace {

template <typename T> __device__ __forceinline__ float load_float(const T* p) { return static_cast<float>(*p); }
template <> __device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <typename T> __device__ __forceinline__ void store_float(T* p, float x) { *p = static_cast<T>(x); }
template <> __device__ __forceinline__ void store_float(__half* p, float x) { *p = __float2half_rn(x); }
template <> __device__ __forceinline__ void store_float(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Bucket of pair p: its expert, or E for ids out of range (they sort to the tail).
__device__ __forceinline__ int bucket(const void* ids, bool ids_int32, int64_t p, int E) {
  const int64_t e = ids_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(ids)[p])
                              : static_cast<const int64_t*>(ids)[p];
  return (e >= 0 && e < E) ? static_cast<int>(e) : E;
}

// 1. Per-chunk histogram over E + 1 buckets. Integer counts: shared-memory atomics give the
// same result in any order.
__global__ void route_histogram(const void* ids, bool ids_int32, int64_t n, int E, int32_t* hist) {
  extern __shared__ int32_t counts[];
  for (int b = threadIdx.x; b <= E; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kRouteChunk;
  for (int i = threadIdx.x; i < kRouteChunk; i += blockDim.x) {
    const int64_t p = base + i;
    if (p < n) atomicAdd(&counts[bucket(ids, ids_int32, p, E)], 1);
  }
  __syncthreads();
  int32_t* row = hist + static_cast<int64_t>(blockIdx.x) * (E + 1);
  for (int b = threadIdx.x; b <= E; b += blockDim.x) row[b] = counts[b];
}

// 2. hist[c][b] <- first sorted position of chunk c's pairs in bucket b; offs[e] <- row end.
// One block: thread b walks the chunks of its bucket; one thread scans the bucket totals.
__global__ void route_scan(int64_t chunks, int E, int32_t* hist, int32_t* offs) {
  extern __shared__ int32_t start[];
  for (int b = threadIdx.x; b <= E; b += blockDim.x) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t* cell = hist + c * (E + 1) + b;
      const int32_t v = *cell;
      *cell = running;
      running += v;
    }
    start[b] = running;  // bucket total for now
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t acc = 0;
    for (int b = 0; b <= E; ++b) {
      const int32_t total = start[b];
      start[b] = acc;
      acc += total;
      if (b < E) offs[b] = acc;
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) {
    for (int64_t c = 0; c < chunks; ++c) hist[c * (E + 1) + b] += start[b];
  }
}

// 3. Stable placement: one warp per chunk walks its pairs in order, 32 at a time; lanes
// with the same bucket rank themselves by lane order (__match_any_sync), then the lowest
// such lane advances the bucket's cursor.
__global__ void route_place(const void* ids, bool ids_int32, int64_t n, int E, const int32_t* hist,
                            int32_t* order, int32_t* inverse) {
  extern __shared__ int32_t cursor[];
  const int lane = threadIdx.x;
  const int32_t* row = hist + static_cast<int64_t>(blockIdx.x) * (E + 1);
  for (int b = lane; b <= E; b += 32) cursor[b] = row[b];
  __syncwarp();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kRouteChunk;
  const unsigned lower = (1u << lane) - 1u;
  for (int step = 0; step < kRouteChunk; step += 32) {
    const int64_t p = base + step + lane;
    const bool valid = p < n;
    const int b = valid ? bucket(ids, ids_int32, p, E) : E + 1;
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    if (valid) {
      const int32_t pos = cursor[b] + __popc(peers & lower);
      order[pos] = static_cast<int32_t>(p);
      inverse[p] = pos;
    }
    __syncwarp();
    if (valid && lane == __ffs(peers) - 1) cursor[b] += __popc(peers);
    __syncwarp();
  }
}

template <typename T>
__global__ void gather_rows(const T* x, int64_t sx0, int64_t sx1, const int32_t* rows, int64_t S, int64_t H, T* out,
                            int64_t so0, int64_t so1) {
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const T* src = x + static_cast<int64_t>(rows[s]) * sx0;
    T* dst = out + s * so0;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[h * so1] = src[h * sx1];
  }
}

template <typename T>
__global__ void combine_rows(const T* y, int64_t sy0, int64_t sy1, const int32_t* inverse, int64_t T_, int K,
                             int64_t H, const float* w, T* out, int64_t so0, int64_t so1) {
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) {
        const int64_t s = inverse[t * K + k];
        const float v = load_float(y + s * sy0 + h * sy1);
        acc += w ? w[t * K + k] * v : v;
      }
      store_float(out + t * so0 + h * so1, acc);
    }
  }
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < 65535 ? (rows > 0 ? rows : 1) : 65535);
}

}  // namespace

void moe_route(const void* ids, bool ids_int32, int64_t n, int E, int32_t* order, int32_t* inverse, int32_t* offs,
               int32_t* workspace, cudaStream_t stream) {
  if (E < 1) throw std::invalid_argument("fastdf._C: moe_route: E must be >= 1");
  if (n > 2147483647LL) throw std::invalid_argument("fastdf._C: moe_route: more than 2^31 pairs");
  const size_t smem = static_cast<size_t>(E + 1) * sizeof(int32_t);
  if (smem > 48 * 1024) throw std::invalid_argument("fastdf._C: moe_route: too many experts (max 12287)");
  if (n == 0) {
    check_cuda(cudaMemsetAsync(offs, 0, sizeof(int32_t) * E, stream), "cudaMemsetAsync");
    return;
  }
  const int64_t chunks = (n + kRouteChunk - 1) / kRouteChunk;
  route_histogram<<<static_cast<unsigned>(chunks), 256, smem, stream>>>(ids, ids_int32, n, E, workspace);
  check_launch("route_histogram");
  route_scan<<<1, 1024, smem, stream>>>(chunks, E, workspace, offs);
  check_launch("route_scan");
  route_place<<<static_cast<unsigned>(chunks), 32, smem, stream>>>(ids, ids_int32, n, E, workspace, order, inverse);
  check_launch("route_place");
}

void moe_gather(const void* x, int64_t sx0, int64_t sx1, const int32_t* rows, int64_t S, int64_t H, void* out,
                int64_t so0, int64_t so1, int elem_size, cudaStream_t stream) {
  if (S == 0 || H == 0) return;
  const unsigned grid = grid_for(S);
  if (elem_size == 2) {
    gather_rows<uint16_t><<<grid, 256, 0, stream>>>(static_cast<const uint16_t*>(x), sx0, sx1, rows, S, H,
                                                    static_cast<uint16_t*>(out), so0, so1);
  } else if (elem_size == 4) {
    gather_rows<uint32_t><<<grid, 256, 0, stream>>>(static_cast<const uint32_t*>(x), sx0, sx1, rows, S, H,
                                                    static_cast<uint32_t*>(out), so0, so1);
  } else {
    throw std::invalid_argument("fastdf._C: moe_gather: element size must be 2 or 4 bytes");
  }
  check_launch("gather_rows");
}

void moe_combine(const void* y, int64_t sy0, int64_t sy1, const int32_t* inverse, int64_t T, int K, int64_t H,
                 const float* w, void* out, int64_t so0, int64_t so1, DType dtype, cudaStream_t stream) {
  if (T == 0 || H == 0) return;
  const unsigned grid = grid_for(T);
  switch (dtype) {
    case DType::kFloat32:
      combine_rows<float><<<grid, 256, 0, stream>>>(static_cast<const float*>(y), sy0, sy1, inverse, T, K, H, w,
                                                    static_cast<float*>(out), so0, so1);
      break;
    case DType::kFloat16:
      combine_rows<__half><<<grid, 256, 0, stream>>>(static_cast<const __half*>(y), sy0, sy1, inverse, T, K, H, w,
                                                     static_cast<__half*>(out), so0, so1);
      break;
    case DType::kBFloat16:
      combine_rows<__nv_bfloat16><<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(y), sy0, sy1, inverse,
                                                            T, K, H, w, static_cast<__nv_bfloat16*>(out), so0, so1);
      break;
    default:
      throw std::invalid_argument("fastdf._C: moe_combine: unsupported dtype code");
  }
  check_launch("combine_rows");
}

}  // namespace fastdf
