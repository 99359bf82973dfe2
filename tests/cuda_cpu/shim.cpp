// extern "C" entry points for ctypes: the same fastdf:: launch functions, with the same
// argument conversions, as csrc/*_bind.cpp (pointers travel as integers). Each returns 0,
// or 1 with the error in fdf_last_error() (what the binding would raise).
#include <cstdint>
#include <exception>
#include <string>

#include "cascade.h"
#include "moe.h"
#include "sampling.h"

namespace {
std::string error;
template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
template <typename F> int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    error = e.what();
    return 1;
  }
}
fastdf::RowView view(uintptr_t p, const int64_t* strides) {
  fastdf::RowView v{p, {0, 0, 0, 0, 0}};
  for (int i = 0; i < 5; ++i) v.stride[i] = strides[i];
  return v;
}
}  // namespace

extern "C" {

const char* fdf_last_error() { return error.c_str(); }

int fdf_sample_from_logits(uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t col_stride,
                           int dtype, uintptr_t uniforms, uintptr_t indices, int64_t n_out, uintptr_t temperature,
                           uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, float temperature_value,
                           int64_t top_k_value, float top_p_value, float min_p_value, uintptr_t out, uintptr_t status,
                           int candidate_cap) {
  return guarded([&] {
    fastdf::require_device(0);
    const fastdf::SampleKnobs knobs{ptr<const float>(temperature), ptr<const int64_t>(top_k),
                                    ptr<const float>(top_p),       ptr<const float>(min_p),
                                    temperature_value,             top_k_value,
                                    top_p_value,                   min_p_value};
    fastdf::sample_from_logits(logits, rows, vocab, row_stride, col_stride, static_cast<fastdf::DType>(dtype),
                               ptr<const float>(uniforms), ptr<const int64_t>(indices), n_out, knobs,
                               ptr<int64_t>(out), ptr<int32_t>(status), candidate_cap, nullptr);
  });
}

int fdf_moe_route(uintptr_t ids, int ids_int32, int64_t n, int E, uintptr_t order, uintptr_t inverse, uintptr_t offs,
                  uintptr_t workspace) {
  return guarded([&] {
    fastdf::require_device(0);
    fastdf::moe_route(ptr<const void>(ids), ids_int32 != 0, n, E, ptr<int32_t>(order), ptr<int32_t>(inverse),
                      ptr<int32_t>(offs), ptr<int32_t>(workspace), nullptr);
  });
}

int fdf_moe_gather(uintptr_t x, int64_t sx0, int64_t sx1, uintptr_t rows, int64_t S, int64_t H, uintptr_t out,
                   int64_t so0, int64_t so1, int elem_size) {
  return guarded([&] {
    fastdf::require_device(0);
    fastdf::moe_gather(ptr<const void>(x), sx0, sx1, ptr<const int32_t>(rows), S, H, ptr<void>(out), so0, so1,
                       elem_size, nullptr);
  });
}

int fdf_moe_combine(uintptr_t y, int64_t sy0, int64_t sy1, uintptr_t inverse, int64_t T, int K, int64_t H, uintptr_t w,
                    uintptr_t out, int64_t so0, int64_t so1, int dtype) {
  return guarded([&] {
    fastdf::require_device(0);
    fastdf::moe_combine(ptr<const void>(y), sy0, sy1, ptr<const int32_t>(inverse), T, K, H, ptr<const float>(w),
                        ptr<void>(out), so0, so1, static_cast<fastdf::DType>(dtype), nullptr);
  });
}

// Each view: a pointer and five strides (leading dims 0..3, then the head dim).
int fdf_merge_attention_states(uintptr_t o_a, const int64_t* s_oa, uintptr_t lse_a, const int64_t* s_la,
                               uintptr_t o_b, const int64_t* s_ob, uintptr_t lse_b, const int64_t* s_lb, uintptr_t o,
                               const int64_t* s_o, uintptr_t lse, const int64_t* s_l, const int64_t* size,
                               int dtype) {
  return guarded([&] {
    fastdf::require_device(0);
    fastdf::merge_attention_states(view(o_a, s_oa), view(lse_a, s_la), view(o_b, s_ob), view(lse_b, s_lb),
                                   view(o, s_o), view(lse, s_l), size, static_cast<fastdf::DType>(dtype), nullptr);
  });
}

}  // extern "C"
