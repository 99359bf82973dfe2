// Sorting-free sampling: one thread block per output row, no sort of the vocabulary.
//
// Semantics (DESIGN.md §4, the torch reference in fastdf/ops/sampling.py is the spec):
// with m the row's largest logit and e_i = exp((x_i - m) / T), the kept set is
// {x_i >= tau}, tau = max(tau_k, tau_p, tau_min): tau_k the k-th largest logit, tau_p the
// largest logit t >= tau_k whose upper set {x >= t} holds at least top_p of the top-k
// mass, tau_min = m + T log(min_p). Ties (equal logits) are always kept or dropped
// together. The token is the first index (vocabulary order) whose running kept mass
// exceeds u * S (S the kept mass, u the caller's uniform draw).
//
// Passes over the row:
//  A  max, the online softmax sum Z, a non-finite flag, and a candidate list in shared
//     memory: the indices of every logit within 16 T of the running maximum and above a
//     floor. When the list nears capacity (early on, before the row's head is seen, the
//     running maximum admits much of the bulk) the block compacts it, raising the floor;
//     the list always holds every logit >= max(floor, max - 16 T). Z is summed in base 2
//     on logits scaled by log2(e) / T (scan_sample: ~11 SASS instructions per 16-bit
//     logit, 17 per fp32 logit on sm_90a; fastdf.bench.compile measures it). Greedy rows
//     (T = 0) take max, first argmax and the flag only.
//  -  thresholds by radix select (11/11/10-bit digits, count and mass histograms) over
//     the candidates when the answer provably lies among them (no overflow; for top-k at
//     least k candidates; for top-p the candidates' mass reaches the target), else over
//     the whole row (one pass per digit: exact, slower).
//  D  inverse CDF in vocabulary order. When the kept set lies among the candidates and
//     holds at most kMaxKept tokens (top-p / top-k / min-p on a peaked distribution, the
//     usual case), its indices are sorted in shared memory and scanned there: no second
//     read of the row. Otherwise the row is read again with early exit: per chunk a
//     block scan of the kept mass; the chunk whose total crosses u * S is searched.
// Float prefix sums from a block scan are not exactly monotone, so the pick is the first
// index with positive weight whose prefix exceeds the target, and when rounding leaves
// no such index, the last index with positive weight: the result is always a kept token.
#include "sampling.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstring>

