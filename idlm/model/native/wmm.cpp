// idlm weight-only matmul for small row counts: y (M, N) = x (M, K) · Wᵀ, W stored as 4-bit codes in
// groups of 32 input columns (w = q · s + m, fp32 s and m per group: GGUF Q4_0 / Q4_1 / Q4_K exactly) or
// as int8 codes with one fp32 scale per output row (w = q · s). A block of 16 output columns is decoded
// once per group and multiplied with every row, so the cost grows slowly with the row count M (an ISD
// window has 3-16 rows; PyTorch's int4 kernel re-reads and re-dequantizes the weight every 4 rows).
//
// Row stability by construction: every row goes through the same sequence of operations whatever M is
// and whichever rows share its tile, and every output column is computed by one thread. So a row's
// result never depends on the batch (what bit-exact ISD needs), on any CPU.
//
// Two activation kinds:
//   * bf16 activations (kinds 4 / 8). With AVX-512 BF16: 16 + q is exact in bf16 (0x4180 | q << 3, two
//     ops per 32 codes), per group dot = sum_k x_k (16 + q_k) (vdpbf16ps: exact products, fp32 sums in 4
//     partial sums by k-pair), acc = fma(s, dot, acc); acc = fma(m - 16 s, sum_k x_k, acc), groups in
//     order. Elsewhere (simd.h's V16: AVX2 or portable, the same bits on both): dot = sum_k x_k q_k with
//     partial sum k % 4 (fma, k in order), acc = fma(s, dot, acc); acc = fma(m, sum_k x_k, acc). int8: the
//     same sums with one scale at the end.
//   * int8 activations (kinds 14 / 18, W4A8 / W8A8): x is quantized per row and group of 32 (xq =
//     round(x 127 / max|x|), dx = max|x| / 127); the dot products are exact integers (vpdpbusd with
//     AVX-512 VNNI, vpmaddubsw + vpmaddwd with AVX2, plain loops otherwise), and the fp32 epilogue is
//     V16 code: y += (s dx) dot + m (dx sum xq) per group in order. Integers are exact and V16 ops are
//     the same on every ISA, so W4A8 / W8A8 give the same bits on every CPU.
//
// Layouts (N padded to a multiple of 16 with zero weights), by kind:
//   4, AVX-512 BF16 build: packed (N/16, K/32, 8 chunks, 32 bytes): byte j = 2i + h of chunk c holds
//       q[n_i][4c + h] (low nibble) and q[n_i][4c + 2 + h] (high nibble); params (N/16, K/32, 32): s of
//       the 16 columns, then m - 16 s
//   4, other builds: packed (N/16, K/32, 16 k-pairs, 16 bytes): byte i of pair p = q[n_i][2p] |
//       q[n_i][2p + 1] << 4; params (N/16, K/32, 32): s, then m
//   8, AVX-512 BF16 build: packed (N/16, K/2, 32) int8: [q[n_0][k], q[n_0][k+1], ..., q[n_7][k+1] |
//       q[n_8][k], ..., q[n_15][k+1]]; other builds: packed (N/16, K, 16) int8, byte i of row k =
//       q[n_i][k]; params (N/16, 16) fp32 scales
//   14: packed (N/16, K/32, 4 chunks, 64 bytes): byte 4i + j of chunk c = q[n_i][8c + j] |
//       q[n_i][8c + 4 + j] << 4; params s and m
//   18: packed (N/16, K/32, 8 k-quads, 64 bytes): byte 4i + j = q[n_i][4c + j] + 128; params (N/16, 16)

#include "wmm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define IDLM_BF16DP 1
#else
#define IDLM_BF16DP 0
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define IDLM_IDOT_512 1
#define IDLM_IDOT_ISA "avx512-vnni"
#elif defined(__AVX2__)
#define IDLM_IDOT_256 1
#define IDLM_IDOT_ISA "avx2"
#else
#define IDLM_IDOT_ISA "portable"
#endif

