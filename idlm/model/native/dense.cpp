// idlm's dense matmul and attention for inference (dense.h): every output's reduction order is fixed by
// this source, so a row's result never depends on how many rows share the call, which CPU runs it, or
// which instruction set it was built for.
//
// linear: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) with x and w fp32 or bf16 (upcast exactly). The sum
//   runs in 16 lanes, lane l taking k = l, l + 16, l + 32, ... in order with a fused multiply-add, and the
//   lanes end in tree16 (simd.h), then + bias in fp32, then one rounding to the output dtype. The weight
//   is read as it is ((N, K) row-major, no packing): each output is one dot product of two rows.
// attend: one query row over the keys it may see (bias 0) in their order: scores by the same 16-lane dot
//   product over the head dim, times 1 / sqrt(D); softmax with vexp (simd.h), its sum in 16 lanes by key
//   ordinal; p v accumulated key by key with a fused multiply-add per dimension; times 1 / sum.
// rms_norm: per row, the sum of squares in 16 lanes (fma, tree16), r = 1 / sqrt(ss / n + eps), y = x r w.
// silu_mul: y = g / (1 + exp(-g)) u elementwise, exp by vexp (the same bits for every element position).

#include "dense.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace idlm {

const char* simd_isa() { return IDLM_V16_ISA; }

namespace {

inline V16 load16(const float* p) { return vload(p); }
inline V16 load16(const uint16_t* p) { return vload_bf(p); }
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf2f(*p); }

// Rows of x as fp32 (bf16 upcast exactly), one buffer per call.
void rows_f32(const at::Tensor& x, std::vector<float>& out) {
  const int64_t n = x.numel();
  out.resize(static_cast<size_t>(n));
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), x.data_ptr<float>(), n * sizeof(float));
    return;
  }
  const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr());
  for (int64_t i = 0; i < n; ++i) out[i] = bf2f(p[i]);
}

// The 16-lane dot products of one row x (fp32, K) with C weight rows w[c] (K each).
template <int C, typename W>
inline void dots(const float* x, const W* const* w, int64_t K, float* out) {
  V16 a[C];
  for (int c = 0; c < C; ++c) a[c] = vzero();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const V16 xv = vload(x + k);
    for (int c = 0; c < C; ++c) a[c] = vfma(xv, load16(w[c] + k), a[c]);
  }
  for (int c = 0; c < C; ++c) {
    Lanes l(a[c]);
    for (int64_t j = k; j < K; ++j) l.f[j - k] = std::fmaf(x[j], load1(w[c] + j), l.f[j - k]);
    out[c] = tree16(l.f);
  }
}