namespace fastdf {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;  // 11-bit digits (the last of three digits has 10 bits)
constexpr int kMaxCandidates = 6144;
constexpr int kMaxKept = 1024;  // kept sets up to this size are drawn from in shared memory
constexpr float kCandidateNats = 16.f;  // candidates span this many temperatures below the max: e^-16 ~ 1e-7
constexpr float kMinSpanT = 2.f;        // a compaction never cuts closer than this to the running max

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Order-preserving key of a float: larger float, larger key; -0 and +0 share one key.
__device__ __forceinline__ uint32_t float_key(float x) {
  if (x == 0.f) x = 0.f;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

constexpr float kLog2e = 1.4426950408889634f;
// Largest |m s| the first pass sums with: ms = m s rounded is off by at most half an ulp,
// <= 0.5 here, so every 2^(x s - ms) stays within sqrt(2) of e^((x - m) / T).
constexpr float kMaxScaled = 16777216.f;  // 2^24

// e^(d / T) = 2^(d s), s = log2(e) / T, for d = x - max <= 0; d == 0 gives 1 even when s
// overflows. Every pass after the first weighs tokens with this.
__device__ __forceinline__ float weight(float d, float s) { return d == 0.f ? 1.f : exp2f(d * s); }

// 2^x with a subnormal result flushed to zero: on the device one MUFU.EX2 (exp2f adds a
// three-instruction range fix-up for subnormal results). Only the first pass's running sum
// uses it, where a term below 2^-126 of the row's largest cannot change the sum.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

struct Shared {
  union {
    uint32_t count[kBins];  // radix histograms
    int kept[kBins];        // afterwards: the kept tokens' indices
  };
  float mass[kBins];
  int cand[kMaxCandidates];  // candidate token indices
  uint32_t scan_c[kWarps];
  float scan_m[kWarps];
  float red_max[kWarps];
  int red_arg[kWarps];
  float red_z[kWarps];
  int red_bad[kWarps];
  uint32_t run_max_key;
  float cand_floor;  // candidates: every logit >= max(floor, running max - kCandidateNats T)
  int n_cand;
  int n_kept;
  int pick;
  int result;
  uint32_t above_c;
  float above_m;
  float m;
  int argmax;
  float z;
  int bad;
  int wide;
};

// Inclusive scan over the lanes of a warp of (count, mass) pairs.
__device__ __forceinline__ void warp_inclusive_scan(uint32_t& c, float& m, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t tc = __shfl_up_sync(0xffffffffu, c, o);
    const float tm = __shfl_up_sync(0xffffffffu, m, o);
    if (lane >= o) {
      c += tc;
      m += tm;
    }
  }
}

// Exclusive scan over threads (thread order) of (count, mass) pairs, plus the totals.
__device__ __forceinline__ void block_exclusive_scan(uint32_t c, float m, uint32_t& ex_c, float& ex_m,
                                                     uint32_t& tot_c, float& tot_m, Shared& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t ic = c;
  float im = m;
  warp_inclusive_scan(ic, im, lane);
  uint32_t wc = __shfl_up_sync(0xffffffffu, ic, 1);
  float wm = __shfl_up_sync(0xffffffffu, im, 1);
  if (lane == 0) {
    wc = 0u;
    wm = 0.f;
  }
  if (lane == 31) {
    sm.scan_c[warp] = ic;
    sm.scan_m[warp] = im;
  }
  __syncthreads();
  if (warp == 0) {
    uint32_t sc = lane < kWarps ? sm.scan_c[lane] : 0u;
    float sv = lane < kWarps ? sm.scan_m[lane] : 0.f;
    warp_inclusive_scan(sc, sv, lane);
    if (lane < kWarps) {
      sm.scan_c[lane] = sc;
      sm.scan_m[lane] = sv;
    }
  }
  __syncthreads();
  ex_c = (warp ? sm.scan_c[warp - 1] : 0u) + wc;
  ex_m = (warp ? sm.scan_m[warp - 1] : 0.f) + wm;
  tot_c = sm.scan_c[kWarps - 1];
  tot_m = sm.scan_m[kWarps - 1];
  __syncthreads();  // the scratch is reused by the next call
}

__device__ __forceinline__ float block_sum(float v, Shared& sm) {
  uint32_t ec, tc;
  float em, tm;
  block_exclusive_scan(0u, v, ec, em, tc, tm, sm);
  return tm;
}

__device__ __forceinline__ int block_max_int(int v, Shared& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) sm.red_arg[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? sm.red_arg[lane] : INT_MIN;
#pragma unroll
    for (int o = 16; o; o >>= 1) w = max(w, __shfl_xor_sync(0xffffffffu, w, o));
    if (lane == 0) sm.result = w;
  }
  __syncthreads();
  const int r = sm.result;
  __syncthreads();
  return r;
}

// The warp's (max, first argmax) in every lane; non-finite flags are OR-ed.
__device__ __forceinline__ void warp_merge_argmax(float& m, int& arg, int& bad) {
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, o);
    const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    arg = om > m ? oa : (m > om ? arg : min(arg, oa));
    m = fmaxf(m, om);
  }
}

// The first pass's running state while sampling: m the largest logit seen, ms = m * s
// rounded (0 while m is -inf; always recomputed from m, so equal m give equal ms), z the
// sum of 2^(x s - ms) over the logits seen. 2^(x s - ms) = e^((x - m) / T) times the
// common factor 2^(m s - ms), which the end of the pass takes out. wide: m * s left the
// float range or kMaxScaled (a +inf logit, or large logits at a tiny temperature): z is
// recomputed from differences.
struct Running {
  float m = -INFINITY, ms = 0.f, z = 0.f;
  int wide = 0;

  // Fold in (om, oz), a state with the same s; its ms is om * s.
  __device__ __forceinline__ void merge(float om, float oz, float s) {
    if (om > m) {
      const float oms = om * s;
      z = (m == -INFINITY ? 0.f : z * exp2f(ms - oms)) + oz;
      m = om;
      ms = oms;
    } else if (om > -INFINITY) {
      z += oz * exp2f(om * s - ms);
    }
  }
};

__device__ __forceinline__ void warp_merge_running(Running& r, float s) {
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, r.m, o);
    const float oz = __shfl_xor_sync(0xffffffffu, r.z, o);
    r.wide |= __shfl_xor_sync(0xffffffffu, r.wide, o);
    r.merge(om, oz, s);
  }
}

// A logits row; each thread reads 16 bytes of consecutive elements per chunk.
template <typename T, bool kVec>
struct Row {
  static constexpr int kItems = 16 / sizeof(T);
  const T* __restrict__ ptr;
  int64_t vocab;
  int64_t stride;

