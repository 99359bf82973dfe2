// Sorting-free sampling from logits: temperature, top-k, top-p, min-p (DESIGN.md §4).
#pragma once

#include "common.h"

namespace fastdf {

// Per-row knobs: a pointer to one value per logits row, or null to use the scalar.
struct SampleKnobs {
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* min_p;
  float temperature_value;
  int64_t top_k_value;
  float top_p_value;
  float min_p_value;
};

// Status codes written per output (fastdf/ops/sampling.py mirrors them).
enum SampleStatus : int32_t { kSampleOk = 0, kSampleNonFinite = 1, kSampleNoFiniteLogit = 2 };

// One thread block per output. Output i samples logits row indices[i] (i when indices is
// null) with uniform draw uniforms[i]. logits: rows x vocab with element strides
// (row_stride, col_stride). out: int64 token ids (-1 where status != 0), status: int32.
// candidate_cap < 0 uses the built-in capacity; smaller values force the exact global
// path (for tests).
void sample_from_logits(uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t col_stride,
                        DType dtype, const float* uniforms, const int64_t* indices, int64_t n_out,
                        SampleKnobs knobs, int64_t* out, int32_t* status, int candidate_cap,
                        cudaStream_t stream);

}  // namespace fastdf
