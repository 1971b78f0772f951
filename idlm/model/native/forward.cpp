// idlm native CPU forward: the whole decoder layer stack of one inference forward in one call.
//
// Why: the Python forward of a 30-layer model issues ~8,000 ATen calls per token, and on a 2-core CPU
// their overhead (~15 ms) dwarfs the quantized matmuls (~6 ms). Here the matmuls are idlm's own kernels
// (wmm.cpp: int4 / int8 weights; dense.cpp: bf16 weights); everything between them (RMSNorm, RoPE, the K/V
// write, attention, residuals, SiLU, the gated-LoRA update) is a plain loop over rows.
//
// Determinism (what lossless ISD and batch invariance need): every row is computed by the same code
// whatever else is in the batch.
//   * per-row loops have no cross-row reductions;
//   * reductions (dot products, sums of squares, softmax sums) accumulate in fixed lanes of 16 with fmaf
//     and end in a fixed pairwise tree, so their order is a function of the row's data only;
//   * attention visits a row's keys in the order of their logical position in the sequence, the same
//     keys whatever the batch layout (a paged pool, a contiguous cache, other requests' rows);
//   * the file is compiled with -ffp-contract=off (no implicit fused multiply-adds) and without
//     -ffast-math, so the compiler may not reorder any floating-point operation.
// The matmul kernels are row-stable by construction too (wmm.cpp, dense.cpp).
//
// Layout conventions: activations bf16 (T, hidden) row-major; the K/V pool (layers, Hkv, slots, D) bf16;
// q is kept in fp32 after RoPE (it never goes through memory as bf16).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dense.h"
#include "simd.h"
#include "wmm.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace {

constexpr int L = 16;  // accumulation lanes

using idlm::bf2f;
using idlm::f2bf;
using idlm::tree16;

// exp(x) in float, ~1 ulp, branch-free so loops over it vectorize. Same bits for the same x always.
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  float t = std::fmaf(x, 1.44269504088896341f, magic);
  float n = t - magic;
  float r = std::fmaf(n, -0.693145751953125f, x);  // Cody-Waite: ln2 = hi + lo
  r = std::fmaf(n, -1.428606765330187045e-06f, r);
  float p = 1.9875691500e-4f;
  p = std::fmaf(p, r, 1.3981999507e-3f);
  p = std::fmaf(p, r, 8.3334519073e-3f);
  p = std::fmaf(p, r, 4.1665795894e-2f);
  p = std::fmaf(p, r, 1.6666665459e-1f);
  p = std::fmaf(p, r, 5.0000001201e-1f);
  p = std::fmaf(p, r * r, r);
  p = p + 1.0f;
  int32_t ni;
  uint32_t tb;
  std::memcpy(&tb, &t, 4);
  ni = static_cast<int32_t>(tb & 0x7fffff) - 0x400000;  // the integer n, from t's mantissa
  uint32_t sb = static_cast<uint32_t>(ni + 127) << 23;
  float s;
  std::memcpy(&s, &sb, 4);
  return p * s;
}

// sum of squares of n bf16 values (any n: the tail goes to lanes by index)
inline float sumsq_bf(const uint16_t* x, int64_t n) {
  float acc[L] = {0};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) {
      float v = bf2f(x[i + l]);
      acc[l] = std::fmaf(v, v, acc[l]);
    }
  for (; i < n; ++i) {
    float v = bf2f(x[i]);
    acc[i % L] = std::fmaf(v, v, acc[i % L]);
  }
  return tree16(acc);
}

// out[k] = bf16(x[k] * r * w[k]) for one row: RMSNorm with weight w (bf16)
inline void rmsnorm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t n, float eps) {
  float r = 1.0f / std::sqrt(sumsq_bf(x, n) / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; ++k) out[k] = f2bf(bf2f(x[k]) * r * bf2f(w[k]));
}