  __device__ __forceinline__ float at(int64_t i) const { return to_float(ptr[i * stride]); }

  // The 16 bytes at base, which lie inside the row (kVec rows only).
  __device__ __forceinline__ uint4 load_raw(int64_t base) const {
    return __ldg(reinterpret_cast<const uint4*>(ptr + base));
  }

  __device__ __forceinline__ static void unpack(const uint4& raw, float (&x)[kItems]) {
    // Copy out rather than read raw through a T*: that would be type punning, undefined
    // behaviour that g++ -O2 miscompiles (tests/cuda_cpu/test_sampling_cpu.py).
    T v[kItems];
    memcpy(v, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < kItems; ++j) x[j] = to_float(v[j]);
  }

  __device__ __forceinline__ void load(int64_t base, float (&x)[kItems]) const {
    if (kVec && base + kItems <= vocab) {
      unpack(load_raw(base), x);
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j) x[j] = base + j < vocab ? to_float(ptr[(base + j) * stride]) : -INFINITY;
    }
  }
};

// Sources of (key, logit, index) triples: the candidate list (indices into the row, whose
// logits come back from L2), or the whole row.
template <typename T, bool kVec>
struct Candidates {
  Row<T, kVec> row;
  const int* idx;
  int n;
  template <typename F> __device__ __forceinline__ void for_each(F&& f) const {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int j = idx[i];
      const float x = row.at(j);
      f(float_key(x), x, j);
    }
  }
};

template <typename T, bool kVec>
struct RowElements {
  Row<T, kVec> row;
  template <typename F> __device__ __forceinline__ void for_each(F&& f) const {
    constexpr int N = Row<T, kVec>::kItems;
    for (int64_t chunk = 0; chunk < row.vocab; chunk += static_cast<int64_t>(kThreads) * N) {
      const int64_t base = chunk + static_cast<int64_t>(threadIdx.x) * N;
      float x[N];
      row.load(base, x);
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (base + j < row.vocab) f(float_key(x[j]), x[j], static_cast<int>(base + j));
    }
  }
};

// Raise the candidates' floor and drop what falls below it. The cut is the block's
// maximum so far minus the span, halved (down to kMinSpanT temperatures) until at most
// kBins candidates survive. Early in the row, before its head is seen, the maximum sits
// in the bulk and this floor is low; once the head shows up, max - span overtakes it.
// The floor only rises and the maximum only grows, so the list always holds every logit
// >= max(floor, final max - span). If even the smallest span keeps too many, the list is
// marked overflowed (the exact whole-row path takes over). Block-wide.
template <typename T, bool kVec>
__device__ void compact_candidates(const Row<T, kVec>& row, float span, float temperature, int cap, Shared& sm) {
  const int n = sm.n_cand;
  if (n > cap) return;  // overflowed (every thread reads the same: the count only grows)
  const float top = key_float(sm.run_max_key);
  const float low = sm.cand_floor;
  float cut = low;
  int kept = 0;
  for (float s = span;; s *= 0.5f) {
    cut = fmaxf(low, top - s);
    __syncthreads();
    if (threadIdx.x == 0) sm.n_kept = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int j = sm.cand[i];
      if (row.at(j) >= cut) {
        const int pos = atomicAdd(&sm.n_kept, 1);
        if (pos < kBins) sm.kept[pos] = j;
      }
    }
    __syncthreads();
    kept = sm.n_kept;
    if (kept <= kBins || s <= kMinSpanT * temperature) break;
  }
  if (kept <= kBins) {
    for (int i = threadIdx.x; i < kept; i += kThreads) sm.cand[i] = sm.kept[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm.n_cand = kept <= kBins ? kept : cap + 1;
    sm.cand_floor = cut;
  }
  __syncthreads();
}

// Pass A when greedy (temperature 0): m, the first argmax and the non-finite flag.
template <typename T, bool kVec>
__device__ void scan_greedy(const Row<T, kVec>& row, Shared& sm) {
  constexpr int N = Row<T, kVec>::kItems;
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float tmax = -INFINITY;
  int targ = INT_MAX, bad = 0;
  float x[N], next[N];
  row.load(static_cast<int64_t>(threadIdx.x) * N, next);
  for (int64_t chunk = 0; chunk < row.vocab; chunk += kChunk) {
    const int64_t base = chunk + static_cast<int64_t>(threadIdx.x) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = next[j];
    if (chunk + kChunk < row.vocab) row.load(base + kChunk, next);  // in flight while this chunk is processed
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (base + j < row.vocab) {
        if (isnan(x[j]) || x[j] == INFINITY) bad = 1;
        if (x[j] > tmax) {
          tmax = x[j];
          targ = static_cast<int>(base + j);
        }
      }
    }
  }
  warp_merge_argmax(tmax, targ, bad);
  if (lane == 0) {
    sm.red_max[warp] = tmax;
    sm.red_arg[warp] = targ;
    sm.red_bad[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    float wm = lane < kWarps ? sm.red_max[lane] : -INFINITY;
    int wa = lane < kWarps ? sm.red_arg[lane] : INT_MAX;
    int wb = lane < kWarps ? sm.red_bad[lane] : 0;
    warp_merge_argmax(wm, wa, wb);
    if (lane == 0) {
      sm.m = wm;
      sm.argmax = wa;
      sm.bad = wb;
    }
  }
  __syncthreads();
}