template <typename W>
void linear_impl(const float* x, const W* w, const float* bias, int64_t M, int64_t K, int64_t N, float* y) {
  constexpr int C = 4;  // weight rows per pass: independent accumulators and one x load for four rows
  constexpr int64_t TILE = 16;  // x rows per tile (kept in cache while the weight rows stream)
  const int64_t quads = (N + C - 1) / C;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, quads, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t m0 = 0; m0 < M; m0 += TILE) {
      const int64_t m1 = std::min(M, m0 + TILE);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n0 = q * C, nc = std::min<int64_t>(C, N - n0);
        const W* rows[C];
        for (int c = 0; c < C; ++c) rows[c] = w + (n0 + std::min<int64_t>(c, nc - 1)) * K;
        float out[C];
        for (int64_t m = m0; m < m1; ++m) {
          dots<C>(x + m * K, rows, K, out);
          for (int64_t c = 0; c < nc; ++c) y[m * N + n0 + c] = bias ? out[c] + bias[n0 + c] : out[c];
        }
      }
    }
  });
}

}  // namespace

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1), "idlm linear: x (M, K), w (N, K)");
  const auto xt = x_in.scalar_type(), wt = w_in.scalar_type();
  TORCH_CHECK((xt == at::kFloat || xt == at::kBFloat16) && (wt == at::kFloat || wt == at::kBFloat16),
              "idlm linear: fp32 or bf16 only");
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return yf.to(xt);
  std::vector<float> xf;
  rows_f32(x, xf);
  at::Tensor b;
  const float* bp = nullptr;
  if (bias_in.has_value() && bias_in->defined() && bias_in->numel()) {
    TORCH_CHECK(bias_in->numel() == N, "idlm linear: bias must have N entries");
    b = bias_in->to(at::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  float* yp = yf.data_ptr<float>();
  if (wt == at::kFloat)
    linear_impl(xf.data(), w.data_ptr<float>(), bp, M, K, N, yp);
  else
    linear_impl(xf.data(), reinterpret_cast<const uint16_t*>(w.data_ptr()), bp, M, K, N, yp);
  return xt == at::kFloat ? yf : yf.to(at::kBFloat16);  // one rounding (round to nearest even)
}

namespace {

// One query row (fp32, D) over keys ks[0..n) of k / v (rows of D, element type T): out (D) fp32.
template <typename T>
void attend_row(const float* q, const T* k, const T* v, const int64_t* ks, const float* kb, int64_t n, int64_t D,
                float scale, float* out, std::vector<float>& sc) {
  sc.resize(static_cast<size_t>(n + 16));
  float* s = sc.data();
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + ks[j] * D;
    const T* rows[1] = {kr};
    float d;
    dots<1>(q, rows, D, &d);
    s[j] = d * scale + kb[j];
  }
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  V16 sum = vzero();
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t c = std::min<int64_t>(16, n - j);
    alignas(64) float t[16];
    for (int64_t i = 0; i < 16; ++i) t[i] = i < c ? s[j + i] - mx : 0.0f;
    Lanes e(vexp(vload(t)));
    for (int64_t i = c; i < 16; ++i) e.f[i] = 0.0f;  // lanes past the last key add nothing
    for (int64_t i = 0; i < c; ++i) s[j + i] = e.f[i];
    sum = vadd(sum, vload(e.f));
  }
  const float inv = 1.0f / vsum(sum);
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    V16 a = vzero();
    for (int64_t j = 0; j < n; ++j) a = vfma(vset1(s[j]), load16(v + ks[j] * D + d0), a);
    vstore(out + d0, vmul(a, vset1(inv)));
  }
  for (int64_t d = d0; d < D; ++d) {
    float a = 0.0f;
    for (int64_t j = 0; j < n; ++j) a = std::fmaf(s[j], load1(v + ks[j] * D + d), a);
    out[d] = a * inv;
  }
}

template <typename T>
void attend_impl(const float* q, const T* k, const T* v, const float* bias, int64_t B, int64_t R, int64_t G,
                 int64_t Tq, int64_t S, int64_t D, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t M = G * Tq;
  at::parallel_for(0, B * M, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int64_t> ks;
    std::vector<float> kb, sc;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / M, row = i % M, t = row % Tq, r = b % R;
      const float* br = bias + (r * Tq + t) * S;
      ks.clear();
      kb.clear();
      for (int64_t s = 0; s < S; ++s)
        if (br[s] != -INFINITY) {
          ks.push_back(s);
          kb.push_back(br[s]);
        }
      float* o = out + i * D;
      if (ks.empty()) {
        std::fill(o, o + D, 0.0f);
        continue;
      }
      attend_row(q + i * D, k + b * S * D, v + b * S * D, ks.data(), kb.data(), static_cast<int64_t>(ks.size()), D,
                 scale, o, sc);
    }
  });
}

}  // namespace