inline const uint16_t* bf(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* bfm(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// ---- linear layers --------------------------------------------------------------------------------

// DENSE: idlm::linear (dense.cpp, bf16 weights); WMM*: idlm's quantized kernels (wmm.cpp)
enum Kind : int64_t { DENSE = 0, WMM4 = 4, WMM8 = 8, WMM4A8 = 14, WMM8A8 = 18 };

struct Lin {
  int64_t kind = -1;  // -1: absent
  at::Tensor w, scales, bias;  // dense: w (N, K) bf16, bias fp32; quantized: packed codes, params, fp32 bias
  int64_t cols = 0;  // output columns
  bool present() const { return kind >= 0; }

  // x (M, K) bf16 contiguous -> (M, n) bf16 with n = cols, or only the first `upto` columns (idlm's
  // quantized kernels then skip the others; -1: all)
  at::Tensor operator()(const at::Tensor& x, int64_t upto = -1) const {
    const int64_t n = upto < 0 ? cols : std::min(upto, cols);
    const at::Tensor b = bias.defined() && n != cols ? bias.narrow(0, 0, n) : bias;
    if (kind == DENSE) return idlm::linear(x, n == cols ? w : w.narrow(0, 0, n), b);
    return idlm::wmm(x, w, scales, kind, n, b);
  }
};

// A projection with an optional gated LoRA (R-ISD): y = main(x)[:, :out] (+ B(A x) on gated rows).
// A is either fused into main (its rows follow the `out` base rows) or a separate linear.
struct Proj {
  Lin main, a, b;
  int64_t out = 0, rank = 0;
  bool fused_a = false;

  // x (M, K) bf16 contiguous; gated: rows (ascending) whose gate is 1. Returns (M, >= out) bf16 whose
  // first `out` columns are the result (a fused A's columns may follow: callers use y.size(1) as the
  // row stride).
  at::Tensor operator()(const at::Tensor& x, const std::vector<int64_t>& gated) const {
    const bool lora = rank > 0 && b.present() && !gated.empty();
    at::Tensor y = main(x, lora || !fused_a ? -1 : out);  // a fused A's columns only when a row is gated
    if (!lora) return y;
    const int64_t mg = static_cast<int64_t>(gated.size()), ld = y.size(1);
    at::Tensor t;
    if (fused_a) {  // A x of the gated rows, from the fused output's last `rank` columns
      t = at::empty({mg, rank}, y.options());
      for (int64_t r = 0; r < mg; ++r)
        std::memcpy(bfm(t) + r * rank, bf(y) + gated[r] * ld + out, rank * sizeof(uint16_t));
    } else {
      at::Tensor xg = at::empty({mg, x.size(1)}, x.options());
      for (int64_t r = 0; r < mg; ++r)
        std::memcpy(bfm(xg) + r * x.size(1), bf(x) + gated[r] * x.size(1), x.size(1) * sizeof(uint16_t));
      t = a(xg);
    }
    at::Tensor delta = b(t);  // (mg, >= out) bf16
    const int64_t dld = delta.size(1);
    uint16_t* yp = bfm(y);
    const uint16_t* dp = bf(delta);
    for (int64_t r = 0; r < mg; ++r) {
      uint16_t* yr = yp + gated[r] * ld;
      const uint16_t* dr = dp + r * dld;
      for (int64_t k = 0; k < out; ++k) yr[k] = f2bf(bf2f(yr[k]) + bf2f(dr[k]));
    }
    return y;
  }
};

struct LayerW {
  at::Tensor ln1, ln2, qn, kn;  // qn / kn: Qwen3 per-head q/k norms (undefined otherwise)
  Proj qkv, o, gate_up, down;
};

struct Plan {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter;
  float eps;
  std::vector<LayerW> ws;
  at::Tensor norm;
};

// Stage timings (IDLM_NATIVE_PROFILE=1): wall seconds per stage, summed over layers and calls; read and
// reset by the profile() op. Off by default (no clock reads).
enum Stage { S_NORM, S_QKV, S_ROPE, S_ATTN, S_O, S_GATE_UP, S_ACT, S_DOWN, S_OTHER, S_COUNT };
const char* const kStageNames = "norm,qkv,rope,attn,o,gate_up,act,down,other";
double g_stage[S_COUNT] = {0};
const bool g_profile = [] {
  const char* e = std::getenv("IDLM_NATIVE_PROFILE");
  return e != nullptr && e[0] == '1';
}();

struct StageClock {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(Stage s) {
    if (!g_profile) return;
    auto now = std::chrono::steady_clock::now();
    g_stage[s] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};

std::mutex g_mu;
std::map<int64_t, std::shared_ptr<Plan>> g_plans;
int64_t g_next = 1;

// tensors: per layer [ln1, ln2, qn, kn] + 4 projections x 3 linears x [w, scales, bias], then the final norm.
// meta: [layers, hidden, heads, kv_heads, head_dim, inter], then per layer per projection
//       [out, rank, fused_a, main.kind, main.cols, a.kind, a.cols, b.kind, b.cols].
int64_t plan_create(std::vector<at::Tensor> tensors, std::vector<int64_t> meta, double eps) {
  auto p = std::make_shared<Plan>();
  TORCH_CHECK(meta.size() >= 6, "idlm native: bad plan meta");
  p->layers = meta[0];
  p->hidden = meta[1];
  p->heads = meta[2];
  p->kv_heads = meta[3];
  p->head_dim = meta[4];
  p->inter = meta[5];
  p->eps = static_cast<float>(eps);
  TORCH_CHECK(p->head_dim % L == 0 && p->head_dim <= 1024, "idlm native: head_dim must be a multiple of 16, <= 1024");
  TORCH_CHECK(p->heads % p->kv_heads == 0 && (p->heads / p->kv_heads) * (p->head_dim / 16) <= 256,
              "idlm native: (heads per K/V head) * head_dim / 16 must be at most 256");
  const size_t per_layer = 4 + 4 * 9;
  TORCH_CHECK(tensors.size() == static_cast<size_t>(p->layers) * per_layer + 1, "idlm native: bad tensor count");
  TORCH_CHECK(meta.size() == 6 + static_cast<size_t>(p->layers) * 4 * 9, "idlm native: bad meta size");
  size_t ti = 0, mi = 6;
  for (int64_t i = 0; i < p->layers; ++i) {
    LayerW lw;
    lw.ln1 = tensors[ti++];
    lw.ln2 = tensors[ti++];
    lw.qn = tensors[ti++];
    lw.kn = tensors[ti++];
    Proj* projs[4] = {&lw.qkv, &lw.o, &lw.gate_up, &lw.down};
    for (Proj* pr : projs) {
      pr->out = meta[mi++];
      pr->rank = meta[mi++];
      pr->fused_a = meta[mi++] != 0;
      Lin* lins[3] = {&pr->main, &pr->a, &pr->b};
      for (Lin* ln : lins) {
        ln->kind = meta[mi++];
        ln->cols = meta[mi++];
        ln->w = tensors[ti++];
        ln->scales = tensors[ti++];
        ln->bias = tensors[ti++];
        if (ln->w.defined() && ln->w.numel() == 0) ln->w = at::Tensor();
        if (ln->scales.defined() && ln->scales.numel() == 0) ln->scales = at::Tensor();
        if (ln->bias.defined() && ln->bias.numel() == 0) ln->bias = at::Tensor();
      }
    }
    if (lw.qn.defined() && lw.qn.numel() == 0) lw.qn = at::Tensor();
    if (lw.kn.defined() && lw.kn.numel() == 0) lw.kn = at::Tensor();
    p->ws.push_back(std::move(lw));
  }
  p->norm = tensors[ti++];
  std::lock_guard<std::mutex> g(g_mu);
  int64_t h = g_next++;
  g_plans[h] = p;
  return h;
}

void plan_release(int64_t h) {
  std::lock_guard<std::mutex> g(g_mu);
  g_plans.erase(h);
}

// ---- attention ------------------------------------------------------------------------------------

// Attention, one (sequence, K/V head) at a time. Every query row of the sequence that this forward
// computes (an ISD window, a prompt chunk) shares the keys of the common prefix: each tile of 16 keys is
// loaded and transposed once and scored against all of the sequence's G x rows queries. What a row
// computes is still a function of its query and its own keys only:
//   score(q, k) = bf16 dot product over D (vdpbf16ps; pair p in partial sum p % 4, then a fixed tree),
//   softmax over the row's keys in logical order (max, exp_f lane by lane, sum in 16 lanes by key index),
//   out = sum_j p_j v_j in logical key order (fp32 fma per dimension), times 1 / sum.
// Which tile a key lands in, and which other rows share it, changes none of these operations.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define IDLM_ATTN 1
inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __m512 exp16(__m512 x) {  // exp_f, lane by lane (the same operations, so the same bits)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  __m512i ni = _mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(0x7fffff)),
                                _mm512_set1_epi32(0x400000));
  __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  return _mm512_mul_ps(p, sc);
}

inline void transpose16(__m512i* r) {  // 16 x 16 32-bit elements, in place
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // u[4i + j], lane L: rows 4i..4i+3 of column 4L + j
    const __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88), d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

struct AttnScratch {
  std::vector<float> scores;
  std::vector<int32_t> qpairs;  // the queries as bf16 pairs
  std::vector<__m512i> tile;    // (D / 2) x 16 keys, transposed bf16 pairs
  std::vector<__m512> acc;
  std::vector<const int32_t*> qs;
  std::vector<float*> so, at;
  std::vector<const float*> sp;
  std::vector<float> inv;
};

// scores of up to 16 keys (slots `ks`, n <= 16) against queries `qs` (count nq, each D/2 bf16 pairs),
// written to out[qi] + 0..n-1
inline void score_tile(const int64_t* ks, int64_t n, const uint16_t* kbase, int64_t s_stride, int64_t D,
                       const int32_t* const* qs, int64_t nq, float* const* out, AttnScratch& sc) {
  const int64_t P = D / 2, chunks = (P + 15) / 16;
  sc.tile.resize(static_cast<size_t>(chunks * 16));
  __m512i* tile = sc.tile.data();
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask16 m = (P - 16 * c) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (P - 16 * c)) - 1);
    __m512i* r = tile + 16 * c;
    for (int64_t l = 0; l < 16; ++l)
      r[l] = l < n ? _mm512_maskz_loadu_epi32(m, kbase + ks[l] * s_stride + 32 * c) : _mm512_setzero_si512();
    transpose16(r);  // r[p'] = pair 16c + p' of the 16 keys
  }
  const __mmask16 store = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int32_t* q = qs[qi];
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t p = 0; p < P; ++p)
      a[p & 3] = _mm512_dpbf16_ps(a[p & 3], (__m512bh)_mm512_set1_epi32(q[p]), (__m512bh)tile[p]);
    _mm512_mask_storeu_ps(out[qi], store, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  }
}