// Pass A when sampling: m, z = sum of e^((x - m) / T), the non-finite flag and the
// candidate list, in shared memory. The hot loop; per chunk of N logits a thread does
//  - one maximum over the chunk, and at most one rescale of z (only when the chunk raises
//    the thread's running max: after the row's head, rarely);
//  - per logit one FFMA (x s - ms: the logits are scaled by s = log2(e) / T in the same
//    instruction), one base-2 exponential and one add; no branch, no compare: a NaN makes
//    z NaN, a +inf makes m * s infinite (wide), and both are found after the loop;
//  - one warp vote: is any of the warp's logits a candidate, or did a running max rise?
//    Only then are the candidates appended (a warp-wide prefix sum of the lanes' counts,
//    one atomic) and the block's running max raised;
//  - one block vote on compacting the list.
// Contiguous 16-byte-aligned rows keep two chunks in flight (raw 16-byte loads) while one
// is processed.
template <typename T, bool kVec>
__device__ void scan_sample(const Row<T, kVec>& row, float temperature, float s, int cap, Shared& sm) {
  constexpr int N = Row<T, kVec>::kItems;
  // 32-bit offsets: the launch refuses vocabularies of INT_MAX or more.
  constexpr int kChunk = kThreads * N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float span = kCandidateNats * temperature;
  const int vote_above = cap - kChunk;
  Running r;
  auto step = [&](const float (&x)[N], int base) {
    float cmax = x[0];
#pragma unroll
    for (int j = 1; j < N; ++j) cmax = fmaxf(cmax, x[j]);
    const bool raised = cmax > r.m;
    if (raised) {
      const float ms = cmax * s;
      r.z = r.m == -INFINITY ? 0.f : r.z * exp2_ftz(r.ms - ms);
      r.wide |= !(fabsf(ms) <= kMaxScaled);
      r.m = cmax;
      r.ms = ms;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) r.z += exp2_ftz(fmaf(x[j], s, -r.ms));
    // Candidates: every logit >= max(floor, running max - span). The thread's running max
    // already includes this chunk: it is at most the row's max, so nothing the final list
    // needs is dropped.
    const float block_max = key_float(*reinterpret_cast<volatile uint32_t*>(&sm.run_max_key));
    const float low = *reinterpret_cast<volatile float*>(&sm.cand_floor);
    const float cut = fmaxf(low, fmaxf(block_max, r.m) - span);
    int after = INT_MIN;  // the list's length after this warp's appends (none: INT_MIN)
    if (__ballot_sync(0xffffffffu, raised || cmax >= cut)) {
      float wmax = r.m;
#pragma unroll
      for (int o = 16; o; o >>= 1) wmax = fmaxf(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
      if (lane == 0 && wmax > -INFINITY) atomicMax(&sm.run_max_key, float_key(wmax));
      unsigned bits = 0u;
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (x[j] > -INFINITY && x[j] >= cut) bits |= 1u << j;
      const int mine = __popc(bits);
      int incl = mine;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const int total = __shfl_sync(0xffffffffu, incl, 31);
      if (total) {
        int first = 0;
        if (lane == 31) first = atomicAdd(&sm.n_cand, total);
        first = __shfl_sync(0xffffffffu, first, 31);
        after = first + total;
        int pos = first + incl - mine;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          if (bits >> j & 1u) {
            if (pos < cap) sm.cand[pos] = base + j;
            ++pos;
          }
        }
      }
    }
    // Until the row's head is seen, the running maximum sits in the bulk and admits much of
    // it: compact before the next chunk could overflow the list. The warp that appended
    // last this chunk saw the final count; the vote's barrier orders every append before
    // the compaction reads the list, and keeps the next chunk's appends out until it is done.
    if (__syncthreads_or(after > vote_above)) compact_candidates(row, span, temperature, cap, sm);
  };
  const int vocab = static_cast<int>(row.vocab);
  const int mine = static_cast<int>(threadIdx.x) * N;
  if (kVec) {
    const int full = vocab / kChunk;  // chunks that every thread reads whole
    uint4 a{}, b{};
    if (full > 0) a = row.load_raw(mine);
    if (full > 1) b = row.load_raw(mine + kChunk);
    int c = 0;
    for (; c + 1 < full; c += 2) {
      float x[N];
      Row<T, kVec>::unpack(a, x);
      if (c + 2 < full) a = row.load_raw(mine + (c + 2) * kChunk);
      step(x, c * kChunk + mine);
      Row<T, kVec>::unpack(b, x);
      if (c + 3 < full) b = row.load_raw(mine + (c + 3) * kChunk);
      step(x, (c + 1) * kChunk + mine);
    }
    float x[N];
    if (c < full) {
      Row<T, kVec>::unpack(a, x);
      step(x, c * kChunk + mine);
      ++c;
    }
    if (c * kChunk < vocab) {  // the partial last chunk
      row.load(c * kChunk + mine, x);
      step(x, c * kChunk + mine);
    }
  } else {
    float x[N], next[N];
    row.load(mine, next);
    for (int chunk = 0; chunk < vocab; chunk += kChunk) {
#pragma unroll
      for (int j = 0; j < N; ++j) x[j] = next[j];
      if (chunk + kChunk < vocab) row.load(chunk + kChunk + mine, next);  // in flight during this chunk
      step(x, chunk + mine);
    }
  }
  warp_merge_running(r, s);
  if (lane == 0) {
    sm.red_max[warp] = r.m;
    sm.red_z[warp] = r.z;
    sm.red_bad[warp] = r.wide;
  }
  __syncthreads();
  if (warp == 0) {
    Running w;
    if (lane < kWarps) {
      w.m = sm.red_max[lane];
      w.ms = w.m > -INFINITY ? w.m * s : 0.f;
      w.z = sm.red_z[lane];
      w.wide = sm.red_bad[lane];
    }
    warp_merge_running(w, s);
    if (lane == 0) {
      sm.m = w.m;
      // Take out the common factor: sum of e^((x - m) / T) = z 2^(ms - m s) (the FFMA gives
      // ms - m s exactly rounded). A NaN logit made z NaN.
      sm.z = w.m > -INFINITY ? w.z * exp2f(fmaf(-w.m, s, w.ms)) : 0.f;
      sm.bad = isnan(w.z);
      sm.wide = w.wide;
    }
  }
  __syncthreads();
  if (sm.wide) {
    // |m s| went past kMaxScaled (or overflowed): z and the flag again from differences
    // x - m, accurate at any scale, with one more read of the row.
    const float m = sm.m;
    float acc = 0.f;
    int bad = 0;
    const RowElements<T, kVec> all{row};
    all.for_each([&](uint32_t, float x, int) {
      if (isnan(x) || x == INFINITY) bad = 1;
      else if (x > -INFINITY) acc += weight(x - m, s);
    });
    const float z = block_sum(acc, sm);
    bad = block_max_int(bad, sm);
    if (threadIdx.x == 0) {
      sm.z = z;
      sm.bad = bad;
    }
    __syncthreads();
  }
}