namespace idlm {

std::string wmm_isa() {
  return std::string(IDLM_BF16DP ? "bf16 activations: avx512-bf16" : "bf16 activations: " IDLM_V16_ISA) +
         ", int8 activations: " IDLM_IDOT_ISA;
}

namespace {

// per row, per group of 32 columns: the fp32 sum of x (in order)
void group_sums(const uint16_t* x, int64_t M, int64_t K, std::vector<float>& sx) {
  const int64_t G = K / 32;
  sx.resize(static_cast<size_t>(M * G));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* p = x + m * K + g * 32;
      float s = 0.0f;
      for (int k = 0; k < 32; ++k) s += bf2f(p[k]);
      sx[m * G + g] = s;
    }
}

// per row, per group of 32 columns: xq = round(x * 127 / max|x|), dx = max|x| / 127, sum(xq). Elementwise
// (and an exact max and integer sum), so the vector and scalar forms give the same values.
void quantize_rows(const uint16_t* x, int64_t M, int64_t K, std::vector<int8_t>& xq, std::vector<float>& dx,
                   std::vector<int32_t>& sq) {
  const int64_t G = K / 32;
  xq.resize(static_cast<size_t>(M * K));
  dx.resize(static_cast<size_t>(M * G));
  sq.resize(static_cast<size_t>(M * G));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* p = x + m * K + g * 32;
      int8_t* q = xq.data() + m * K + g * 32;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 a = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
      const __m512 b = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))), 16));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // round to nearest even
      const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
      sq[m * G + g] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#elif defined(__AVX2__)
      __m256 f[4];
      __m256 mx = _mm256_setzero_ps();
      const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      for (int i = 0; i < 4; ++i) {
        f[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i))), 16));
        mx = _mm256_max_ps(mx, _mm256_and_ps(f[i], absmask));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mx);
      float amax = 0.0f;
      for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      __m256i sum = _mm256_setzero_si256();
      alignas(32) int32_t qi[32];
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(f[i], _mm256_set1_ps(inv)));  // round to nearest even
        _mm256_store_si256(reinterpret_cast<__m256i*>(qi + 8 * i), v);
        sum = _mm256_add_epi32(sum, v);
      }
      for (int k = 0; k < 32; ++k) q[k] = static_cast<int8_t>(qi[k]);
      alignas(32) int32_t sl[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sl), sum);
      sq[m * G + g] = sl[0] + sl[1] + sl[2] + sl[3] + sl[4] + sl[5] + sl[6] + sl[7];
#else
      float f[32], amax = 0.0f;
      for (int k = 0; k < 32; ++k) {
        f[k] = bf2f(p[k]);
        const float a = f[k] < 0 ? -f[k] : f[k];
        amax = a > amax ? a : amax;
      }
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) {
        q[k] = static_cast<int8_t>(std::nearbyint(f[k] * inv));
        sum += q[k];
      }
      sq[m * G + g] = sum;
#endif
      dx[m * G + g] = amax / 127.0f;
    }
}

// ---- bf16 activations, AVX-512 BF16 ----------------------------------------------------------------
#if IDLM_BF16DP

inline __m512 bcast_pair(const uint16_t* p) {  // (x[k], x[k+1]) in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_castsi512_ps(_mm512_set1_epi32(v));
}

inline __m512 dp(__m512 acc, __m512 a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// R rows of one group (16 k-pairs) against decoded weights w: per row 4 partial sums (k-pair p goes
// to sum p % 4), then out = fma(s, dot, out); out = fma(m', sum x, out). The same operations for a row
// whatever R is.
template <int R>
inline void int4_tile(const __m512i* w, const uint16_t* x, int64_t K, int64_t g, int64_t G, __m512 s, __m512 mn,
                      const float* sx, float* out, int64_t m0) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
  const uint16_t* xb = x + m0 * K + g * 32;
#pragma GCC unroll 16
  for (int pp = 0; pp < 16; ++pp) {
    const __m512i wp = _mm512_load_si512(w + pp);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][pp & 3] = dp(a[r][pp & 3], bcast_pair(xb + r * K + 2 * pp), wp);
  }
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    __m512 dq = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]));
    __m512 o = _mm512_loadu_ps(out + m * 16);
    o = _mm512_fmadd_ps(s, dq, o);
    o = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx[m * G + g]), o);
    _mm512_storeu_ps(out + m * 16, o);
  }
}

// Decode one group (256 bytes) into 16 vectors of 32 bf16 = 16 + q (exact): byte j of chunk c holds the
// code of word j of k-pair 2c (low nibble) and of k-pair 2c + 1 (high nibble); 16 + q is 0x4180 | q << 3.
inline void int4_decode(const uint8_t* p, __m512i* w) {
  const __m512i keep = _mm512_set1_epi16(0x0078), base = _mm512_set1_epi16(0x4180);
  for (int c = 0; c < 8; ++c) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c)));
    _mm512_store_si512(w + 2 * c, _mm512_ternarylogic_epi32(_mm512_slli_epi16(b, 3), keep, base, 0xEA));
    _mm512_store_si512(w + 2 * c + 1, _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 1), keep, base, 0xEA));
  }
}

// one block of 16 output columns over all K, int4
void int4_block(const uint8_t* pk, const float* prm, const uint16_t* x, int64_t M, int64_t K, const float* sx,
                float* out /* (M, 16) */) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(out + m * 16, _mm512_setzero_ps());
  alignas(64) __m512i w[16];
  for (int64_t g = 0; g < G; ++g) {
    int4_decode(pk + g * 256, w);
    const __m512 s = _mm512_loadu_ps(prm + g * 32);
    const __m512 mn = _mm512_loadu_ps(prm + g * 32 + 16);
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) int4_tile<2>(w, x, K, g, G, s, mn, sx, out, m0);
    if (M - m0 == 1) int4_tile<1>(w, x, K, g, G, s, mn, sx, out, m0);
  }
}