// softmax of n scores in place; returns 1 / sum
inline float softmax_row(float* s, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  if (j < n) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << (n - j)) - 1), s + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), m));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// acc[qi][c] += p[qi][j] * v_j for keys j in [j0, j1) (slots ks), for nq queries (acc: nq * C vectors)
inline void pv_range(const int64_t* ks, int64_t j0, int64_t j1, const uint16_t* vbase, int64_t s_stride, int64_t C,
                     const float* const* p, int64_t nq, __m512* acc) {
  if (C == 4 && nq <= 4) {  // the common case (head_dim 64): accumulators in registers
    __m512 a[4][4];
    for (int64_t qi = 0; qi < nq; ++qi)
      for (int c = 0; c < 4; ++c) a[qi][c] = acc[qi * 4 + c];
    for (int64_t j = j0; j < j1; ++j) {
      const uint16_t* vp = vbase + ks[j] * s_stride;
      const __m512 v0 = load_bf16x16(vp), v1 = load_bf16x16(vp + 16), v2 = load_bf16x16(vp + 32),
                   v3 = load_bf16x16(vp + 48);
      for (int64_t qi = 0; qi < nq; ++qi) {
        const __m512 pj = _mm512_set1_ps(p[qi][j]);
        a[qi][0] = _mm512_fmadd_ps(pj, v0, a[qi][0]);
        a[qi][1] = _mm512_fmadd_ps(pj, v1, a[qi][1]);
        a[qi][2] = _mm512_fmadd_ps(pj, v2, a[qi][2]);
        a[qi][3] = _mm512_fmadd_ps(pj, v3, a[qi][3]);
      }
    }
    for (int64_t qi = 0; qi < nq; ++qi)
      for (int c = 0; c < 4; ++c) acc[qi * 4 + c] = a[qi][c];
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* vp = vbase + ks[j] * s_stride;
    for (int64_t c = 0; c < C; ++c) {
      const __m512 v = load_bf16x16(vp + 16 * c);
      for (int64_t qi = 0; qi < nq; ++qi)
        acc[qi * C + c] = _mm512_fmadd_ps(_mm512_set1_ps(p[qi][j]), v, acc[qi * C + c]);
    }
  }
}

