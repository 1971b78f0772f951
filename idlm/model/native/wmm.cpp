// idlm weight-only matmul for small row counts: y (M, N) = x (M, K) bf16 · Wᵀ, W stored as 4-bit codes in
// groups of 32 input columns (w = q · s + m, fp32 s and m per group: GGUF Q4_0 / Q4_1 / Q4_K exactly) or
// as int8 codes with one fp32 scale per output row (w = q · s).
//
// Why not PyTorch's own kernels: they re-read and re-dequantize the whole weight for every 4 rows
// (measured here: 5 rows cost 2.8x one row), and an ISD window has 3-16 rows. Here a block of 16 output
// columns is decoded once per group and multiplied with every row: cost grows slowly with M.
//
// Arithmetic (AVX-512 BF16): 16 + q is exact in bf16 (0x4180 | q << 3, two ops per 32 codes), so per group
//   dot = sum_k x_k (16 + q_k)   (vdpbf16ps: exact products, fp32 accumulation in 4 fixed partial sums)
//   acc = fma(s, dot, acc); acc = fma(m - 16 s, sum_k x_k, acc)   (groups in order)
// and int8 the same with one scale at the end. Every row goes through exactly this sequence whatever M
// is and whichever rows share its tile, and every output column is computed by one thread: a row's
// result never depends on the batch (the property bit-exact ISD needs).
//
// Layouts (N padded to a multiple of 16 with zero weights):
//   int4 packed (N/16, K/32, 8 chunks, 32 bytes): byte j = 2i + h of chunk c holds q[n_i][4c + h] (low nibble)
//       and q[n_i][4c + 2 + h] (high nibble), i.e. word j of k-pairs 2c and 2c + 1
//   int4 params (N/16, K/32, 32) fp32: s of the 16 columns, then m' = m - 16 s
//   int8 packed (N/16, K/2, 32) int8: [q[n_0][k], q[n_0][k+1], ..., q[n_7][k+1] | q[n_8][k], ..., q[n_15][k+1]]
//   int8 params (N/16, 16) fp32 scales
//   with int8 activations (kinds 14 / 18): int4 (N/16, K/32, 4 chunks, 64 bytes): byte 4i + j of chunk c =
//       q[n_i][8c + j] | q[n_i][8c + 4 + j] << 4, params s and m; int8 (N/16, K/32, 8 k-quads, 64 bytes):
//       byte 4i + j = q[n_i][4c + j] + 128

#include "wmm.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define IDLM_WMM 1
#else
#define IDLM_WMM 0
#endif

namespace idlm {

bool wmm_available() { return IDLM_WMM != 0; }

namespace {

inline float bf2f(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

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

#if IDLM_WMM

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
    switch (M - m0) {
      case 1: int4_tile<1>(w, x, K, g, G, s, mn, sx, out, m0); break;
      default: break;
    }
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
    switch (M - m0) {
      case 1: int8_tile<1>(w, np, p0, x, K, acc.data(), m0); break;
      default: break;
    }
  }
  const __m512 s = _mm512_loadu_ps(prm);
  for (int64_t m = 0; m < M; ++m) {
    const __m512* a = acc.data() + m * 4;
    __m512 dq = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    _mm512_storeu_ps(out + m * 16, _mm512_mul_ps(s, dq));
  }
}


// ---- int8 activations (W4A8 / W8A8) -------------------------------------------------------------
// x is quantized per row and per group of 32 columns: xq = round(x * 127 / max|x|) (int8), dx = max|x| / 127,
// and the group's sum of xq. Dot products are then exact integers (vpdpbusd: u8 x s8 -> int32), so their
// order does not matter; per group, y += (s dx) dot + (m dx) sum(xq) in fp32, groups in order.
#if defined(__AVX512VNNI__)
#define IDLM_VNNI 1

inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R rows of one int4 group (4 x 64 bytes of nibbles: low nibbles = k-quad 2c, high = 2c + 1)
// Exact integer dot products of rows m0..m0+R-1 of one group of 32 int8 activations with 16 columns' 8 u8
// k-quads (two accumulators per row, summed at the end)
template <int R>
inline void group_dots(const __m512i* w, const int8_t* xq, int64_t K, int64_t g, int64_t m0, __m512i* dot) {
  __m512i a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
  const int8_t* xb = xq + m0 * K + g * 32;
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][c & 1] = dpbusd(a[r][c & 1], w[c], bcast4(xb + r * K + 4 * c));
  }
  for (int r = 0; r < R; ++r) dot[r] = _mm512_add_epi32(a[r][0], a[r][1]);
}