template <int R>
inline void int8_tile(const __m512i* w, int64_t np, int64_t p0, const uint16_t* x, int64_t K, __m512* acc, int64_t m0) {
  // pair p goes to partial sum p % 4; p0 is a multiple of 4, so the index is a constant in each unrolled step
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = acc[(m0 + r) * 4 + j];
  const uint16_t* xb = x + m0 * K + 2 * p0;
  int64_t pp = 0;
  for (; pp + 4 <= np; pp += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i wp = _mm512_load_si512(w + pp + j);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r][j] = dp(a[r][j], bcast_pair(xb + r * K + 2 * (pp + j)), wp);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 3; ++j) {
    if (pp + j >= np) break;
    const __m512i wp = _mm512_load_si512(w + pp + j);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][j] = dp(a[r][j], bcast_pair(xb + r * K + 2 * (pp + j)), wp);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[(m0 + r) * 4 + j] = a[r][j];
}

// one block of 16 output columns over all K, int8 (K even); chunks of 32 pairs are decoded at a time
void int8_block(const int8_t* pk, const float* prm, const uint16_t* x, int64_t M, int64_t K, float* out,
                std::vector<__m512>& acc) {
  const int64_t P = K / 2;
  constexpr int64_t CH = 32;
  alignas(64) __m512i w[CH];
  acc.assign(static_cast<size_t>(M * 4), _mm512_setzero_ps());
  for (int64_t p0 = 0; p0 < P; p0 += CH) {
    const int64_t np = std::min<int64_t>(CH, P - p0);
    for (int64_t pp = 0; pp < np; ++pp) {
      const int8_t* q = pk + (p0 + pp) * 32;
      __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
      __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
      _mm512_store_si512(w + pp, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));  // words 0..15 from f0 (exact: |q| <= 128)
    }
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) int8_tile<2>(w, np, p0, x, K, acc.data(), m0);
    if (M - m0 == 1) int8_tile<1>(w, np, p0, x, K, acc.data(), m0);
  }
  const __m512 s = _mm512_loadu_ps(prm);
  for (int64_t m = 0; m < M; ++m) {
    const __m512* a = acc.data() + m * 4;
    __m512 dq = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    _mm512_storeu_ps(out + m * 16, _mm512_mul_ps(s, dq));
  }
}

#else  // ---- bf16 activations, V16 (AVX2 / portable): lanes are output columns -----------------------

// 16 bytes of 4-bit codes (column i in byte i) -> the low and the high nibbles as fp32 lanes
#if defined(IDLM_V16_256)
inline void nibbles16(const uint8_t* p, V16& lo, V16& hi) {
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i m = _mm256_set1_epi32(15);
  lo = {_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b, m))};
  hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}

inline V16 int8x16(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
}
#else
inline void nibbles16(const uint8_t* p, V16& lo, V16& hi) {
  int32_t a[16], b[16];
  for (int i = 0; i < 16; ++i) {
    a[i] = p[i] & 15;
    b[i] = p[i] >> 4;
  }
  lo = vcvt_i32(a);
  hi = vcvt_i32(b);
}

inline V16 int8x16(const int8_t* p) {
  int32_t a[16];
  for (int i = 0; i < 16; ++i) a[i] = p[i];
  return vcvt_i32(a);
}
#endif

// rows [0, M) of one group of 32 k against decoded codes w[k] (16 columns each): k goes to partial sum
// k % 4 (fma, k in order); then out = fma(s, dot, out); out = fma(m, sum x, out)
void int4_group_v16(const V16* w, const float* xf, int64_t M, int64_t K, int64_t g, int64_t G, V16 s, V16 mn,
                    const float* sx, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xf + m * K + g * 32;
    V16 a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (int k = 0; k < 32; k += 4) {
      a0 = vfma(vset1(xr[k]), w[k], a0);
      a1 = vfma(vset1(xr[k + 1]), w[k + 1], a1);
      a2 = vfma(vset1(xr[k + 2]), w[k + 2], a2);
      a3 = vfma(vset1(xr[k + 3]), w[k + 3], a3);
    }
    const V16 dot = vadd(vadd(a0, a1), vadd(a2, a3));
    V16 o = vload(out + m * 16);
    o = vfma(s, dot, o);
    o = vfma(mn, vset1(sx[m * G + g]), o);
    vstore(out + m * 16, o);
  }
}

