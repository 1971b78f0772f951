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

#include "wmm.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

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

#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& codes_in, const at::Tensor& scale_in,
                                             const at::Tensor& minimum_in) {
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
      pr[(nb * G + g) * 32 + 16 + i] = mn[n * G + g] - 16.0f * sc;  // the kernel multiplies by 16 + q
      const int32_t* qg = q + n * K + g * 32;
      for (int64_t k = 0; k < 32; ++k) TORCH_CHECK(qg[k] >= 0 && qg[k] < 16, "int4_pack: codes must be in 0..15");
      for (int64_t c = 0; c < 8; ++c)
        for (int64_t h = 0; h < 2; ++h) {  // byte j = 2 i + h of chunk c: k-pairs 2c (low) and 2c + 1 (high)
          const int32_t lo = qg[2 * (2 * c) + h], hi = qg[2 * (2 * c + 1) + h];
          pk[(nb * G + g) * 256 + 32 * c + 2 * i + h] = static_cast<uint8_t>(lo | (hi << 4));
        }
    }
  }
  return {packed, params};
}

std::tuple<at::Tensor, at::Tensor> int8_pack(const at::Tensor& codes_in, const at::Tensor& scale_in) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.size(1) % 2 == 0, "int8_pack: codes must be (N, K), K even");
  const int64_t N = codes_in.size(0), K = codes_in.size(1), NB = (N + 15) / 16;
  at::Tensor codes = codes_in.to(at::kChar).contiguous();
  at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  TORCH_CHECK(scale.numel() == N, "int8_pack: one scale per row");
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

at::Tensor wmm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(IDLM_WMM, "idlm wmm: this build has no AVX-512 BF16 kernel");
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
  std::vector<float> sx;
  if (kind == 4) {
    TORCH_CHECK(packed.size(1) * 32 == K, "idlm wmm: K does not match the int4 weight");
    group_sums(xp, M, K, sx);
  } else {
    TORCH_CHECK(packed.size(1) * 2 == K, "idlm wmm: K does not match the int8 weight");
  }
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  const uint8_t* pk4 = kind == 4 ? packed.data_ptr<uint8_t>() : nullptr;
  const int8_t* pk8 = kind == 4 ? nullptr : packed.data_ptr<int8_t>();
  const float* prm = params.data_ptr<float>();
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> out;
    thread_local std::vector<__m512> acc;
    out.resize(static_cast<size_t>(M * 16));
    for (int64_t nb = b0; nb < b1; ++nb) {
      if (kind == 4) {
        int4_block(pk4 + nb * (K / 32) * 256, prm + nb * (K / 32) * 32, xp, M, K, sx.data(), out.data());
      } else {
        int8_block(pk8 + nb * (K / 2) * 32, prm + nb * 16, xp, M, K, out.data(), acc);
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