template <int R>
inline void w4a8_tile(const __m512i* w /* 8 decoded k-quads */, const int8_t* xq, int64_t K, int64_t g, int64_t G,
                      __m512 s, __m512 mn, const float* dx, const int32_t* sq, float* out, int64_t m0) {
  __m512i dot[R];
  group_dots<R>(w, xq, K, g, m0, dot);
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    const __m512 t = _mm512_cvtepi32_ps(dot[r]);
    const float d = dx[m * G + g];
    __m512 o = _mm512_loadu_ps(out + m * 16);
    o = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(d)), t, o);
    o = _mm512_fmadd_ps(mn, _mm512_set1_ps(d * static_cast<float>(sq[m * G + g])), o);
    _mm512_storeu_ps(out + m * 16, o);
  }
}

void w4a8_block(const uint8_t* pk, const float* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(out + m * 16, _mm512_setzero_ps());
  __m512i w[8];
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = pk + g * 256;
    for (int c = 0; c < 4; ++c) {
      const __m512i b = _mm512_loadu_si512(p + 64 * c);
      w[2 * c] = _mm512_and_si512(b, low);
      w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    }
    const __m512 s = _mm512_loadu_ps(prm + g * 32);
    const __m512 mn = _mm512_loadu_ps(prm + g * 32 + 16);
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

// int8 weights stored as u8 (q + 128) against s8 activations: dot = dot' - 128 sum_k xq (the row's group sum)
template <int R>
inline void w8a8_tile(const __m512i* w, const int8_t* xq, int64_t K, int64_t g, int64_t G, const float* dx,
                      const int32_t* sq, __m512* acc, int64_t m0) {
  __m512i raw[R];
  group_dots<R>(w, xq, K, g, m0, raw);
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    const __m512i dot = _mm512_sub_epi32(raw[r], _mm512_set1_epi32(128 * sq[m * G + g]));
    acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(dx[m * G + g]), _mm512_cvtepi32_ps(dot), acc[m]);
  }
}

void w8a8_block(const uint8_t* pk, const float* prm, const int8_t* xq, const float* dx, const int32_t* sq, int64_t M,
                int64_t K, float* out, std::vector<__m512>& acc) {
  const int64_t G = K / 32;
  acc.assign(static_cast<size_t>(M), _mm512_setzero_ps());
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
  const __m512 s = _mm512_loadu_ps(prm);
  for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(out + m * 16, _mm512_mul_ps(s, acc[m]));
}
#else
#define IDLM_VNNI 0
#endif

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
      // the bf16 kernel multiplies by 16 + q; the int8-activation one by q
      pr[(nb * G + g) * 32 + 16 + i] = a8 ? mn[n * G + g] : mn[n * G + g] - 16.0f * sc;
      const int32_t* qg = q + n * K + g * 32;
      for (int64_t k = 0; k < 32; ++k) TORCH_CHECK(qg[k] >= 0 && qg[k] < 16, "int4_pack: codes must be in 0..15");
      if (a8) {  // 4 x 64 bytes: byte 4i + j of chunk c = q[n_i][8c + j] | q[n_i][8c + 4 + j] << 4
        for (int64_t c = 0; c < 4; ++c)
          for (int64_t j = 0; j < 4; ++j)
            pk[(nb * G + g) * 256 + 64 * c + 4 * i + j] = static_cast<uint8_t>(qg[8 * c + j] | (qg[8 * c + 4 + j] << 4));
        continue;
      }
      for (int64_t c = 0; c < 8; ++c)
        for (int64_t h = 0; h < 2; ++h) {  // byte j = 2 i + h of chunk c: k-pairs 2c (low) and 2c + 1 (high)
          const int32_t lo = qg[2 * (2 * c) + h], hi = qg[2 * (2 * c + 1) + h];
          pk[(nb * G + g) * 256 + 32 * c + 2 * i + h] = static_cast<uint8_t>(lo | (hi << 4));
        }
    }
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
  if (a8) {  // per block: G groups x 8 k-quads x 64 bytes, byte 4i + j = q[n_i][4c + j] + 128 (as u8)
    const int64_t G = K / 32;
    at::Tensor packed = at::zeros({NB, G * 512}, at::kByte);
    at::Tensor params = at::zeros({NB, 16}, at::kFloat);
    const int8_t* q = codes.data_ptr<int8_t>();
    uint8_t* pk = packed.data_ptr<uint8_t>();
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nb = n / 16, i = n % 16;
      params.data_ptr<float>()[nb * 16 + i] = scale.data_ptr<float>()[n];
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t j = 0; j < 4; ++j)
            pk[nb * G * 512 + g * 512 + 64 * c + 4 * i + j] = static_cast<uint8_t>(q[n * K + g * 32 + 4 * c + j] + 128);
    }
    return {packed, params};
  }
  at::Tensor packed = at::zeros({NB, K / 2, 32}, at::kChar);
  at::Tensor params = at::zeros({NB, 16}, at::kFloat);
  const int8_t* q = codes.data_ptr<int8_t>();
  int8_t* pk = packed.data_ptr<int8_t>();
  float* pr = params.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nb = n / 16, i = n % 16;
    pr[nb * 16 + i] = scale.data_ptr<float>()[n];
    for (int64_t p = 0; p < K / 2; ++p) {
      int8_t* dst = pk + (nb * (K / 2) + p) * 32 + (i < 8 ? 2 * i : 16 + 2 * (i - 8));
      dst[0] = q[n * K + 2 * p];
      dst[1] = q[n * K + 2 * p + 1];
    }
  }
  return {packed, params};
}