void int4_block(const uint8_t* pk, const float* prm, const float* xf, int64_t M, int64_t K, const float* sx,
                float* out) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) vstore(out + m * 16, vzero());
  V16 w[32];
  for (int64_t g = 0; g < G; ++g) {
    for (int p = 0; p < 16; ++p) nibbles16(pk + g * 256 + 16 * p, w[2 * p], w[2 * p + 1]);
    int4_group_v16(w, xf, M, K, g, G, vload(prm + g * 32), vload(prm + g * 32 + 16), sx, out);
  }
}

// int8 codes (K, 16): k goes to partial sum k % 4; y = s * dot
void int8_block(const int8_t* pk, const float* prm, const float* xf, int64_t M, int64_t K, float* out,
                std::vector<V16>& acc) {
  constexpr int64_t CH = 32;
  V16 w[CH];
  acc.assign(static_cast<size_t>(M * 4), vzero());
  for (int64_t k0 = 0; k0 < K; k0 += CH) {
    const int64_t nk = std::min<int64_t>(CH, K - k0);
    for (int64_t j = 0; j < nk; ++j) w[j] = int8x16(pk + (k0 + j) * 16);
    for (int64_t m = 0; m < M; ++m) {
      V16* a = acc.data() + m * 4;
      const float* xr = xf + m * K + k0;
      for (int64_t j = 0; j < nk; ++j) a[(k0 + j) & 3] = vfma(vset1(xr[j]), w[j], a[(k0 + j) & 3]);
    }
  }
  const V16 s = vload(prm);
  for (int64_t m = 0; m < M; ++m) {
    const V16* a = acc.data() + m * 4;
    vstore(out + m * 16, vmul(s, vadd(vadd(a[0], a[1]), vadd(a[2], a[3]))));
  }
}

#endif

// ---- int8 activations (W4A8 / W8A8): exact integer dot products, V16 epilogue ----------------------
// Per row m and group g: dot (16 int32 lanes, one per output column) = sum_k q_k xq_k, exact in every
// form below; then, in V16 (simd.h), W4A8: o = fma(s * dx, dot, o); o = fma(m, dx * sum(xq), o), groups
// in order from o = 0; W8A8: a = fma(dx, dot - 128 sum(xq), a) (the codes are stored as q + 128), y = s a.

// the fp32 epilogue of one row and group (shared by every form)
inline V16 w4a8_step(V16 o, V16 dot, V16 s, V16 mn, float d, int32_t sq) {
  o = vfma(vmul(s, vset1(d)), dot, o);
  return vfma(mn, vset1(d * static_cast<float>(sq)), o);
}

#if defined(IDLM_IDOT_512)
inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R rows of one group: w = 8 k-quads x 16 columns of u8 codes (byte 4i + j: column i, k 4c + j)
template <int R>
inline void group_dots(const __m512i* w, const int8_t* xq, int64_t K, int64_t g, int64_t m0, __m512i* dot) {
  __m512i a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
  const int8_t* xb = xq + m0 * K + g * 32;
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][c & 1] = _mm512_dpbusd_epi32(a[r][c & 1], w[c], bcast4(xb + r * K + 4 * c));
  }
  for (int r = 0; r < R; ++r) dot[r] = _mm512_add_epi32(a[r][0], a[r][1]);
}

template <int R>
inline void w4a8_tile(const __m512i* w, const int8_t* xq, int64_t K, int64_t g, int64_t G, V16 s, V16 mn,
                      const float* dx, const int32_t* sq, float* out, int64_t m0) {
  __m512i dot[R];
  group_dots<R>(w, xq, K, g, m0, dot);
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    vstore(out + m * 16, w4a8_step(vload(out + m * 16), V16{_mm512_cvtepi32_ps(dot[r])}, s, mn, dx[m * G + g],
                                   sq[m * G + g]));
  }
}

template <typename P>
void w4a8_block(const uint8_t* pk, const P* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t m = 0; m < M; ++m) vstore(out + m * 16, vzero());
  __m512i w[8];
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = pk + g * 256;
    for (int c = 0; c < 4; ++c) {
      const __m512i b = _mm512_loadu_si512(p + 64 * c);
      w[2 * c] = _mm512_and_si512(b, low);
      w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    }
    const V16 s = vparam(prm + g * 32), mn = vparam(prm + g * 32 + 16);
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) w4a8_tile<4>(w, xq, K, g, G, s, mn, dx, sq, out, m0);
    switch (M - m0) {
      case 3: w4a8_tile<3>(w, xq, K, g, G, s, mn, dx, sq, out, m0); break;
      case 2: w4a8_tile<2>(w, xq, K, g, G, s, mn, dx, sq, out, m0); break;
      case 1: w4a8_tile<1>(w, xq, K, g, G, s, mn, dx, sq, out, m0); break;
      default: break;
    }
  }
}