// rows t0..t1-1 of one sequence (their key lists keys + koff[t]), K/V head hh
void attend_group(int64_t t0, int64_t t1, int64_t hh, const float* qf, int64_t H, int64_t G, int64_t D,
                  const int64_t* keys, const int64_t* koff, int64_t common, const uint16_t* kbase,
                  const uint16_t* vbase, int64_t s_stride, uint16_t* attn, AttnScratch& sc) {
  const int64_t R = t1 - t0, NQ = R * G, P = D / 2, C = D / 16;
  // queries (row-major: row r, head g) as bf16 pairs; score buffers
  sc.qpairs.resize(static_cast<size_t>(NQ * P));
  sc.qs.resize(NQ);
  sc.so.resize(NQ);
  sc.sp.resize(NQ);
  sc.at.resize(NQ);
  sc.inv.resize(NQ);
  std::vector<const int32_t*>& qs = sc.qs;
  std::vector<float*>& so = sc.so;
  std::vector<const float*>& sp = sc.sp;
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) total += G * (koff[t0 + r + 1] - koff[t0 + r]);
  sc.scores.resize(static_cast<size_t>(total + 16));
  float* sbase = sc.scores.data();
  for (int64_t r = 0, off = 0; r < R; ++r) {
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t qi = r * G + g;
      const float* q = qf + (t0 + r) * H * D + (hh * G + g) * D;
      int32_t* qp = sc.qpairs.data() + qi * P;
      for (int64_t p = 0; p < P; ++p)
        qp[p] = static_cast<int32_t>(f2bf(q[2 * p]) | (static_cast<uint32_t>(f2bf(q[2 * p + 1])) << 16));
      qs[qi] = qp;
      so[qi] = sbase + off;
      sp[qi] = so[qi];
      off += n;
    }
  }
  // the common prefix: tiles shared by every query of the sequence
  const int64_t* k0 = keys + koff[t0];
  std::vector<float*>& at = sc.at;
  for (int64_t j = 0; j < common; j += 16) {
    for (int64_t qi = 0; qi < NQ; ++qi) at[qi] = so[qi] + j;
    score_tile(k0 + j, std::min<int64_t>(16, common - j), kbase, s_stride, D, qs.data(), NQ, at.data(), sc);
  }
  // each row's own keys (window slots past the common prefix): its G queries
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    const int64_t* kr = keys + koff[t0 + r];
    for (int64_t j = common; j < n; j += 16) {
      for (int64_t g = 0; g < G; ++g) at[r * G + g] = so[r * G + g] + j;
      score_tile(kr + j, std::min<int64_t>(16, n - j), kbase, s_stride, D, qs.data() + r * G, G, at.data() + r * G, sc);
    }
  }
  std::vector<float>& inv = sc.inv;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    for (int64_t g = 0; g < G; ++g) inv[r * G + g] = softmax_row(so[r * G + g], n);
  }
  // p v: the common prefix for chunks of queries (register accumulators), then each row's own keys
  const int64_t QC = C == 4 ? 4 : 1;
  sc.acc.resize(static_cast<size_t>(QC * C));
  for (int64_t q0 = 0; q0 < NQ; q0 += QC) {
    const int64_t nq = std::min<int64_t>(QC, NQ - q0);
    __m512* acc = sc.acc.data();
    for (int64_t i = 0; i < nq * C; ++i) acc[i] = _mm512_setzero_ps();
    pv_range(k0, 0, common, vbase, s_stride, C, sp.data() + q0, nq, acc);
    for (int64_t qi = q0; qi < q0 + nq; ++qi) {
      const int64_t r = qi / G, g = qi % G;
      const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
      pv_range(keys + koff[t0 + r], common, n, vbase, s_stride, C, sp.data() + qi, 1, acc + (qi - q0) * C);
      uint16_t* out = attn + (t0 + r) * H * D + (hh * G + g) * D;
      const __m512 iv = _mm512_set1_ps(inv[qi]);
      for (int64_t c = 0; c < C; ++c) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, _mm512_mul_ps(acc[(qi - q0) * C + c], iv));
        for (int l = 0; l < 16; ++l) out[16 * c + l] = f2bf(tmp[l]);
      }
    }
  }
}
#else
#define IDLM_ATTN 0
// The same structure with simd.h's V16 arithmetic (AVX2, portable; the same bits on both):
//   score(q, k) = sum_d q_d k_d, one fma per dimension in order (lanes are 16 keys of a tile);
//   softmax over the row's keys in logical order (max, vexp, sum in 16 lanes by key index, tree16);
//   out = sum_j p_j v_j in logical key order (fma per dimension), times 1 / sum.
using idlm::V16;