#ifndef IDLM_VNNI
#define IDLM_VNNI 0
#endif

bool vnni_available() { return IDLM_WMM != 0 && IDLM_VNNI != 0; }

at::Tensor wmm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(IDLM_WMM, "idlm wmm: this build has no AVX-512 BF16 kernel");
  TORCH_CHECK(kind == 4 || kind == 8 || ((kind == 14 || kind == 18) && IDLM_VNNI),
              "idlm wmm: unknown kind ", kind, " (or no AVX-512 VNNI for int8 activations)");
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
#if IDLM_WMM
  std::vector<float> sx, dx;
  std::vector<int8_t> xq;
  std::vector<int32_t> sq;
  if (kind == 4) {
    TORCH_CHECK(packed.size(1) * 32 == K, "idlm wmm: K does not match the int4 weight");
    group_sums(xp, M, K, sx);
  } else if (kind == 8) {
    TORCH_CHECK(packed.size(1) * 2 == K, "idlm wmm: K does not match the int8 weight");
  } else {
    TORCH_CHECK(K % 32 == 0 && (kind == 14 ? packed.size(1) * 32 == K : packed.size(1) == (K / 32) * 512),
                "idlm wmm: K does not match the weight");
    quantize_rows(xp, M, K, xq, dx, sq);
  }
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  const uint8_t* pk4 = kind == 4 || kind == 14 ? packed.data_ptr<uint8_t>() : nullptr;
  const int8_t* pk8 = kind == 8 ? packed.data_ptr<int8_t>() : nullptr;
  const float* prm = params.data_ptr<float>();
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> out;
    thread_local std::vector<__m512> acc;
    out.resize(static_cast<size_t>(M * 16));
    for (int64_t nb = b0; nb < b1; ++nb) {
      if (kind == 4) {
        int4_block(pk4 + nb * (K / 32) * 256, prm + nb * (K / 32) * 32, xp, M, K, sx.data(), out.data());
      } else if (kind == 8) {
        int8_block(pk8 + nb * (K / 2) * 32, prm + nb * 16, xp, M, K, out.data(), acc);
#if IDLM_VNNI
      } else if (kind == 14) {
        w4a8_block(pk4 + nb * (K / 32) * 256, prm + nb * (K / 32) * 32, xq.data(), dx.data(), sq.data(), M, K, out.data());
      } else {
        w8a8_block(packed.data_ptr<uint8_t>() + nb * (K / 32) * 512, prm + nb * 16, xq.data(), dx.data(), sq.data(), M,
                   K, out.data(), acc);
#endif
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
#endif
  return y;
}

}  // namespace idlm