template <int R>
inline void w8a8_tile(const __m512i* w, const int8_t* xq, int64_t K, int64_t g, int64_t G, const float* dx,
                      const int32_t* sq, V16* acc, int64_t m0) {
  __m512i raw[R];
  group_dots<R>(w, xq, K, g, m0, raw);
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    const __m512i dot = _mm512_sub_epi32(raw[r], _mm512_set1_epi32(128 * sq[m * G + g]));
    acc[m] = vfma(vset1(dx[m * G + g]), V16{_mm512_cvtepi32_ps(dot)}, acc[m]);
  }
}

void w8a8_block(const uint8_t* pk, const float* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out, std::vector<V16>& acc) {
  const int64_t G = K / 32;
  acc.assign(static_cast<size_t>(M), vzero());
  __m512i w[8];
  for (int64_t g = 0; g < G; ++g) {
    for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(pk + g * 512 + 64 * c);  // 8 k-quads x 64 bytes
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) w8a8_tile<4>(w, xq, K, g, G, dx, sq, acc.data(), m0);
    switch (M - m0) {
      case 3: w8a8_tile<3>(w, xq, K, g, G, dx, sq, acc.data(), m0); break;
      case 2: w8a8_tile<2>(w, xq, K, g, G, dx, sq, acc.data(), m0); break;
      case 1: w8a8_tile<1>(w, xq, K, g, G, dx, sq, acc.data(), m0); break;
      default: break;
    }
  }
  const V16 s = vload(prm);
  for (int64_t m = 0; m < M; ++m) vstore(out + m * 16, vmul(s, acc[m]));
}

#elif defined(IDLM_IDOT_256)
// AVX2: vpmaddubsw (u8 x s8 pairs -> int16) then vpmaddwd (-> int32). Rows in tiles of R, each tile over
// all groups with its outputs in registers (the weights are decoded again per tile: a few ops per group).

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline V16 to_v16(__m256i lo, __m256i hi) {
#if defined(IDLM_V16_256)
  return {_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)};
#else
  alignas(32) int32_t t[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), hi);
  return vcvt_i32(t);
#endif
}

// W4A8: codes <= 15, so a pair sum is at most 2 * 15 * 127 in magnitude and the 8 k-quads' pair sums add up
// in int16 exactly (8 * 3810 < 2^15) before one widening.
template <int R, typename P>
void w4a8_rows(const uint8_t* pk, const P* prm, const int8_t* xq, const float* dx, const int32_t* sq,
               int64_t K, int64_t m0, float* out) {
  const int64_t G = K / 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  V16 o[R];
  for (int r = 0; r < R; ++r) o[r] = vzero();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = pk + g * 256;
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {  // chunk c: low nibbles = k-quad 2c, high nibbles = k-quad 2c + 1
      const __m256i bl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c));
      const __m256i bh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32));
      const __m256i w0l = _mm256_and_si256(bl, low), w0h = _mm256_and_si256(bh, low);
      const __m256i w1l = _mm256_and_si256(_mm256_srli_epi16(bl, 4), low);
      const __m256i w1h = _mm256_and_si256(_mm256_srli_epi16(bh, 4), low);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = xq + (m0 + r) * K + g * 32 + 8 * c;
        const __m256i x0 = bcast4(xb), x1 = bcast4(xb + 4);
        a[r][0] = _mm256_add_epi16(a[r][0], _mm256_maddubs_epi16(w0l, x0));
        a[r][1] = _mm256_add_epi16(a[r][1], _mm256_maddubs_epi16(w0h, x0));
        a[r][0] = _mm256_add_epi16(a[r][0], _mm256_maddubs_epi16(w1l, x1));
        a[r][1] = _mm256_add_epi16(a[r][1], _mm256_maddubs_epi16(w1h, x1));
      }
    }
    const V16 s = vparam(prm + g * 32), mn = vparam(prm + g * 32 + 16);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const V16 dot = to_v16(_mm256_madd_epi16(a[r][0], ones), _mm256_madd_epi16(a[r][1], ones));
      o[r] = w4a8_step(o[r], dot, s, mn, dx[m * G + g], sq[m * G + g]);
    }
  }
  for (int r = 0; r < R; ++r) vstore(out + (m0 + r) * 16, o[r]);
}

template <typename P>
void w4a8_block(const uint8_t* pk, const P* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out) {
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2) w4a8_rows<2>(pk, prm, xq, dx, sq, K, m0, out);
  if (m0 < M) w4a8_rows<1>(pk, prm, xq, dx, sq, K, m0, out);
}