struct AttnScratch {
  std::vector<float> scores, tile, inv;
  std::vector<const float*> qs;
  std::vector<float*> so, at;
};

// scores of up to 16 keys (slots ks, n <= 16) against nq fp32 queries (D each), written to out[qi] + 0..n-1
inline void score_tile(const int64_t* ks, int64_t n, const uint16_t* kbase, int64_t s_stride, int64_t D,
                       const float* const* qs, int64_t nq, float* const* out, AttnScratch& sc) {
  sc.tile.resize(static_cast<size_t>(D * 16));
  float* tile = sc.tile.data();  // tile[d * 16 + l] = k_l[d]
  for (int64_t l = 0; l < 16; ++l) {
    if (l < n) {
      const uint16_t* kp = kbase + ks[l] * s_stride;
      for (int64_t d = 0; d < D; ++d) tile[d * 16 + l] = bf2f(kp[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) tile[d * 16 + l] = 0.0f;
    }
  }
  int64_t qi = 0;
  for (; qi + 2 <= nq; qi += 2) {  // two queries at a time: independent chains
    const float* q0 = qs[qi];
    const float* q1 = qs[qi + 1];
    V16 a0 = idlm::vzero(), a1 = idlm::vzero();
    for (int64_t d = 0; d < D; ++d) {
      const V16 kd = idlm::vload(tile + d * 16);
      a0 = idlm::vfma(idlm::vset1(q0[d]), kd, a0);
      a1 = idlm::vfma(idlm::vset1(q1[d]), kd, a1);
    }
    idlm::Lanes l0(a0), l1(a1);
    std::memcpy(out[qi], l0.f, n * sizeof(float));
    std::memcpy(out[qi + 1], l1.f, n * sizeof(float));
  }
  for (; qi < nq; ++qi) {
    const float* q0 = qs[qi];
    V16 a0 = idlm::vzero();
    for (int64_t d = 0; d < D; ++d) a0 = idlm::vfma(idlm::vset1(q0[d]), idlm::vload(tile + d * 16), a0);
    idlm::Lanes l0(a0);
    std::memcpy(out[qi], l0.f, n * sizeof(float));
  }
}

// softmax of n scores in place; returns 1 / sum
inline float softmax_row(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  V16 sum = idlm::vzero();
  alignas(64) float t[16];
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t c = std::min<int64_t>(16, n - j);
    for (int64_t i = 0; i < 16; ++i) t[i] = i < c ? s[j + i] - mx : 0.0f;
    idlm::Lanes e(idlm::vexp(idlm::vload(t)));
    for (int64_t i = c; i < 16; ++i) e.f[i] = 0.0f;  // lanes past the last key add nothing
    std::memcpy(s + j, e.f, c * sizeof(float));
    sum = idlm::vadd(sum, idlm::vload(e.f));
  }
  return 1.0f / idlm::vsum(sum);
}

// rows t0..t1-1 of one sequence (their key lists keys + koff[t]), K/V head hh
void attend_group(int64_t t0, int64_t t1, int64_t hh, const float* qf, int64_t H, int64_t G, int64_t D,
                  const int64_t* keys, const int64_t* koff, int64_t common, const uint16_t* kbase,
                  const uint16_t* vbase, int64_t s_stride, uint16_t* attn, AttnScratch& sc) {
  const int64_t R = t1 - t0, NQ = R * G, C = D / 16;
  sc.qs.resize(NQ);
  sc.so.resize(NQ);
  sc.at.resize(NQ);
  sc.inv.resize(NQ);
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) total += G * (koff[t0 + r + 1] - koff[t0 + r]);
  sc.scores.resize(static_cast<size_t>(total + 16));
  float* sbase = sc.scores.data();
  for (int64_t r = 0, off = 0; r < R; ++r) {
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    for (int64_t g = 0; g < G; ++g) {
      sc.qs[r * G + g] = qf + (t0 + r) * H * D + (hh * G + g) * D;
      sc.so[r * G + g] = sbase + off;
      off += n;
    }
  }
  const int64_t* k0 = keys + koff[t0];
  for (int64_t j = 0; j < common; j += 16) {  // the common prefix: tiles shared by every query
    for (int64_t qi = 0; qi < NQ; ++qi) sc.at[qi] = sc.so[qi] + j;
    score_tile(k0 + j, std::min<int64_t>(16, common - j), kbase, s_stride, D, sc.qs.data(), NQ, sc.at.data(), sc);
  }
  for (int64_t r = 0; r < R; ++r) {  // each row's own keys past the common prefix
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    const int64_t* kr = keys + koff[t0 + r];
    for (int64_t j = common; j < n; j += 16) {
      for (int64_t g = 0; g < G; ++g) sc.at[r * G + g] = sc.so[r * G + g] + j;
      score_tile(kr + j, std::min<int64_t>(16, n - j), kbase, s_stride, D, sc.qs.data() + r * G, G,
                 sc.at.data() + r * G, sc);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    for (int64_t g = 0; g < G; ++g) sc.inv[r * G + g] = softmax_row(sc.so[r * G + g], n);
  }
  V16 acc[64];  // D <= 1024
  for (int64_t qi = 0; qi < NQ; ++qi) {
    const int64_t r = qi / G, g = qi % G;
    const int64_t n = koff[t0 + r + 1] - koff[t0 + r];
    const int64_t* kr = keys + koff[t0 + r];
    const float* p = sc.so[qi];
    for (int64_t c = 0; c < C; ++c) acc[c] = idlm::vzero();
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* vp = vbase + kr[j] * s_stride;
      const V16 pj = idlm::vset1(p[j]);
      for (int64_t c = 0; c < C; ++c) acc[c] = idlm::vfma(pj, idlm::vload_bf(vp + 16 * c), acc[c]);
    }
    uint16_t* out = attn + (t0 + r) * H * D + (hh * G + g) * D;
    const V16 iv = idlm::vset1(sc.inv[qi]);
    for (int64_t c = 0; c < C; ++c) {
      idlm::Lanes l(idlm::vmul(acc[c], iv));
      for (int i = 0; i < 16; ++i) out[16 * c + i] = f2bf(l.f[i]);
    }
  }
}
#endif

