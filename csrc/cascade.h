// Cascade (shared-prefix) attention helpers.
#pragma once

#include "common.h"

namespace fastdf {

// A strided view over up to four leading dims plus the head dim (for o) or none (lse).
struct RowView {
  uintptr_t ptr;
  int64_t stride[5];  // leading dims 0..3, then the head dim
};

// o = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b).
// size[0..3] are the leading dims (padded with 1s), size[4] the head dim. lse views are fp32.
void merge_attention_states(RowView o_a, RowView lse_a, RowView o_b, RowView lse_b, RowView o,
                            RowView lse, const int64_t size[5], DType dtype, cudaStream_t stream);

}  // namespace fastdf