// W8A8: u8 codes up to 255 would saturate vpmaddubsw's int16 pair sums, so each code is split into its
// nibbles (lo + 16 hi): two exact pair sums, widened with weights 1 and 16.
template <int R>
void w8a8_rows(const uint8_t* pk, const float* prm, const int8_t* xq, const float* dx, const int32_t* sq,
               int64_t K, int64_t m0, float* out) {
  const int64_t G = K / 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  V16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vzero();
  for (int64_t g = 0; g < G; ++g) {
    __m256i lo[R][2], hi[R][2];  // int16 sums of the low / high nibbles' pair sums (8 * 3810 < 2^15)
    for (int r = 0; r < R; ++r) lo[r][0] = lo[r][1] = hi[r][0] = hi[r][1] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const uint8_t* p = pk + g * 512 + 64 * c;
      for (int h = 0; h < 2; ++h) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
        const __m256i wl = _mm256_and_si256(b, low), wh = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        for (int r = 0; r < R; ++r) {
          const __m256i x = bcast4(xq + (m0 + r) * K + g * 32 + 4 * c);
          lo[r][h] = _mm256_add_epi16(lo[r][h], _mm256_maddubs_epi16(wl, x));
          hi[r][h] = _mm256_add_epi16(hi[r][h], _mm256_maddubs_epi16(wh, x));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const __m256i k = _mm256_set1_epi32(128 * sq[m * G + g]);
      __m256i d[2];
      for (int h = 0; h < 2; ++h)
        d[h] = _mm256_sub_epi32(_mm256_add_epi32(_mm256_madd_epi16(lo[r][h], ones), _mm256_madd_epi16(hi[r][h], sixteen)), k);
      acc[r] = vfma(vset1(dx[m * G + g]), to_v16(d[0], d[1]), acc[r]);
    }
  }
  const V16 s = vload(prm);
  for (int r = 0; r < R; ++r) vstore(out + (m0 + r) * 16, vmul(s, acc[r]));
}

void w8a8_block(const uint8_t* pk, const float* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out, std::vector<V16>&) {
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2) w8a8_rows<2>(pk, prm, xq, dx, sq, K, m0, out);
  if (m0 < M) w8a8_rows<1>(pk, prm, xq, dx, sq, K, m0, out);
}

#else  // portable: plain integer loops

inline void group_dot(const uint8_t* const* w, const int8_t* xb, int32_t* d) {
  for (int i = 0; i < 16; ++i) {
    int32_t s = 0;
    for (int c = 0; c < 8; ++c)
      for (int j = 0; j < 4; ++j) s += static_cast<int32_t>(w[c][4 * i + j]) * xb[4 * c + j];
    d[i] = s;
  }
}

template <typename P>
void w4a8_block(const uint8_t* pk, const P* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) vstore(out + m * 16, vzero());
  uint8_t wbuf[8][64];
  const uint8_t* w[8];
  for (int c = 0; c < 8; ++c) w[c] = wbuf[c];
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = pk + g * 256;
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 64; ++i) {
        wbuf[2 * c][i] = p[64 * c + i] & 15;
        wbuf[2 * c + 1][i] = p[64 * c + i] >> 4;
      }
    const V16 s = vparam(prm + g * 32), mn = vparam(prm + g * 32 + 16);
    for (int64_t m = 0; m < M; ++m) {
      int32_t d[16];
      group_dot(w, xq + m * K + g * 32, d);
      vstore(out + m * 16, w4a8_step(vload(out + m * 16), vcvt_i32(d), s, mn, dx[m * G + g], sq[m * G + g]));
    }
  }
}