struct Selected {
  uint32_t key;    // the threshold key
  uint32_t count;  // elements (>= low) with key >= threshold
  float mass;      // their mass
  bool reached;    // false: the whole source (>= low) falls short of the target
};

// Largest key t >= low with F(t) >= target, F(t) the count (by_mass false) or the mass of
// the source's elements with key >= t. Three histogram passes over the source.
template <typename Source>
__device__ Selected radix_select(const Source& src, uint32_t low, bool by_mass, uint32_t want_count, float want_mass,
                                 float m, float scale, Shared& sm) {
  uint32_t prefix = 0u, above_c = 0u, bin_c = 0u;
  float above_m = 0.f, bin_m = 0.f;
  int used = 0;
  for (int level = 0; level < 3; ++level) {
    const int bits = level < 2 ? 11 : 10;
    const int nbins = 1 << bits;
    const int shift = 32 - used - bits;
    for (int i = threadIdx.x; i < nbins; i += kThreads) {
      sm.count[i] = 0u;
      sm.mass[i] = 0.f;
    }
    if (threadIdx.x == 0) sm.pick = -1;
    __syncthreads();
    src.for_each([&](uint32_t key, float x, int) {
      if (key < low) return;
      if (used > 0 && (key >> (32 - used)) != prefix) return;
      const uint32_t bin = (key >> shift) & static_cast<uint32_t>(nbins - 1);
      atomicAdd(&sm.count[bin], 1u);
      atomicAdd(&sm.mass[bin], weight(x - m, scale));
    });
    __syncthreads();
    // Thread t owns bins top, top-1, ..., top-per+1 (descending): the scan runs from the top bin down.
    const int per = nbins / kThreads;
    const int top = nbins - 1 - static_cast<int>(threadIdx.x) * per;
    uint32_t lc = 0u;
    float lm = 0.f;
    for (int j = 0; j < per; ++j) {
      lc += sm.count[top - j];
      lm += sm.mass[top - j];
    }
    uint32_t ec, tc;
    float em, tm;
    block_exclusive_scan(lc, lm, ec, em, tc, tm, sm);
    uint32_t rc = above_c + ec;
    float rm = above_m + em;
    for (int j = 0; j < per; ++j) {
      const int b = top - j;
      const uint32_t nc = rc + sm.count[b];
      const float nm = rm + sm.mass[b];
      if (by_mass ? nm >= want_mass : nc >= want_count) {
        atomicMax(&sm.pick, b);
        break;
      }
      rc = nc;
      rm = nm;
    }
    __syncthreads();
    const int pick = sm.pick;
    if (pick < 0) {
      // The target is beyond everything left: keep the whole window.
      const uint32_t window_low = used > 0 ? (prefix << (32 - used)) : 0u;
      const Selected r{max(low, window_low), above_c + tc, above_m + tm, level > 0};
      __syncthreads();
      return r;
    }
    if (static_cast<int>(threadIdx.x) == (nbins - 1 - pick) / per) {
      uint32_t c = above_c + ec;
      float mm = above_m + em;
      for (int b = top; b > pick; --b) {
        c += sm.count[b];
        mm += sm.mass[b];
      }
      sm.above_c = c;
      sm.above_m = mm;
    }
    __syncthreads();
    above_c = sm.above_c;
    above_m = sm.above_m;
    bin_c = sm.count[pick];
    bin_m = sm.mass[pick];
    prefix = (prefix << bits) | static_cast<uint32_t>(pick);
    used += bits;
    __syncthreads();  // the next level clears the histogram
  }
  return Selected{prefix, above_c + bin_c, above_m + bin_m, true};
}

