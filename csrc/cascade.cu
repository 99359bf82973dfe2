#include "cascade.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace fastdf {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

struct Size5 { int64_t v[5]; };

__device__ __forceinline__ int64_t offset(const RowView& view, const int64_t idx[4]) {
  return idx[0] * view.stride[0] + idx[1] * view.stride[1] + idx[2] * view.stride[2] + idx[3] * view.stride[3];
}

// One warp per row: decode-time shapes have many short rows (G*N*H rows of D <= 256).
template <typename T>
__global__ void merge_states_kernel(RowView o_a, RowView lse_a, RowView o_b, RowView lse_b, RowView o,
                                    RowView lse, Size5 size, int64_t rows) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  int64_t idx[4];
  int64_t rest = row;
  for (int d = 3; d >= 0; --d) {
    idx[d] = rest % size.v[d];
    rest /= size.v[d];
  }
  const float la = reinterpret_cast<const float*>(lse_a.ptr)[offset(lse_a, idx)];
  const float lb = reinterpret_cast<const float*>(lse_b.ptr)[offset(lse_b, idx)];
  float wa = 0.f, wb = 0.f, out_lse = -INFINITY;  // both empty: zeros and -inf, as the contract says
  if (isnan(la) || isnan(lb)) {
    // Checked first: fmaxf drops a NaN (fmaxf(NaN, -inf) is -inf, which would pass a NaN
    // state off as an empty one). A NaN lse makes the merge NaN, as in the reference.
    wa = wb = out_lse = la + lb;
  } else if (la == INFINITY || lb == INFINITY) {
    // e^(lse - lse) is NaN here; the reference gives the +inf states the whole weight.
    const float share = (la == INFINITY && lb == INFINITY) ? 0.5f : 1.f;
    wa = la == INFINITY ? share : 0.f;
    wb = lb == INFINITY ? share : 0.f;
    out_lse = INFINITY;
  } else if (const float m = fmaxf(la, lb); m != -INFINITY) {
    wa = expf(la - m);
    wb = expf(lb - m);
    const float total = wa + wb;
    out_lse = m + logf(total);
    wa /= total;
    wb /= total;
  }
  // An empty state (lse -inf) contributes exactly 0, whatever its o holds (0 * NaN is NaN).
  const bool use_a = la != -INFINITY, use_b = lb != -INFINITY;
  const T* pa = reinterpret_cast<const T*>(o_a.ptr) + offset(o_a, idx);
  const T* pb = reinterpret_cast<const T*>(o_b.ptr) + offset(o_b, idx);
  T* po = reinterpret_cast<T*>(o.ptr) + offset(o, idx);
  for (int64_t j = lane; j < size.v[4]; j += 32) {
    const float va = use_a ? to_float(pa[j * o_a.stride[4]]) : 0.f;
    const float vb = use_b ? to_float(pb[j * o_b.stride[4]]) : 0.f;
    po[j * o.stride[4]] = from_float<T>(wa * va + wb * vb);
  }
  if (lane == 0) reinterpret_cast<float*>(lse.ptr)[offset(lse, idx)] = out_lse;
}

}  // namespace

void merge_attention_states(RowView o_a, RowView lse_a, RowView o_b, RowView lse_b, RowView o,
                            RowView lse, const int64_t size[5], DType dtype, cudaStream_t stream) {
  Size5 s;
  int64_t rows = 1;
  for (int d = 0; d < 5; ++d) s.v[d] = size[d];
  for (int d = 0; d < 4; ++d) rows *= size[d];
  if (rows == 0 || size[4] == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 2147483647LL) throw std::runtime_error("fastdf._C: merge_attention_states: too many rows");
  const dim3 grid(static_cast<unsigned>(blocks)), block(32 * kWarpsPerBlock);
  switch (dtype) {
    case DType::kFloat32:
      merge_states_kernel<float><<<grid, block, 0, stream>>>(o_a, lse_a, o_b, lse_b, o, lse, s, rows);
      break;
    case DType::kFloat16:
      merge_states_kernel<__half><<<grid, block, 0, stream>>>(o_a, lse_a, o_b, lse_b, o, lse, s, rows);
      break;
    case DType::kBFloat16:
      merge_states_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(o_a, lse_a, o_b, lse_b, o, lse, s, rows);
      break;
    default:
      throw std::invalid_argument("fastdf._C: merge_attention_states: unsupported dtype code");
  }
  check_launch("merge_states_kernel");
}

}  // namespace fastdf