void w8a8_block(const uint8_t* pk, const float* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out, std::vector<V16>& acc) {
  const int64_t G = K / 32;
  acc.assign(static_cast<size_t>(M), vzero());
  const uint8_t* w[8];
  for (int64_t g = 0; g < G; ++g) {
    for (int c = 0; c < 8; ++c) w[c] = pk + g * 512 + 64 * c;
    for (int64_t m = 0; m < M; ++m) {
      int32_t d[16];
      group_dot(w, xq + m * K + g * 32, d);
      for (int i = 0; i < 16; ++i) d[i] -= 128 * sq[m * G + g];
      acc[m] = vfma(vset1(dx[m * G + g]), vcvt_i32(d), acc[m]);
    }
  }
  const V16 s = vload(prm);
  for (int64_t m = 0; m < M; ++m) vstore(out + m * 16, vmul(s, acc[m]));
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& codes_in, const at::Tensor& scale_in,
                                             const at::Tensor& minimum_in, bool a8) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.size(1) % 32 == 0, "int4_pack: codes must be (N, K), K % 32 == 0");
  const int64_t N = codes_in.size(0), K = codes_in.size(1), G = K / 32, NB = (N + 15) / 16;
  at::Tensor codes = codes_in.to(at::kInt).contiguous();
  at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor minimum = minimum_in.to(at::kFloat).contiguous();
  TORCH_CHECK(scale.size(0) == N && scale.size(1) == G && minimum.sizes() == scale.sizes(), "int4_pack: params shape");
  at::Tensor packed = at::zeros({NB, G, 256}, at::kByte);
  at::Tensor params = at::zeros({NB, G, 32}, at::kFloat);
  const int32_t* q = codes.data_ptr<int32_t>();
  const float* s = scale.data_ptr<float>();
  const float* mn = minimum.data_ptr<float>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  float* pr = params.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nb = n / 16, i = n % 16;
    for (int64_t g = 0; g < G; ++g) {
      const float sc = s[n * G + g];
      pr[(nb * G + g) * 32 + i] = sc;
      // the AVX-512 BF16 kernel multiplies by 16 + q; the others by q
      pr[(nb * G + g) * 32 + 16 + i] = !a8 && IDLM_BF16DP ? mn[n * G + g] - 16.0f * sc : mn[n * G + g];
      const int32_t* qg = q + n * K + g * 32;
      for (int64_t k = 0; k < 32; ++k) TORCH_CHECK(qg[k] >= 0 && qg[k] < 16, "int4_pack: codes must be in 0..15");
      uint8_t* dst = pk + (nb * G + g) * 256;
      if (a8) {  // 4 x 64 bytes: byte 4i + j of chunk c = q[n_i][8c + j] | q[n_i][8c + 4 + j] << 4
        for (int64_t c = 0; c < 4; ++c)
          for (int64_t j = 0; j < 4; ++j)
            dst[64 * c + 4 * i + j] = static_cast<uint8_t>(qg[8 * c + j] | (qg[8 * c + 4 + j] << 4));
      } else if (IDLM_BF16DP) {
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t h = 0; h < 2; ++h) {  // byte j = 2 i + h of chunk c: k-pairs 2c (low) and 2c + 1 (high)
            const int32_t lo = qg[2 * (2 * c) + h], hi = qg[2 * (2 * c + 1) + h];
            dst[32 * c + 2 * i + h] = static_cast<uint8_t>(lo | (hi << 4));
          }
      } else {  // 16 k-pairs x 16 bytes: byte i of pair p = q[n_i][2p] | q[n_i][2p + 1] << 4
        for (int64_t p = 0; p < 16; ++p) dst[16 * p + i] = static_cast<uint8_t>(qg[2 * p] | (qg[2 * p + 1] << 4));
      }
    }
  }
  if (a8) {  // W4A8 reads its parameters as fp16 where that is exact (GGUF's Q4_0 / Q4_1 scales and minimums
    // are fp16 numbers): 20 bytes per 32 weights instead of 24, the same values
    at::Tensor half = params.to(at::kHalf);
    if (at::equal(half.to(at::kFloat), params)) params = half;
  }
  return {packed, params};
}

std::tuple<at::Tensor, at::Tensor> int8_pack(const at::Tensor& codes_in, const at::Tensor& scale_in, bool a8) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.size(1) % (a8 ? 32 : 2) == 0,
              a8 ? "int8_pack: codes must be (N, K), K % 32 == 0" : "int8_pack: codes must be (N, K), K even");
  const int64_t N = codes_in.size(0), K = codes_in.size(1), NB = (N + 15) / 16;
  at::Tensor codes = codes_in.to(at::kChar).contiguous();
  at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  TORCH_CHECK(scale.numel() == N, "int8_pack: one scale per row");
  at::Tensor params = at::zeros({NB, 16}, at::kFloat);
  float* pr = params.data_ptr<float>();
  const int8_t* q = codes.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n) pr[(n / 16) * 16 + n % 16] = scale.data_ptr<float>()[n];
  if (a8) {  // per block: G groups x 8 k-quads x 64 bytes, byte 4i + j = q[n_i][4c + j] + 128 (as u8)
    const int64_t G = K / 32;
    at::Tensor packed = at::zeros({NB, G * 512}, at::kByte);
    uint8_t* pk = packed.data_ptr<uint8_t>();
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nb = n / 16, i = n % 16;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t j = 0; j < 4; ++j)
            pk[nb * G * 512 + g * 512 + 64 * c + 4 * i + j] = static_cast<uint8_t>(q[n * K + g * 32 + 4 * c + j] + 128);
    }
    return {packed, params};
  }
  if (IDLM_BF16DP) {
    at::Tensor packed = at::zeros({NB, K / 2, 32}, at::kChar);
    int8_t* pk = packed.data_ptr<int8_t>();
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nb = n / 16, i = n % 16;
      for (int64_t p = 0; p < K / 2; ++p) {
        int8_t* dst = pk + (nb * (K / 2) + p) * 32 + (i < 8 ? 2 * i : 16 + 2 * (i - 8));
        dst[0] = q[n * K + 2 * p];
        dst[1] = q[n * K + 2 * p + 1];
      }
    }
    return {packed, params};
  }
  at::Tensor packed = at::zeros({NB, K, 16}, at::kChar);  // byte i of row k = q[n_i][k]
  int8_t* pk = packed.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) pk[((n / 16) * K + k) * 16 + n % 16] = q[n * K + k];
  return {packed, params};
}

