// Emulated __half: IEEE binary16 bits, float conversions rounding to nearest even (as
// torch's CPU conversions do), so CPU results compare bit for bit.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t s = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  uint32_t b;
  if (e == 0x1f) {
    b = s | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    b = s | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    b = s;
  } else {  // subnormal: exact in float
    float f = static_cast<float>(m) * (1.0f / 16777216.0f);
    std::memcpy(&b, &f, 4);
    b |= s;
  }
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (ax < 0x38800000u) {  // half subnormal or zero: round ax / 2^-24 to an integer, ties to even
    float a;
    std::memcpy(&a, &ax, 4);
    const float scaled = a * 16777216.0f;  // exact: a power-of-two scale
    float r = __builtin_nearbyintf(scaled);  // default rounding mode: nearest even
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  const uint32_t e = (ax >> 23) - 112u, m = ax & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}