// ---- the forward ----------------------------------------------------------------------------------

// x: (T, hidden) bf16, updated in place and returned final-normed (a new tensor).
// cos, sin: (T, D) fp32 rotary rows of each token's position.
// gated: (G,) int64 rows whose LoRA gate is 1 (ascending), or empty.
// kpool, vpool: (layers, Hkv, slots, D) bf16 (slot stride may exceed D; D contiguous).
// write_slots: (n,) int64 pool slot of tokens 0..n-1 (later tokens are padding: no K/V, no attention).
// row_seq: (T,) int64 table row of each token's sequence (-1: padding).
// row_ctx: (T,) int64 the token sees its sequence's logical keys [0, ctx) ...
// row_ws, win: ... and logical key ws + j (j < W) when win[t, j] != 0 (and ws + j >= ctx).
// tables: (R, nb) int64 block tables (logical key k -> slot tables[r][k / bs] * bs + k % bs); empty:
//         logical key k is slot k.
at::Tensor forward(int64_t plan, at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& gated_t, at::Tensor kpool, at::Tensor vpool, const at::Tensor& write_slots,
                   const at::Tensor& row_seq, const at::Tensor& row_ctx, const at::Tensor& row_ws,
                   const at::Tensor& win, const at::Tensor& tables, int64_t block_size) {
  std::shared_ptr<Plan> pp;
  {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_plans.find(plan);
    TORCH_CHECK(it != g_plans.end(), "idlm native: unknown plan ", plan);
    pp = it->second;
  }
  const Plan& P = *pp;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2, "idlm native: x must be (T, H) bf16");
  TORCH_CHECK(kpool.scalar_type() == at::kBFloat16 && vpool.scalar_type() == at::kBFloat16, "idlm native: bf16 pool");
  TORCH_CHECK(kpool.stride(3) == 1 && vpool.stride(3) == 1 && kpool.stride(2) == vpool.stride(2) &&
              kpool.stride(1) == vpool.stride(1) && kpool.stride(0) == vpool.stride(0), "idlm native: pool layout");
  const int64_t T = x.size(0), Hd = P.hidden, H = P.heads, Hkv = P.kv_heads, D = P.head_dim;
  const int64_t G = H / Hkv, half = D / 2;
  const int64_t n_write = write_slots.size(0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* wslot = write_slots.data_ptr<int64_t>();
  const int64_t* rseq = row_seq.data_ptr<int64_t>();
  const int64_t* rctx = row_ctx.data_ptr<int64_t>();
  const int64_t* rws = row_ws.data_ptr<int64_t>();
  const int64_t W = win.dim() == 2 ? win.size(1) : 0;
  const uint8_t* wm = W ? win.data_ptr<uint8_t>() : nullptr;
  const bool ident = tables.numel() == 0;
  const int64_t nb = ident ? 0 : tables.size(1);
  const int64_t* tb = ident ? nullptr : tables.data_ptr<int64_t>();
  std::vector<int64_t> gated(gated_t.data_ptr<int64_t>(), gated_t.data_ptr<int64_t>() + gated_t.numel());

  // every row's key slots, in logical order (shared by all layers)
  std::vector<int64_t> koff(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 0;
    if (rseq[t] >= 0) {
      n = rctx[t];
      for (int64_t j = 0; j < W; ++j)
        if (wm[t * W + j] && rws[t] + j >= rctx[t]) ++n;
    }
    koff[t + 1] = koff[t] + n;
  }
  std::vector<int64_t> keys(koff[T]);
  auto slot_of = [&](int64_t r, int64_t k) -> int64_t {
    return ident ? k : tb[r * nb + k / block_size] * block_size + k % block_size;
  };
  for (int64_t t = 0; t < T; ++t) {
    if (rseq[t] < 0) continue;
    int64_t* kk = keys.data() + koff[t];
    const int64_t r = rseq[t];
    for (int64_t k = 0; k < rctx[t]; ++k) *kk++ = slot_of(r, k);
    for (int64_t j = 0; j < W; ++j)
      if (wm[t * W + j] && rws[t] + j >= rctx[t]) *kk++ = slot_of(r, rws[t] + j);
  }

  // runs of consecutive rows of one sequence, and the logical keys all of them see
  struct Group {
    int64_t t0, t1, common, hh;
  };
  std::vector<Group> groups, work;
  for (int64_t t = 0; t < T;) {
    if (rseq[t] < 0 || koff[t + 1] == koff[t]) {
      ++t;
      continue;
    }
    int64_t e = t + 1, common = rctx[t];
    while (e < T && rseq[e] == rseq[t] && koff[e + 1] > koff[e]) common = std::min(common, rctx[e++]);
    groups.push_back({t, e, common, 0});
    t = e;
  }
  // work items: (rows, kv head); a sequence's rows are split in chunks until there are two items per
  // thread, where they can be (a row's result does not depend on which rows share its item)
  const int64_t want = 2 * at::get_num_threads();
  const int64_t base_items = static_cast<int64_t>(groups.size()) * Hkv;
  const int64_t splits = base_items >= want ? 1 : (want + base_items - 1) / std::max<int64_t>(base_items, 1);
  for (const Group& gr : groups) {
    const int64_t R = gr.t1 - gr.t0, parts = std::min(R, splits);
    for (int64_t i = 0; i < parts; ++i)
      for (int64_t hh = 0; hh < Hkv; ++hh)
        work.push_back({gr.t0 + R * i / parts, gr.t0 + R * (i + 1) / parts, gr.common, hh});
  }

  uint16_t* xp = bfm(x);
  at::Tensor h = at::empty({T, Hd}, x.options());
  at::Tensor attn = at::zeros({T, H * D}, x.options());
  at::Tensor qf = at::empty({T, H * D}, x.options().dtype(at::kFloat));
  const int64_t sL = kpool.stride(0), sH = kpool.stride(1), sS = kpool.stride(2);
  uint16_t* kpp = bfm(kpool);
  uint16_t* vpp = bfm(vpool);
  // grains: a stage's rows go to the thread pool only when there is enough work to pay for waking it
  const int64_t row_grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(Hd, 1));
  const int64_t rope_grain = std::max<int64_t>(1, 8192 / std::max<int64_t>((H + 2 * Hkv) * D, 1));
  const int64_t act_grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(P.inter, 1));
  int64_t attn_work = 0;  // query vectors x keys
  for (const Group& gr : work) attn_work += (koff[gr.t1] - koff[gr.t0]) * G;
  const int64_t attn_grain = attn_work < (1 << 14) ? static_cast<int64_t>(work.size()) + 1 : 1;

  StageClock clk;
  clk.lap(S_OTHER);
  for (int64_t li = 0; li < P.layers; ++li) {
    const LayerW& lw = P.ws[li];
    const uint16_t* w1 = bf(lw.ln1);
    uint16_t* hp = bfm(h);
    at::parallel_for(0, T, row_grain, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) rmsnorm_row(xp + t * Hd, w1, hp + t * Hd, Hd, P.eps);
    });
    clk.lap(S_NORM);
    at::Tensor qkv = lw.qkv(h, gated);  // (T, >= (H + 2 Hkv) D)
    clk.lap(S_QKV);
    const uint16_t* qp = bf(qkv);
    const int64_t qs = qkv.size(1);
    float* qfp = qf.data_ptr<float>();
    uint16_t* kl = kpp + li * sL;
    uint16_t* vl = vpp + li * sL;
    const uint16_t* qn = lw.qn.defined() ? bf(lw.qn) : nullptr;
    const uint16_t* kn = lw.kn.defined() ? bf(lw.kn) : nullptr;
    // q/k norm (Qwen3), RoPE, q scaled to fp32, k/v written to the pool
    at::parallel_for(0, T, rope_grain, [&](int64_t a, int64_t b) {
      uint16_t tmp[1024];
      float f[1024];
      for (int64_t t = a; t < b; ++t) {
        const float* c = cs + t * D;
        const float* s = sn + t * D;
        for (int64_t hh = 0; hh < H + Hkv; ++hh) {
          const uint16_t* src = qp + t * qs + hh * D;
          const bool is_q = hh < H;
          const uint16_t* nw = is_q ? qn : kn;
          if (nw) {
            rmsnorm_row(src, nw, tmp, D, P.eps);
            src = tmp;
          }
          for (int64_t d = 0; d < D; ++d) f[d] = bf2f(src[d]);
          if (is_q) {
            float* dst = qfp + t * H * D + hh * D;
            for (int64_t d = 0; d < half; ++d) {
              dst[d] = (f[d] * c[d] - f[d + half] * s[d]) * scale;
              dst[d + half] = (f[d + half] * c[d + half] + f[d] * s[d + half]) * scale;
            }
          } else if (t < n_write) {
            uint16_t* dst = kl + (hh - H) * sH + wslot[t] * sS;
            for (int64_t d = 0; d < half; ++d) {
              dst[d] = f2bf(f[d] * c[d] - f[d + half] * s[d]);
              dst[d + half] = f2bf(f[d + half] * c[d + half] + f[d] * s[d + half]);
            }
          }
        }
        if (t < n_write)
          for (int64_t hh = 0; hh < Hkv; ++hh)
            std::memcpy(vl + hh * sH + wslot[t] * sS, qp + t * qs + (H + Hkv + hh) * D, D * sizeof(uint16_t));
      }
    });
    clk.lap(S_ROPE);
    uint16_t* ap = bfm(attn);
    // attention: one work item per (rows of a sequence, kv head); padding rows stay zero
    at::parallel_for(0, static_cast<int64_t>(work.size()), attn_grain, [&](int64_t a, int64_t b) {
      thread_local AttnScratch scratch;
      for (int64_t it = a; it < b; ++it) {
        const Group& gr = work[it];
        attend_group(gr.t0, gr.t1, gr.hh, qfp, H, G, D, keys.data(), koff.data(), gr.common, kl + gr.hh * sH,
                     vl + gr.hh * sH, sS, ap, scratch);
      }
    });
    clk.lap(S_ATTN);
    at::Tensor o = lw.o(attn, gated);  // (T, >= hidden)
    clk.lap(S_O);
    const uint16_t* op = bf(o);
    const int64_t ols = o.size(1);
    const uint16_t* w2 = bf(lw.ln2);
    at::parallel_for(0, T, row_grain, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        uint16_t* xr = xp + t * Hd;
        for (int64_t k = 0; k < Hd; ++k) xr[k] = f2bf(bf2f(xr[k]) + bf2f(op[t * ols + k]));
        rmsnorm_row(xr, w2, hp + t * Hd, Hd, P.eps);
      }
    });
    clk.lap(S_NORM);
    at::Tensor gu = lw.gate_up(h, gated);  // (T, >= 2 I)
    clk.lap(S_GATE_UP);
    const int64_t I = P.inter, gls = gu.size(1);
    at::Tensor act = at::empty({T, I}, x.options());
    const uint16_t* gp = bf(gu);
    uint16_t* actp = bfm(act);
    at::parallel_for(0, T, act_grain, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const uint16_t* gr = gp + t * gls;
        uint16_t* ar = actp + t * I;
        int64_t k = 0;
        for (; k + 16 <= I; k += 16) {  // exp_f's operations lane by lane (vexp): the same bits
          const idlm::V16 g = idlm::vload_bf(gr + k);
          const idlm::V16 e = idlm::vexp(idlm::vsub(idlm::vzero(), g));
          idlm::Lanes y(idlm::vmul(idlm::vdiv(g, idlm::vadd(idlm::vset1(1.0f), e)), idlm::vload_bf(gr + I + k)));
          for (int l = 0; l < 16; ++l) ar[k + l] = f2bf(y.f[l]);
        }
        for (; k < I; ++k) {
          const float g = bf2f(gr[k]);
          const float u = bf2f(gr[I + k]);
          ar[k] = f2bf(g / (1.0f + exp_f(0.0f - g)) * u);
        }
      }
    });
    clk.lap(S_ACT);
    at::Tensor dn = lw.down(act, gated);  // (T, >= hidden)
    clk.lap(S_DOWN);
    const uint16_t* dp = bf(dn);
    const int64_t dls = dn.size(1);
    at::parallel_for(0, T, row_grain, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        uint16_t* xr = xp + t * Hd;
        for (int64_t k = 0; k < Hd; ++k) xr[k] = f2bf(bf2f(xr[k]) + bf2f(dp[t * dls + k]));
      }
    });
  }
  clk.lap(S_NORM);
  at::Tensor out = at::empty({T, Hd}, x.options());
  const uint16_t* nw = bf(P.norm);
  uint16_t* outp = bfm(out);
  at::parallel_for(0, T, row_grain, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) rmsnorm_row(xp + t * Hd, nw, outp + t * Hd, Hd, P.eps);
  });
  return out;
}

}  // namespace