at::Tensor wmm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(kind == 4 || kind == 8 || kind == 14 || kind == 18, "idlm wmm: unknown kind ", kind);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "idlm wmm: x must be (M, K) bf16");
  at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(n <= packed.size(0) * 16, "idlm wmm: n larger than the packed weight");
  const int64_t NB = (n + 15) / 16;  // only the blocks of the first n output columns are computed
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined() && bias->numel()) {
    b = bias->to(at::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  thread_local std::vector<float> sx, dx, xf;  // per calling thread, reused: no allocation per call
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<int32_t> sq;
  if (kind == 4) {
    TORCH_CHECK(packed.size(1) * 32 == K, "idlm wmm: K does not match the int4 weight");
    group_sums(xp, M, K, sx);
  } else if (kind == 8) {
    TORCH_CHECK(IDLM_BF16DP ? packed.size(1) * 2 == K : packed.size(1) == K, "idlm wmm: K does not match the int8 weight");
  } else {
    TORCH_CHECK(K % 32 == 0 && (kind == 14 ? packed.size(1) * 32 == K : packed.size(1) == (K / 32) * 512),
                "idlm wmm: K does not match the weight");
    quantize_rows(xp, M, K, xq, dx, sq);
  }
#if !IDLM_BF16DP
  if (kind == 4 || kind == 8) {  // rows as fp32 once (exact)
    xf.resize(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) xf[i] = bf2f(xp[i]);
  }
#endif
  // the per-call buffers are the calling thread's: the workers get plain pointers
  const float *sxp = sx.data(), *xfp = xf.data(), *dxp = dx.data();
  const int8_t* xqp = xq.data();
  const int32_t* sqp = sq.data();
  // small products run on the calling thread: waking the pool costs more than they do
  const int64_t grain = M * n * K < (1 << 18) ? NB : std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  const uint8_t* pk4 = kind == 4 || kind == 14 ? packed.data_ptr<uint8_t>() : nullptr;
  const int8_t* pk8 = kind == 8 ? packed.data_ptr<int8_t>() : nullptr;
  const bool half = params.scalar_type() == at::kHalf;
  TORCH_CHECK(params.scalar_type() == at::kFloat || (half && kind == 14), "idlm wmm: parameters must be fp32");
  const float* prm = half ? nullptr : params.data_ptr<float>();
  const uint16_t* prm16 = half ? reinterpret_cast<const uint16_t*>(params.data_ptr()) : nullptr;
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> out;
#if IDLM_BF16DP
    thread_local std::vector<__m512> acc8;
#endif
    thread_local std::vector<V16> acc;
    out.resize(static_cast<size_t>(M * 16));
    for (int64_t nb = b0; nb < b1; ++nb) {
      if (kind == 4) {
#if IDLM_BF16DP
        int4_block(pk4 + nb * (K / 32) * 256, prm + nb * (K / 32) * 32, xp, M, K, sxp, out.data());
#else
        int4_block(pk4 + nb * (K / 32) * 256, prm + nb * (K / 32) * 32, xfp, M, K, sxp, out.data());
#endif
      } else if (kind == 8) {
#if IDLM_BF16DP
        int8_block(pk8 + nb * (K / 2) * 32, prm + nb * 16, xp, M, K, out.data(), acc8);
#else
        int8_block(pk8 + nb * K * 16, prm + nb * 16, xfp, M, K, out.data(), acc);
#endif
      } else if (kind == 14) {
        if (prm16)
          w4a8_block(pk4 + nb * (K / 32) * 256, prm16 + nb * (K / 32) * 32, xqp, dxp, sqp, M, K, out.data());
        else
          w4a8_block(pk4 + nb * (K / 32) * 256, prm + nb * (K / 32) * 32, xqp, dxp, sqp, M, K, out.data());
      } else {
        w8a8_block(packed.data_ptr<uint8_t>() + nb * (K / 32) * 512, prm + nb * 16, xqp, dxp, sqp, M,
                   K, out.data(), acc);
      }
      const int64_t c0 = nb * 16, cn = std::min<int64_t>(16, n - c0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < cn; ++c) {
          float v = out[m * 16 + c];
          if (bp) v += bp[c0 + c];
          yp[m * n + c0 + c] = f2bf(v);
        }
    }
  });
  return y;
}

}  // namespace idlm