template <typename Source>
__device__ float mass_at_least(const Source& src, uint32_t tau, float m, float scale, Shared& sm) {
  float acc = 0.f;
  src.for_each([&](uint32_t key, float x, int) {
    if (key >= tau) acc += weight(x - m, scale);
  });
  return block_sum(acc, sm);
}

// The kept candidates' indices into sm.kept (any order); returns how many there are
// (only the first kMaxKept are stored).
template <typename Source>
__device__ int collect_kept(const Source& src, uint32_t tau, Shared& sm) {
  if (threadIdx.x == 0) sm.n_kept = 0;
  __syncthreads();
  src.for_each([&](uint32_t key, float, int j) {
    if (key >= tau) {
      const int pos = atomicAdd(&sm.n_kept, 1);
      if (pos < kMaxKept) sm.kept[pos] = j;
    }
  });
  __syncthreads();
  const int n = sm.n_kept;
  __syncthreads();
  return n;
}

// Inverse CDF over at most kMaxKept kept tokens held in shared memory: sort their indices
// (bitonic, padded with INT_MAX) so the scan runs in vocabulary order, as pass D does.
template <typename T, bool kVec>
__device__ int draw_kept(const Row<T, kVec>& row, int n, float m, float scale, float u, Shared& sm) {
  int* a = sm.kept;
  for (int i = n + static_cast<int>(threadIdx.x); i < kMaxKept; i += kThreads) a[i] = INT_MAX;
  __syncthreads();
  for (int k = 2; k <= kMaxKept; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < kMaxKept; i += kThreads) {
        const int partner = i ^ j;
        if (partner > i) {
          const int lo = a[i], hi = a[partner];
          if ((lo > hi) == ((i & k) == 0)) {
            a[i] = hi;
            a[partner] = lo;
          }
        }
      }
      __syncthreads();
    }
  }
  constexpr int kPer = kMaxKept / kThreads;
  const int first = static_cast<int>(threadIdx.x) * kPer;  // each thread scans consecutive entries
  float w[kPer], loc[kPer], acc = 0.f;
  int last = -1;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int v = a[first + j];
    w[j] = v != INT_MAX ? weight(row.at(v) - m, scale) : 0.f;
    acc += w[j];
    loc[j] = acc;
    if (w[j] > 0.f) last = v;
  }
  uint32_t ec, tc;
  float em, total;
  block_exclusive_scan(0u, acc, ec, em, tc, total, sm);
  if (threadIdx.x == 0) sm.pick = INT_MAX;
  __syncthreads();
  const float target = u * total;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (w[j] > 0.f && em + loc[j] > target) {
      atomicMin(&sm.pick, a[first + j]);
      break;
    }
  }
  __syncthreads();
  const int pick = sm.pick;
  __syncthreads();
  if (pick != INT_MAX) return pick;
  return block_max_int(last, sm);
}