at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& bias_in,
                  int64_t R, int64_t G) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.sizes() == k_in.sizes() && q_in.size(0) == k_in.size(0) &&
                  q_in.size(2) == k_in.size(2),
              "idlm attend: q (B, G*T, D), k and v (B, S, D)");
  TORCH_CHECK(k_in.scalar_type() == v_in.scalar_type(), "idlm attend: k and v of one dtype");
  const int64_t B = q_in.size(0), M = q_in.size(1), D = q_in.size(2), S = k_in.size(1);
  TORCH_CHECK(R > 0 && G > 0 && B % R == 0 && M % G == 0, "idlm attend: B must be Hkv * R and rows G * T");
  const int64_t Tq = M / G;
  TORCH_CHECK(bias_in.dim() == 3 && bias_in.size(0) == R && bias_in.size(1) == Tq && bias_in.size(2) == S,
              "idlm attend: bias (R, T, S)");
  at::Tensor q = q_in.to(at::kFloat).contiguous();
  at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, M, D}, q.options());
  if (B * M == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (k.scalar_type() == at::kFloat) {
    attend_impl(qp, k.data_ptr<float>(), v.data_ptr<float>(), bp, B, R, G, Tq, S, D, op);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kBFloat16, "idlm attend: k and v fp32 or bf16");
    attend_impl(qp, reinterpret_cast<const uint16_t*>(k.data_ptr()), reinterpret_cast<const uint16_t*>(v.data_ptr()),
                bp, B, R, G, Tq, S, D, op);
  }
  return out;
}

namespace {

template <typename T>
inline void put(T* p, float v);
template <>
inline void put<float>(float* p, float v) { *p = v; }
template <>
inline void put<uint16_t>(uint16_t* p, float v) { *p = f2bf(v); }

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      V16 a = vzero();
      int64_t k = 0;
      for (; k + 16 <= n; k += 16) {
        const V16 v = load16(xr + k);
        a = vfma(v, v, a);
      }
      Lanes l(a);
      for (int64_t j = k; j < n; ++j) {
        const float v = load1(xr + j);
        l.f[j - k] = std::fmaf(v, v, l.f[j - k]);
      }
      const float inv = 1.0f / std::sqrt(tree16(l.f) / static_cast<float>(n) + eps);
      for (int64_t j = 0; j < n; ++j) put(y + r * n + j, load1(xr + j) * inv * load1(w + j));
    }
  });
}

template <typename T>
void silu_mul_impl(const T* g, const T* u, T* y, int64_t n) {
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t b0, int64_t b1) {
    alignas(64) float gf[16], uf[16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * 16, c = std::min<int64_t>(16, n - i0);
      for (int64_t i = 0; i < 16; ++i) {
        gf[i] = i < c ? load1(g + i0 + i) : 0.0f;
        uf[i] = i < c ? load1(u + i0 + i) : 0.0f;
      }
      const V16 gv = vload(gf);
      const V16 e = vexp(vsub(vzero(), gv));
      Lanes out(vmul(vdiv(gv, vadd(vset1(1.0f), e)), vload(uf)));
      for (int64_t i = 0; i < c; ++i) put(y + i0 + i, out.f[i]);
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  const int64_t n = x_in.size(-1);
  TORCH_CHECK(w_in.numel() == n, "idlm rms_norm: weight must have the last dim's size");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "idlm rms_norm: fp32 or bf16 only");
  at::Tensor x = x_in.contiguous(), w = w_in.to(dt).contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  if (rows == 0) return y;
  if (dt == at::kFloat)
    rms_norm_impl(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, n, static_cast<float>(eps));
  else
    rms_norm_impl(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<const uint16_t*>(w.data_ptr()),
                  reinterpret_cast<uint16_t*>(y.data_ptr()), rows, n, static_cast<float>(eps));
  return y;
}

at::Tensor silu_mul(const at::Tensor& g_in, const at::Tensor& u_in) {
  TORCH_CHECK(g_in.sizes() == u_in.sizes() && g_in.scalar_type() == u_in.scalar_type(),
              "idlm silu_mul: g and u of one shape and dtype");
  const auto dt = g_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "idlm silu_mul: fp32 or bf16 only");
  at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor y = at::empty_like(g);
  if (dt == at::kFloat)
    silu_mul_impl(g.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>(), g.numel());
  else
    silu_mul_impl(reinterpret_cast<const uint16_t*>(g.data_ptr()), reinterpret_cast<const uint16_t*>(u.data_ptr()),
                  reinterpret_cast<uint16_t*>(y.data_ptr()), g.numel());
  return y;
}

}  // namespace idlm
