// V16: sixteen fp32 lanes, one IEEE single-precision operation per lane and op (fused multiply-add
// included), whatever the instruction set. AVX-512 holds it in one register, AVX2 in two, and the
// portable form in an array. Since every lane of every op is exactly rounded, code written with V16
// gives the same bits on every CPU it is built for: the arithmetic of a kernel is fixed by its source,
// not by the machine. (The file is compiled with -ffp-contract=off: no implicit fusion anywhere.)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define IDLM_V16_ISA "avx512"
#define IDLM_V16_512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define IDLM_V16_ISA "avx2"
#define IDLM_V16_256 1
#else
#define IDLM_V16_ISA "portable"
#endif

namespace idlm {

inline float bf2f(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f2bf(float f) {  // round to nearest even (a NaN stays a NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(IDLM_V16_512)
struct V16 {
  __m512 v;
};
inline V16 vzero() { return {_mm512_setzero_ps()}; }
inline V16 vset1(float a) { return {_mm512_set1_ps(a)}; }
inline V16 vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 vload_bf(const uint16_t* p) {
  return {_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16))};
}
inline V16 vload_h(const uint16_t* p) {  // 16 fp16 values, exactly
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 vadd(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V16 vmin(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }
// int32 lanes (exact) -> fp32 (round to nearest even)
inline V16 vcvt_i32(const int32_t* p) { return {_mm512_cvtepi32_ps(_mm512_loadu_si512(p))}; }
// 2^n for the integer n held in the low mantissa bits of t = x + 1.5 * 2^23 (|n| < 127)
inline V16 vpow2_magic(V16 t) {
  const __m512i n = _mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(t.v), _mm512_set1_epi32(0x7fffff)),
                                     _mm512_set1_epi32(0x400000));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23))};
}
#elif defined(IDLM_V16_256)
struct V16 {
  __m256 lo, hi;
};
inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 vset1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V16 vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline __m256 bf8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline V16 vload_bf(const uint16_t* p) { return {bf8(p), bf8(p + 8)}; }
inline V16 vload_h(const uint16_t* p) {  // 16 fp16 values, exactly (F16C comes with every AVX2 CPU)
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V16 vadd(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V16 vmin(V16 a, V16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V16 vcvt_i32(const int32_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)))};
}
inline __m256 pow2_8(__m256 t) {
  const __m256i n = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x7fffff)),
                                     _mm256_set1_epi32(0x400000));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
inline V16 vpow2_magic(V16 t) { return {pow2_8(t.lo), pow2_8(t.hi)}; }
#else
struct V16 {
  float f[16];
};
inline V16 vzero() { return V16{}; }
inline V16 vset1(float a) {
  V16 r;
  for (int l = 0; l < 16; ++l) r.f[l] = a;
  return r;
}
inline V16 vload(const float* p) {
  V16 r;
  std::memcpy(r.f, p, sizeof r.f);
  return r;
}
inline void vstore(float* p, V16 a) { std::memcpy(p, a.f, sizeof a.f); }
inline V16 vload_bf(const uint16_t* p) {
  V16 r;
  for (int l = 0; l < 16; ++l) r.f[l] = bf2f(p[l]);
  return r;
}
inline float h2f(uint16_t h) {  // fp16 -> fp32, exact (subnormals, infinities and NaN included)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    u = sign | ((e + 112) << 23) | (m << 13);
  } else if (m == 0) {
    u = sign;
  } else {  // subnormal: normalize
    uint32_t ee = 113, mm = m;
    while (!(mm & 0x400)) {
      mm <<= 1;
      --ee;
    }
    u = sign | (ee << 23) | ((mm & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline V16 vload_h(const uint16_t* p) {
  V16 r;
  for (int l = 0; l < 16; ++l) r.f[l] = h2f(p[l]);
  return r;
}
#define IDLM_V16_MAP(name, expr)            \
  inline V16 name(V16 a, V16 b) {          \
    V16 r;                                 \
    for (int l = 0; l < 16; ++l) r.f[l] = expr; \
    return r;                              \
  }
IDLM_V16_MAP(vadd, a.f[l] + b.f[l])
IDLM_V16_MAP(vsub, a.f[l] - b.f[l])
IDLM_V16_MAP(vmul, a.f[l] * b.f[l])
IDLM_V16_MAP(vdiv, a.f[l] / b.f[l])
IDLM_V16_MAP(vmax, a.f[l] > b.f[l] ? a.f[l] : b.f[l])
IDLM_V16_MAP(vmin, a.f[l] < b.f[l] ? a.f[l] : b.f[l])
#undef IDLM_V16_MAP
inline V16 vfma(V16 a, V16 b, V16 c) {
  V16 r;
  for (int l = 0; l < 16; ++l) r.f[l] = std::fmaf(a.f[l], b.f[l], c.f[l]);
  return r;
}
inline V16 vcvt_i32(const int32_t* p) {
  V16 r;
  for (int l = 0; l < 16; ++l) r.f[l] = static_cast<float>(p[l]);
  return r;
}
inline V16 vpow2_magic(V16 t) {
  V16 r;
  for (int l = 0; l < 16; ++l) {
    uint32_t b;
    std::memcpy(&b, &t.f[l], 4);
    const int32_t n = static_cast<int32_t>(b & 0x7fffff) - 0x400000;
    const uint32_t s = static_cast<uint32_t>(n + 127) << 23;
    std::memcpy(&r.f[l], &s, 4);
  }
  return r;
}
#endif

// 16 parameters stored as fp32 or as fp16 (exact where every value is an fp16 number)
inline V16 vparam(const float* p) { return vload(p); }
inline V16 vparam(const uint16_t* p) { return vload_h(p); }

// A V16 stored to 16 floats, for lane-wise scalar work.
struct Lanes {
  alignas(64) float f[16];
  explicit Lanes(V16 a) { vstore(f, a); }
};

// Fixed pairwise sum of 16 lanes: ((l0+l8)+(l4+l12)) + ... in one order on every ISA.
inline float tree16(const float* a) {
  float b[8], c[4];
  for (int i = 0; i < 8; ++i) b[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) c[i] = b[i] + b[i + 4];
  return (c[0] + c[2]) + (c[1] + c[3]);
}
inline float vsum(V16 a) { return tree16(Lanes(a).f); }
inline float vmax_all(V16 a) {  // max is exact: any order gives the same value
  Lanes l(a);
  float m = l.f[0];
  for (int i = 1; i < 16; ++i) m = l.f[i] > m ? l.f[i] : m;
  return m;
}

// exp(x), ~1 ulp, the same operations lane by lane as forward.cpp's scalar exp_f.
inline V16 vexp(V16 x) {
  x = vmax(x, vset1(-87.0f));
  x = vmin(x, vset1(88.0f));
  const V16 magic = vset1(12582912.0f);
  const V16 t = vfma(x, vset1(1.44269504088896341f), magic);
  const V16 n = vsub(t, magic);
  V16 r = vfma(n, vset1(-0.693145751953125f), x);
  r = vfma(n, vset1(-1.428606765330187045e-06f), r);
  V16 p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), r);
  p = vadd(p, vset1(1.0f));
  return vmul(p, vpow2_magic(t));
}

}  // namespace idlm
