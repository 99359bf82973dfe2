// Routing for the routed-experts layer: sort (token, slot) pairs by expert, gather rows
// into expert order, combine weighted expert outputs back per token. Deterministic: no
// floating-point atomics anywhere; the sort is stable.
#pragma once

#include "common.h"

namespace fastdf {

// Pairs per block of the routing sort (fastdf/ops/moe.py: _ROUTE_CHUNK).
constexpr int kRouteChunk = 1024;

// ids: n expert ids (int64, or int32 if ids_int32); ids outside [0, E) sort to the tail.
// Writes order[n] (sorted position -> pair), inverse[n] (pair -> sorted position) and
// offs[E] (cumulative row ends), all int32. workspace: ceil(n / kRouteChunk) * (E + 1) int32.
void moe_route(const void* ids, bool ids_int32, int64_t n, int E, int32_t* order, int32_t* inverse,
               int32_t* offs, int32_t* workspace, cudaStream_t stream);

// out[s, :] = x[rows[s], :] for s < S; elements of elem_size bytes (2 or 4), strides in elements.
void moe_gather(const void* x, int64_t sx0, int64_t sx1, const int32_t* rows, int64_t S, int64_t H, void* out,
                int64_t so0, int64_t so1, int elem_size, cudaStream_t stream);

// out[t, :] = sum_k w[t, k] * y[inverse[t, k], :] in fp32, slots in order; w fp32 [T, K]
// contiguous, or null for weight 1.
void moe_combine(const void* y, int64_t sy0, int64_t sy1, const int32_t* inverse, int64_t T, int K, int64_t H,
                 const float* w, void* out, int64_t so0, int64_t so1, DType dtype, cudaStream_t stream);

}  // namespace fastdf