std::vector<double> profile_op() {
  std::vector<double> v(g_stage, g_stage + S_COUNT);
  std::fill(g_stage, g_stage + S_COUNT, 0.0);
  return v;
}

std::string profile_names_op() { return kStageNames; }

std::string isa_op() { return std::string("dense: ") + idlm::simd_isa() + ", " + idlm::wmm_isa(); }

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return idlm::linear(x, w, bias);
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) { return idlm::rms_norm(x, w, eps); }
at::Tensor silu_mul_op(const at::Tensor& g, const at::Tensor& u) { return idlm::silu_mul(g, u); }

at::Tensor attend_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, int64_t R,
                     int64_t G) {
  return idlm::attend(q, k, v, bias, R, G);
}

at::Tensor wmm_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
                  const c10::optional<at::Tensor>& bias) {
  return idlm::wmm(x, packed, params, kind, n, bias);
}

std::tuple<at::Tensor, at::Tensor> int4_pack_op(const at::Tensor& codes, const at::Tensor& scale,
                                                const at::Tensor& minimum, bool a8) {
  return idlm::int4_pack(codes, scale, minimum, a8);
}

std::tuple<at::Tensor, at::Tensor> int8_pack_op(const at::Tensor& codes, const at::Tensor& scale, bool a8) {
  return idlm::int8_pack(codes, scale, a8);
}