// Pass D: the first kept index whose running mass exceeds target (vocabulary order).
template <typename T, bool kVec>
__device__ int draw(const Row<T, kVec>& row, uint32_t tau, float m, float scale, float target, Shared& sm) {
  constexpr int N = Row<T, kVec>::kItems;
  if (threadIdx.x == 0) sm.pick = INT_MAX;
  __syncthreads();
  float run = 0.f;
  int last = -1;
  for (int64_t chunk = 0; chunk < row.vocab; chunk += static_cast<int64_t>(kThreads) * N) {
    const int64_t base = chunk + static_cast<int64_t>(threadIdx.x) * N;
    float x[N], w[N], loc[N];
    row.load(base, x);
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const bool keep = base + j < row.vocab && float_key(x[j]) >= tau;
      w[j] = keep ? weight(x[j] - m, scale) : 0.f;
      acc += w[j];
      loc[j] = acc;
      if (w[j] > 0.f) last = static_cast<int>(base + j);
    }
    uint32_t ec, tc;
    float em, tm;
    block_exclusive_scan(0u, acc, ec, em, tc, tm, sm);
    if (run + tm > target) {  // uniform: run and tm are the same in every thread
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (w[j] > 0.f && run + (em + loc[j]) > target) {
          atomicMin(&sm.pick, static_cast<int>(base + j));
          break;
        }
      }
      __syncthreads();
      if (sm.pick != INT_MAX) break;
    }
    run += tm;
  }
  __syncthreads();
  const int pick = sm.pick;
  if (pick != INT_MAX) return pick;
  return block_max_int(last, sm);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                                         int64_t col_stride, const float* __restrict__ uniforms,
                                                         const int64_t* __restrict__ indices, SampleKnobs knobs,
                                                         int64_t* __restrict__ out, int32_t* __restrict__ status,
                                                         int cap) {
  __shared__ Shared sm;
  const int64_t i = blockIdx.x;
  const int64_t r = indices ? indices[i] : i;
  const Row<T, kVec> row{logits + r * row_stride, vocab, col_stride};
  const float temperature = knobs.temperature ? knobs.temperature[r] : knobs.temperature_value;
  const int64_t k = knobs.top_k ? knobs.top_k[r] : knobs.top_k_value;
  const float p = knobs.top_p ? knobs.top_p[r] : knobs.top_p_value;
  const float min_p = knobs.min_p ? knobs.min_p[r] : knobs.min_p_value;
  const bool greedy = temperature == 0.f;
  const float scale = greedy ? 0.f : kLog2e / temperature;  // weights are 2^((x - m) scale)

  if (threadIdx.x == 0) {
    sm.n_cand = 0;
    sm.run_max_key = float_key(-INFINITY);
    sm.cand_floor = -INFINITY;
  }
  __syncthreads();
  if (greedy) {
    scan_greedy(row, sm);
  } else {
    scan_sample(row, temperature, scale, cap, sm);
  }
  const float m = sm.m;
  if (sm.bad || m == -INFINITY) {
    if (threadIdx.x == 0) {
      out[i] = -1;
      status[i] = sm.bad ? kSampleNonFinite : kSampleNoFiniteLogit;
    }
    return;
  }
  if (greedy) {
    if (threadIdx.x == 0) {
      out[i] = sm.argmax;
      status[i] = kSampleOk;
    }
    return;
  }

  const bool need_k = k > 0 && k < vocab;
  const bool need_p = p < 1.f;
  const uint32_t tau_min = min_p > 0.f ? float_key(m + temperature * logf(min_p)) : 0u;
  const float z = sm.z;
  uint32_t tau = 0u;
  float kept_mass = 0.f;
  bool done = false;
  const int n_cand = sm.n_cand;
  if (n_cand <= cap) {
    const Candidates<T, kVec> cands{row, sm.cand, n_cand};
    const uint32_t cut = float_key(fmaxf(sm.cand_floor, m - kCandidateNats * temperature));
    uint32_t tk = 0u, tp = 0u;
    float mass_k = z;
    bool ok = true;
    if (need_k) {
      const Selected s = radix_select(cands, cut, false, static_cast<uint32_t>(k), 0.f, m, scale, sm);
      ok = s.reached;  // fewer than k candidates: tau_k lies below them
      tk = s.key;
      mass_k = s.mass;
    }
    if (ok && need_p) {
      const Selected s = radix_select(cands, max(cut, tk), true, 0u, p * mass_k, m, scale, sm);
      ok = s.reached;  // the candidates hold too little mass: the boundary lies below them
      tp = s.key;
    }
    if (ok) {
      tau = max(max(tk, tp), tau_min);
      if (tau == 0u) {
        kept_mass = z;
        done = true;
      } else if (tau >= cut) {
        const int n_kept = collect_kept(cands, tau, sm);
        if (n_kept <= kMaxKept) {
          const int pick = draw_kept(row, n_kept, m, scale, uniforms[i], sm);
          if (threadIdx.x == 0) {
            out[i] = pick;
            status[i] = kSampleOk;
          }
          return;
        }
        kept_mass = mass_at_least(cands, tau, m, scale, sm);
        done = true;
      }
    }
  }
  if (!done) {
    const RowElements<T, kVec> all{row};
    uint32_t tk = 0u, tp = 0u;
    float mass_k = z;
    if (need_k) {
      const Selected s = radix_select(all, 0u, false, static_cast<uint32_t>(k), 0.f, m, scale, sm);
      tk = s.key;
      mass_k = s.mass;
    }
    if (need_p) tp = radix_select(all, tk, true, 0u, p * mass_k, m, scale, sm).key;
    tau = max(max(tk, tp), tau_min);
    kept_mass = tau == 0u ? z : mass_at_least(all, tau, m, scale, sm);
  }
  const int pick = draw(row, tau, m, scale, uniforms[i] * kept_mass, sm);
  if (threadIdx.x == 0) {
    out[i] = pick;
    status[i] = kSampleOk;
  }
}

template <typename T>
void launch(const T* logits, int64_t vocab, int64_t row_stride, int64_t col_stride, const float* uniforms,
            const int64_t* indices, int64_t n_out, const SampleKnobs& knobs, int64_t* out, int32_t* status, int cap,
            cudaStream_t stream) {
  const bool vec = col_stride == 1 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                   (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(n_out)), block(kThreads);
  if (vec) {
    sample_kernel<T, true><<<grid, block, 0, stream>>>(logits, vocab, row_stride, col_stride, uniforms, indices,
                                                       knobs, out, status, cap);
  } else {
    sample_kernel<T, false><<<grid, block, 0, stream>>>(logits, vocab, row_stride, col_stride, uniforms, indices,
                                                        knobs, out, status, cap);
  }
  check_launch("sample_kernel");
}

}  // namespace

void sample_from_logits(uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t col_stride,
                        DType dtype, const float* uniforms, const int64_t* indices, int64_t n_out,
                        SampleKnobs knobs, int64_t* out, int32_t* status, int candidate_cap,
                        cudaStream_t stream) {
  if (n_out == 0) return;
  if (rows <= 0 || vocab <= 0) throw std::invalid_argument("fastdf._C: sample: empty logits");
  if (vocab >= static_cast<int64_t>(INT_MAX)) throw std::invalid_argument("fastdf._C: sample: vocabulary too large");
  if (n_out > 2147483647LL) throw std::invalid_argument("fastdf._C: sample: too many rows");
  const int cap = (candidate_cap < 0 || candidate_cap > kMaxCandidates) ? kMaxCandidates : candidate_cap;
  switch (dtype) {
    case DType::kFloat32:
      launch(reinterpret_cast<const float*>(logits), vocab, row_stride, col_stride, uniforms, indices, n_out, knobs,
             out, status, cap, stream);
      break;
    case DType::kFloat16:
      launch(reinterpret_cast<const __half*>(logits), vocab, row_stride, col_stride, uniforms, indices, n_out, knobs,
             out, status, cap, stream);
      break;
    case DType::kBFloat16:
      launch(reinterpret_cast<const __nv_bfloat16*>(logits), vocab, row_stride, col_stride, uniforms, indices, n_out,
             knobs, out, status, cap, stream);
      break;
    default:
      throw std::invalid_argument("fastdf._C: sample: unsupported dtype code");
  }
}

}  // namespace fastdf