TORCH_LIBRARY(idlm_native, m) {
  m.def("profile() -> float[]", profile_op);
  m.def("profile_names() -> str", profile_names_op);
  m.def("isa() -> str", isa_op);
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor", linear_op);
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor bias, int R, int G) -> Tensor", attend_op);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", rms_norm_op);
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor", silu_mul_op);
  m.def("wmm(Tensor x, Tensor packed, Tensor params, int kind, int n, Tensor? bias=None) -> Tensor", wmm_op);
  m.def("int4_pack(Tensor codes, Tensor scale, Tensor minimum, bool a8=False) -> (Tensor, Tensor)", int4_pack_op);
  m.def("int8_pack(Tensor codes, Tensor scale, bool a8=False) -> (Tensor, Tensor)", int8_pack_op);
  m.def("plan_create(Tensor[] tensors, int[] meta, float eps) -> int", plan_create);
  m.def("plan_release(int plan) -> ()", plan_release);
  m.def("forward(int plan, Tensor x, Tensor cos, Tensor sin, Tensor gated, Tensor kpool, Tensor vpool, "
        "Tensor write_slots, Tensor row_seq, Tensor row_ctx, Tensor row_ws, Tensor win, Tensor tables, "
        "int block_size) -> Tensor",
        forward);
}
