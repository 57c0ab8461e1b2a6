// Fused causal ALiBi attention for CPU: flash-style forward and backward, fp32 and bf16.
//
//   out[b, i, h, :] = sum_j softmax_j(scale * q_i . k_j + slope_h * (j - qpos_i)) v_j
//   over keys key_offset[b] <= j <= qpos_i, where qpos_i = query_start + i.
//
// (slope*(j - qpos) and BLOOM's slope*j differ by a per-row constant, which softmax ignores; the
// relative form keeps the fp32 scores and the saved logsumexp near zero.)
//
// Inputs q, k, v: [b, heads, s, hd], any strides with the last one 1 (the model passes views of the
// fused qkv projection). Output: [b, s_q, heads, hd] contiguous (so the model's
// transpose(1, 2).reshape(b, s, h) is a view), plus the per-row logsumexp [b, heads, s_q] fp32.
// A row with no allowed key (a left-padding query) gets a zero output and logsumexp +inf.
//
// Design:
// - Blocks of Bq query rows x Bk keys; key blocks that are entirely in the future or entirely
//   padding are never touched (about half of the score work for causal training).
// - Block products go through ATen's cpublas::brgemm (oneDNN's brgemm ukernel, runtime ISA
//   dispatch inside oneDNN). For bf16 the B operands are packed in the VNNI-2 layout (pairs of K
//   rows interleaved), which is what the bf16 ukernel (AVX-512-BF16 / AMX) needs; where that path
//   is not available (checked once at run time) brgemm is called with plain layouts and ATen falls
//   back to its bf16 -> fp32 gemm. Scores, softmax statistics and accumulators are fp32.
// - Online softmax (running max and sum per row); the backward recomputes the block scores from
//   q, k and the saved logsumexp, with D = rowsum(dO * O) precomputed.
// - Threads: at::parallel_for over (batch x head x query block) in the forward and over
//   (batch x head) in the backward, so torch.set_num_threads / OMP_NUM_THREADS apply.
//
// This file is compiled three times (baseline, AVX2, AVX-512: see setup.py and the two
// alibi_attention_avx*.cpp wrappers); CPU_CAPABILITY
// selects at::vec's implementation and keeps the three modules' symbols apart. Python loads the
// one that torch's own CPU capability allows.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _attn_default
#endif

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>


namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace cpublas = at::native::cpublas;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round2(int64_t a) { return (a + 1) & ~int64_t(1); }

// ---------------------------------------------------------------------------------------------
// GEMM: C[M, N] (fp32, ldc) (+)= A[M, K] (lda) * B[K, N] (ldb; VNNI-2 packed when vnni).

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool add, bool /*vnni*/) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda,
                 const BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool add, bool vnni) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, vnni);
}

inline uint16_t bf16_bits(float x) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Whether the bf16 VNNI brgemm ukernel runs here: one tiny product, once per process.
bool bf16_vnni_available() {
  static const bool ok = [] {
    try {
      // A = [[1, 2], [3, 4]], B = [[1, 0], [0, 1]] (K = 2, N = 2): VNNI word n holds (B[0][n], B[1][n]).
      BFloat16 A[4] = {1.f, 2.f, 3.f, 4.f};
      BFloat16 B[4] = {1.f, 0.f, 0.f, 1.f};  // (B00, B10), (B01, B11)
      float C[4] = {0, 0, 0, 0};
      cpublas::brgemm(2, 2, 2, 2, 2, 2, false, A, B, C, true);
      cpublas::brgemm_release(true);
      return C[0] == 1.f && C[1] == 2.f && C[2] == 3.f && C[3] == 4.f;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Conversions and packing (once per batch x head; the per-block work below is vectorised).

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) dst[i] = static_cast<float>(src[i]);
}
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * 4); }

inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * 4); }
inline void from_float(const float* src, BFloat16* dst, int64_t n) { at::vec::convert(src, dst, n); }

// dst[d * ld + r] = X[r][d] for r < n (rows of X at stride xs); columns n..n_pad-1 zeroed.
template <typename T>
void pack_transposed(const T* X, int64_t xs, int64_t n, int64_t n_pad, int64_t D, T* dst) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < n; r0 += kTile) {
    const int64_t r1 = std::min(n, r0 + kTile);
    for (int64_t d = 0; d < D; d++) {
      T* out = dst + d * n_pad;
      for (int64_t r = r0; r < r1; r++) out[r] = X[r * xs + d];
    }
  }
  for (int64_t d = 0; d < D; d++)
    for (int64_t r = n; r < n_pad; r++) dst[d * n_pad + r] = T(0.f);
}

// B = X^T in VNNI-2 blocks of Bn columns: block j holds [D/2][Bn] 32-bit words, word (d2, c) =
// (X[j*Bn + c][2*d2], X[j*Bn + c][2*d2 + 1]): a 32-bit transpose. Columns past n are zero.
void pack_transposed_vnni(const BFloat16* X, int64_t xs, int64_t n, int64_t Bn, int64_t D,
                          BFloat16* dst) {
  const int64_t nblocks = ceil_div(n, Bn), D2 = D / 2;
  for (int64_t jb = 0; jb < nblocks; jb++) {
    uint32_t* out = reinterpret_cast<uint32_t*>(dst + jb * D * Bn);
    const int64_t c1 = std::min(Bn, n - jb * Bn);
    for (int64_t c = 0; c < c1; c++) {
      const uint32_t* row = reinterpret_cast<const uint32_t*>(X + (jb * Bn + c) * xs);
      for (int64_t d2 = 0; d2 < D2; d2++) out[d2 * Bn + c] = row[d2];
    }
    for (int64_t d2 = 0; d2 < D2; d2++)
      for (int64_t c = c1; c < Bn; c++) out[d2 * Bn + c] = 0;
  }
}

// B = X (rows as K) in VNNI-2 blocks of Bn rows: block j holds [Bn/2][D] words, word (r2, d) =
// (X[j*Bn + 2*r2][d], X[j*Bn + 2*r2 + 1][d]). Rows past n are zero.
void pack_rows_vnni(const BFloat16* X, int64_t xs, int64_t n, int64_t Bn, int64_t D,
                    BFloat16* dst) {
  const int64_t nblocks = ceil_div(n, Bn);
  for (int64_t jb = 0; jb < nblocks; jb++) {
    uint16_t* out = reinterpret_cast<uint16_t*>(dst + jb * Bn * D);
    for (int64_t r = 0; r < Bn; r++) {
      const int64_t row = jb * Bn + r;
      uint16_t* o = out + (r / 2) * 2 * D + (r % 2);
      if (row < n) {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(X + row * xs);
        for (int64_t d = 0; d < D; d++) o[2 * d] = x[d];
      } else {
        for (int64_t d = 0; d < D; d++) o[2 * d] = 0;
      }
    }
  }
}

// Two fp32 rows a (even K index) and b (odd) -> one VNNI-2 row of n words.
inline void store_vnni_pair(const float* a, const float* b, BFloat16* dst, int64_t n) {
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t c = 0; c < n; c++)
    out[c] = static_cast<uint32_t>(bf16_bits(a[c])) | (static_cast<uint32_t>(bf16_bits(b[c])) << 16);
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch that grows but is never freed: no allocation per call after warm-up.

struct Scratch {
  std::vector<float> f;
  std::vector<uint16_t> h;
  std::vector<uint16_t> shared;  // the caller's buffer shared by all workers (forward packs)
  template <typename T>
  T* shared_elems(size_t n) {
    if (shared.size() * 2 < n * sizeof(T)) shared.resize((n * sizeof(T) + 1) / 2);
    return reinterpret_cast<T*>(shared.data());
  }
  float* floats(size_t n) {
    if (f.size() < n) f.resize(n);
    return f.data();
  }
  template <typename T>
  T* elems(size_t n) {
    if (h.size() * 2 < n * sizeof(T)) h.resize((n * sizeof(T) + 1) / 2);
    return reinterpret_cast<T*>(h.data());
  }
};
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

struct Geometry {
  int64_t B, H, Sq, Sk, D;
  int64_t qsb, qsh, qss, ksb, ksh, kss, vsb, vsh, vss;
  int64_t query_start;
  float scale;
  const float* slopes;
  const int64_t* key_offset;  // nullptr: none
  int64_t kv_begin(int64_t b) const {
    return key_offset ? std::min(std::max<int64_t>(key_offset[b], 0), Sk) : 0;
  }
};

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& slopes, const c10::optional<at::Tensor>& key_offset,
                  int64_t query_start, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "alibi_attention: q, k, v must be 4-D [b, heads, s, hd]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "alibi_attention: q, k, v must have one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "alibi_attention: float32 or bfloat16 only, got ", q.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "alibi_attention: CPU tensors only");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) && k.sizes() == v.sizes(),
              "alibi_attention: shapes do not match: q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "alibi_attention: the head dimension must have stride 1");
  TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.is_contiguous() && slopes.numel() == q.size(1),
              "alibi_attention: slopes must be a contiguous float32 [heads] tensor");
  TORCH_CHECK(query_start >= 0, "alibi_attention: query_start must be >= 0");
  Geometry g;
  g.B = q.size(0), g.H = q.size(1), g.Sq = q.size(2), g.Sk = k.size(2), g.D = q.size(3);
  g.qsb = q.stride(0), g.qsh = q.stride(1), g.qss = q.stride(2);
  g.ksb = k.stride(0), g.ksh = k.stride(1), g.kss = k.stride(2);
  g.vsb = v.stride(0), g.vsh = v.stride(1), g.vss = v.stride(2);
  g.query_start = query_start;
  g.scale = static_cast<float>(scale);
  g.slopes = slopes.data_ptr<float>();
  g.key_offset = nullptr;
  if (key_offset.has_value() && key_offset->defined()) {
    TORCH_CHECK(key_offset->scalar_type() == at::kLong && key_offset->is_contiguous() && key_offset->numel() == g.B,
                "alibi_attention: key_offset must be a contiguous int64 [b] tensor");
    g.key_offset = key_offset->data_ptr<int64_t>();
  }
  return g;
}

inline float hmax(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(__m512(x));
#endif
  alignas(64) float t[Vec::size()];
  x.store(t);
  float m = t[0];
  for (int i = 1; i < Vec::size(); i++) m = std::max(m, t[i]);
  return m;
}
inline float hsum(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(__m512(x));
#endif
  alignas(64) float t[Vec::size()];
  x.store(t);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); i++) s += t[i];
  return s;
}

// Scores of one row over columns [c_lo, c_hi) of a block: s = scale * S + slope * c + base.
// Writes s back into S; returns the max.
inline float scores_row(float* S, int64_t c_lo, int64_t c_hi, float scale, float slope, float base) {
  const Vec vscale(scale), vslope(slope), vbase(base);
  Vec vmax(kNegInf);
  const Vec viota = Vec::arange(0.f, 1.f);
  int64_t c = c_lo;
  for (; c + Vec::size() <= c_hi; c += Vec::size()) {
    Vec pos = viota + Vec(static_cast<float>(c));
    Vec s = at::vec::fmadd(Vec::loadu(S + c), vscale, at::vec::fmadd(pos, vslope, vbase));
    s.store(S + c);
    vmax = at::vec::maximum(vmax, s);
  }
  float m = hmax(vmax);
  for (; c < c_hi; c++) {
    float s = S[c] * scale + (slope * static_cast<float>(c) + base);
    S[c] = s;
    m = std::max(m, s);
  }
  return m;
}

// p = exp(S - m) over [c_lo, c_hi) in place; returns the sum.
inline float exp_row(float* S, int64_t c_lo, int64_t c_hi, float m) {
  const Vec vm(m);
  Vec vsum(0.f);
  int64_t c = c_lo;
  for (; c + Vec::size() <= c_hi; c += Vec::size()) {
    Vec p = (Vec::loadu(S + c) - vm).exp_u20();
    p.store(S + c);
    vsum = vsum + p;
  }
  if (c < c_hi) {
    const int64_t n = c_hi - c;
    Vec p = (Vec::loadu(S + c, n) - vm).exp_u20();
    p.store(S + c, n);
    alignas(64) float tmp[Vec::size()] = {};
    p.store(tmp, n);
    vsum = vsum + Vec::loadu(tmp);
  }
  return hsum(vsum);
}

inline void scale_row(float* x, int64_t n, float alpha) {
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * va).store(x + i);
  for (; i < n; i++) x[i] *= alpha;
}

// ---------------------------------------------------------------------------------------------
// Forward, training shapes: K^T and V packed once per (b, h), then (b, h, query block) tasks.

template <typename T>
void forward_blocked(const Geometry& g, const T* q, const T* k, const T* v, T* out, float* lse,
                     int64_t Bq, int64_t Bk) {
  constexpr bool kFloat = std::is_same<T, float>::value;
  const int64_t B = g.B, H = g.H, Sq = g.Sq, Sk = g.Sk, D = g.D;
  const bool vnni = std::is_same<T, BFloat16>::value && (D % 2 == 0) && bf16_vnni_available();
  const int64_t nkb = ceil_div(Sk, Bk), sk_pad = nkb * Bk, nqb = ceil_div(Sq, Bq);
  // Keys any query can see: j <= query_start + Sq - 1.
  const int64_t sk_used = std::min(Sk, g.query_start + Sq);

  // Packed B operands: K^T per key block, and V per key block (bf16 VNNI only; fp32 uses V in place).
  const int64_t kt_per_bh = D * sk_pad;
  const int64_t v_per_bh = vnni ? sk_pad * D : 0;
  // Reused across calls (per calling thread): no page faults for a fresh buffer every step.
  T* packed_ptr = scratch().shared_elems<T>(static_cast<size_t>(B * H * (kt_per_bh + v_per_bh)));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / H, h = bh % H;
      const T* kb = k + b * g.ksb + h * g.ksh;
      T* kt = packed_ptr + bh * (kt_per_bh + v_per_bh);
      if (vnni) {
        pack_transposed_vnni(reinterpret_cast<const BFloat16*>(kb), g.kss, sk_used, Bk, D,
                             reinterpret_cast<BFloat16*>(kt));
        pack_rows_vnni(reinterpret_cast<const BFloat16*>(v + b * g.vsb + h * g.vsh), g.vss, sk_used, Bk, D,
                       reinterpret_cast<BFloat16*>(kt + kt_per_bh));
      } else {
        pack_transposed(kb, g.kss, sk_used, sk_pad, D, kt);
      }
    }
  });

  // Tasks: (b, h) major, then query blocks in the order 0, n-1, 1, n-2, ... so that contiguous
  // chunks of tasks carry similar causal work.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    Scratch& sc = scratch();
    float* S = sc.floats(Bq * Bk + Bq * D + 2 * Bq);
    float* O = S + Bq * Bk;
    float* m = O + Bq * D;
    float* l = m + Bq;
    T* P = sc.elems<T>(Bq * Bk);
    for (int64_t task = begin; task < end; task++) {
      const int64_t bh = task / nqb, t = task % nqb;
      const int64_t ib = (t % 2 == 0) ? t / 2 : nqb - 1 - t / 2;
      const int64_t b = bh / H, h = bh % H;
      const float slope = g.slopes[h];
      const int64_t i0 = ib * Bq, rows = std::min(Bq, Sq - i0), qpos0 = g.query_start + i0;
      const int64_t kv_begin = g.kv_begin(b);
      const int64_t kv_end = std::min(Sk, qpos0 + rows);  // exclusive
      const T* qb = q + b * g.qsb + h * g.qsh + i0 * g.qss;
      const T* kt = packed_ptr + bh * (kt_per_bh + v_per_bh);
      const T* vp = kt + kt_per_bh;
      const T* vb = v + b * g.vsb + h * g.vsh;
      std::fill(O, O + rows * D, 0.f);
      std::fill(m, m + rows, kNegInf);
      std::fill(l, l + rows, 0.f);
      for (int64_t jb = kv_begin / Bk; jb * Bk < kv_end; jb++) {
        const int64_t j0 = jb * Bk, cols = std::min(Bk, Sk - j0);
        if (vnni)
          gemm(rows, cols, D, qb, g.qss, kt + jb * D * Bk, Bk, S, Bk, false, true);
        else
          gemm(rows, cols, D, qb, g.qss, kt + j0, sk_pad, S, Bk, false, false);
        const int64_t kred = vnni ? round2(cols) : cols;
        for (int64_t r = 0; r < rows; r++) {
          float* s = S + r * Bk;
          T* p = P + r * Bk;
          const int64_t qpos = qpos0 + r;
          const int64_t c_lo = std::max<int64_t>(0, kv_begin - j0);
          const int64_t c_hi = std::min<int64_t>(cols, qpos - j0 + 1);
          if (c_hi <= c_lo) {
            if constexpr (kFloat) std::fill(s, s + kred, 0.f);
            else std::fill(p, p + kred, T(0.f));
            continue;
          }
          const float mx = scores_row(s, c_lo, c_hi, g.scale, slope, slope * static_cast<float>(j0 - qpos));
          const float m_new = std::max(m[r], mx);
          const float alpha = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          const float sum = exp_row(s, c_lo, c_hi, m_new);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != 1.f) scale_row(O + r * D, D, alpha);
          std::fill(s, s + c_lo, 0.f);
          std::fill(s + c_hi, s + kred, 0.f);
          if constexpr (!kFloat) from_float(s, p, kred);
        }
        const T* Pa = kFloat ? reinterpret_cast<const T*>(S) : P;  // fp32: the scores buffer itself
        if (vnni)
          gemm(rows, D, kred, Pa, Bk, vp + jb * Bk * D, D, O, D, true, true);
        else
          gemm(rows, D, kred, Pa, Bk, vb + j0 * g.vss, g.vss, O, D, true, false);
      }
      for (int64_t r = 0; r < rows; r++) {
        T* o = out + ((b * Sq + i0 + r) * H + h) * D;
        float* acc = O + r * D;
        if (l[r] > 0.f) {
          scale_row(acc, D, 1.f / l[r]);
          lse[bh * Sq + i0 + r] = m[r] + std::log(l[r]);
        } else {
          std::fill(acc, acc + D, 0.f);
          lse[bh * Sq + i0 + r] = kPosInf;
        }
        from_float(acc, o, D);
      }
    }
    if (vnni) cpublas::brgemm_release(true);
  });
}

// Forward for a few query rows against a long cache (decode): no packing of the cache.
// Per (b, h): S^T = K Q^T (K in place), softmax over keys, O = P V (V in place).
template <typename T>
void forward_decode(const Geometry& g, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t H = g.H, Sq = g.Sq, Sk = g.Sk, D = g.D;
  at::parallel_for(0, g.B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch& sc = scratch();
    const int64_t sk_used = std::min(Sk, g.query_start + Sq);
    float* St = sc.floats(sk_used * Sq * 2 + Sq * D);
    float* S = St + sk_used * Sq;
    float* O = S + sk_used * Sq;
    T* qt = sc.elems<T>(D * Sq + Sq * sk_used);
    T* P = qt + D * Sq;
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / H, h = bh % H;
      const float slope = g.slopes[h];
      const int64_t kv_begin = g.kv_begin(b);
      const T* qb = q + b * g.qsb + h * g.qsh;
      const T* kb = k + b * g.ksb + h * g.ksh;
      const T* vb = v + b * g.vsb + h * g.vsh;
      pack_transposed(qb, g.qss, Sq, Sq, D, qt);
      const int64_t n = sk_used - kv_begin;
      if (n > 0) {
        gemm(n, Sq, D, kb + kv_begin * g.kss, g.kss, qt, Sq, St, Sq, false, false);
        at::vec::transpose_mxn<float>(St, Sq, S, n, static_cast<int>(n), static_cast<int>(Sq));
      }
      for (int64_t r = 0; r < Sq; r++) {
        const int64_t qpos = g.query_start + r;
        const int64_t c_hi = std::min<int64_t>(n, qpos - kv_begin + 1);
        float* s = S + r * std::max<int64_t>(n, 1);
        T* p = P + r * std::max<int64_t>(n, 1);
        if (c_hi <= 0) {
          std::fill(p, p + n, T(0.f));
          lse[bh * Sq + r] = kPosInf;
          continue;
        }
        const float mx = scores_row(s, 0, c_hi, g.scale, slope, slope * static_cast<float>(kv_begin - qpos));
        const float sum = exp_row(s, 0, c_hi, mx);
        scale_row(s, c_hi, 1.f / sum);
        std::fill(s + c_hi, s + n, 0.f);
        from_float(s, p, n);
        lse[bh * Sq + r] = mx + std::log(sum);
      }
      if (n > 0) gemm(Sq, D, n, P, n, vb + kv_begin * g.vss, g.vss, O, D, false, false);
      else std::fill(O, O + Sq * D, 0.f);
      for (int64_t r = 0; r < Sq; r++) from_float(O + r * D, out + ((b * Sq + r) * H + h) * D, D);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: one task per (b, h). Query blocks outer, key blocks inner (up to the causal edge):
//   S = Q_i K_j^T, P = exp(scale S + alibi - lse), dP = dO_i V_j^T, dS = P (dP - D) scale
//   dV_j^T += dO_i^T P,  dK_j^T += Q_i^T dS,  dQ_i += dS K_j
// A operands are plain (Q, dO, K, V rows in place; Q^T, dO^T packed); B operands are packed in
// VNNI-2 for bf16 (P and dS are written straight into that layout).

template <typename T>
void backward_blocked(const Geometry& g, const T* q, const T* k, const T* v, const T* o, const T* dout,
                      const float* lse, T* dq, T* dk, T* dv, int64_t Bq, int64_t Bk) {
  constexpr bool kFloat = std::is_same<T, float>::value;
  const int64_t B = g.B, H = g.H, Sq = g.Sq, Sk = g.Sk, D = g.D;
  const bool vnni = std::is_same<T, BFloat16>::value && (D % 2 == 0) && bf16_vnni_available();
  const int64_t nkb = ceil_div(Sk, Bk), sk_pad = nkb * Bk, nqb = ceil_div(Sq, Bq), sq_pad = nqb * Bq;
  const int64_t sk_used = std::min(Sk, g.query_start + Sq);
  const int64_t os = H * D;  // row stride of o, dout, dq, dk, dv ([b, s, h, hd] contiguous)

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch& sc = scratch();
    // fp32: per-row D, dQ acc [Sq][D], dK^T / dV^T acc [D][sk_pad], S and dP blocks, transpose tmp.
    float* Dv = sc.floats(sq_pad + sq_pad * D + 2 * D * sk_pad + 2 * Bq * Bk + 2 * Bq + sk_pad * D);
    float* dQa = Dv + sq_pad;
    float* dKt = dQa + sq_pad * D;
    float* dVt = dKt + D * sk_pad;
    float* S = dVt + D * sk_pad;
    float* dP = S + Bq * Bk;
    float* rowb = dP + Bq * Bk;  // per row: -lse - slope * (row index in block)
    float* dsum = rowb + Bq;     // per row: D
    float* tmp = dsum + Bq;      // [sk_pad][D] for the final transposes (fp32)
    // T: Q^T, dO^T [D][sq_pad] (A operands); K^T, V^T (B, transposed); K rows (B); P, dS (B); dS (A).
    const int64_t ktb = D * sk_pad;  // K^T / V^T size (plain or VNNI)
    T* Qt = sc.elems<T>(2 * D * sq_pad + 3 * ktb + 3 * Bq * Bk);
    T* dOt = Qt + D * sq_pad;
    T* Kt = dOt + D * sq_pad;
    T* Vt = Kt + ktb;
    T* Kr = Vt + ktb;  // K rows in VNNI (bf16 VNNI only)
    T* Pb = Kr + ktb;
    T* dSb = Pb + Bq * Bk;
    T* dSa = dSb + Bq * Bk;
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / H, h = bh % H;
      const float slope = g.slopes[h];
      const int64_t kv_begin = g.kv_begin(b);
      const T* qb = q + b * g.qsb + h * g.qsh;
      const T* kb = k + b * g.ksb + h * g.ksh;
      const T* vb = v + b * g.vsb + h * g.vsh;
      const T* ob = o + (b * Sq * H + h) * D;
      const T* dob = dout + (b * Sq * H + h) * D;
      const float* lseb = lse + bh * Sq;
      // D = rowsum(dO * O), fp32.
      for (int64_t i = 0; i < Sq; i++) {
        float acc = 0.f;
        const T* x = ob + i * os;
        const T* y = dob + i * os;
        for (int64_t d = 0; d < D; d++) acc += static_cast<float>(x[d]) * static_cast<float>(y[d]);
        Dv[i] = acc;
      }
      pack_transposed(qb, g.qss, Sq, sq_pad, D, Qt);
      pack_transposed(dob, os, Sq, sq_pad, D, dOt);
      if (vnni) {
        auto bf = [](const T* x) { return reinterpret_cast<const BFloat16*>(x); };
        auto bfm = [](T* x) { return reinterpret_cast<BFloat16*>(x); };
        pack_transposed_vnni(bf(kb), g.kss, sk_used, Bk, D, bfm(Kt));
        pack_transposed_vnni(bf(vb), g.vss, sk_used, Bk, D, bfm(Vt));
        pack_rows_vnni(bf(kb), g.kss, sk_used, Bk, D, bfm(Kr));
      } else {
        pack_transposed(kb, g.kss, sk_used, sk_pad, D, Kt);
        pack_transposed(vb, g.vss, sk_used, sk_pad, D, Vt);
      }
      std::fill(dQa, dQa + Sq * D, 0.f);
      std::fill(dKt, dKt + D * sk_pad, 0.f);
      std::fill(dVt, dVt + D * sk_pad, 0.f);

      for (int64_t ib = 0; ib < nqb; ib++) {
        const int64_t i0 = ib * Bq, rows = std::min(Bq, Sq - i0), qpos0 = g.query_start + i0;
        const int64_t kv_end = std::min(Sk, qpos0 + rows);
        const int64_t rred = vnni ? round2(rows) : rows;  // K of the dV / dK products
        for (int64_t r = 0; r < rows; r++) {
          rowb[r] = (lseb[i0 + r] == kPosInf) ? kNegInf : -lseb[i0 + r];
          dsum[r] = Dv[i0 + r];
        }
        for (int64_t jb = kv_begin / Bk; jb * Bk < kv_end; jb++) {
          const int64_t j0 = jb * Bk, cols = std::min(Bk, Sk - j0);
          const int64_t cred = vnni ? round2(cols) : cols;  // K of the dQ product
          if (vnni) {
            gemm(rows, cols, D, qb + i0 * g.qss, g.qss, Kt + jb * D * Bk, Bk, S, Bk, false, true);
            gemm(rows, cols, D, dob + i0 * os, os, Vt + jb * D * Bk, Bk, dP, Bk, false, true);
          } else {
            gemm(rows, cols, D, qb + i0 * g.qss, g.qss, Kt + j0, sk_pad, S, Bk, false, false);
            gemm(rows, cols, D, dob + i0 * os, os, Vt + j0, sk_pad, dP, Bk, false, false);
          }
          for (int64_t r = 0; r < rred; r++) {
            float* s = S + r * Bk;
            float* dp = dP + r * Bk;
            int64_t c_lo = 0, c_hi = 0;
            if (r < rows && rowb[r] != kNegInf) {
              const int64_t qpos = qpos0 + r;
              c_lo = std::max<int64_t>(0, kv_begin - j0);
              c_hi = std::max<int64_t>(c_lo, std::min<int64_t>(cols, qpos - j0 + 1));
            }
            if (r >= rows) {  // the zero row that pads an odd block for VNNI
              std::fill(s, s + cred, 0.f);
              std::fill(dp, dp + cred, 0.f);
            } else if (c_hi > c_lo) {
              const int64_t qpos = qpos0 + r;
              scores_row(s, c_lo, c_hi, g.scale, slope, slope * static_cast<float>(j0 - qpos) + rowb[r]);
              // p = exp(s) (lse already subtracted); ds = p * (dp - D) * scale
              const Vec vD(dsum[r]), vsc(g.scale);
              int64_t c = c_lo;
              for (; c + Vec::size() <= c_hi; c += Vec::size()) {
                Vec p = Vec::loadu(s + c).exp_u20();
                p.store(s + c);
                ((Vec::loadu(dp + c) - vD) * p * vsc).store(dp + c);
              }
              for (; c < c_hi; c++) {
                const float p = std::exp(s[c]);
                s[c] = p;
                dp[c] = (dp[c] - dsum[r]) * p * g.scale;
              }
              std::fill(s, s + c_lo, 0.f);
              std::fill(s + c_hi, s + cred, 0.f);
              std::fill(dp, dp + c_lo, 0.f);
              std::fill(dp + c_hi, dp + cred, 0.f);
            } else {
              std::fill(s, s + cred, 0.f);
              std::fill(dp, dp + cred, 0.f);
            }
            if constexpr (kFloat) continue;  // fp32: S and dP are the operands themselves
            // dS as A operand of dQ (plain [rows][Bk]).
            if (r < rows) from_float(dp, dSa + r * Bk, cred);
            // P and dS as B operands of dV^T / dK^T: plain [rows][Bk], or VNNI pairs of rows.
            if (!vnni) {
              from_float(s, Pb + r * Bk, cols);
              from_float(dp, dSb + r * Bk, cols);
            } else if (r % 2 == 1) {
              store_vnni_pair(s - Bk, s, reinterpret_cast<BFloat16*>(Pb + (r / 2) * 2 * Bk), cols);
              store_vnni_pair(dp - Bk, dp, reinterpret_cast<BFloat16*>(dSb + (r / 2) * 2 * Bk), cols);
            }
          }
          if (vnni) {
            gemm(D, cols, rred, dOt + i0, sq_pad, Pb, Bk, dVt + j0, sk_pad, true, true);
            gemm(D, cols, rred, Qt + i0, sq_pad, dSb, Bk, dKt + j0, sk_pad, true, true);
            gemm(rows, D, cred, dSa, Bk, Kr + jb * Bk * D, D, dQa + i0 * D, D, true, true);
          } else {
            const T* Pp = kFloat ? reinterpret_cast<const T*>(S) : Pb;
            const T* dSp = kFloat ? reinterpret_cast<const T*>(dP) : dSb;
            const T* dSq = kFloat ? reinterpret_cast<const T*>(dP) : dSa;
            gemm(D, cols, rows, dOt + i0, sq_pad, Pp, Bk, dVt + j0, sk_pad, true, false);
            gemm(D, cols, rows, Qt + i0, sq_pad, dSp, Bk, dKt + j0, sk_pad, true, false);
            gemm(rows, D, cols, dSq, Bk, kb + j0 * g.kss, g.kss, dQa + i0 * D, D, true, false);
          }
        }
      }
      // Write dq, dk, dv ([b, s, h, hd]).
      for (int64_t i = 0; i < Sq; i++) from_float(dQa + i * D, dq + (b * Sq + i) * os + h * D, D);
      at::vec::transpose_mxn<float>(dKt, sk_pad, tmp, D, static_cast<int>(D), static_cast<int>(Sk));
      for (int64_t j = 0; j < Sk; j++) from_float(tmp + j * D, dk + (b * Sk + j) * os + h * D, D);
      at::vec::transpose_mxn<float>(dVt, sk_pad, tmp, D, static_cast<int>(D), static_cast<int>(Sk));
      for (int64_t j = 0; j < Sk; j++) from_float(tmp + j * D, dv + (b * Sk + j) * os + h * D, D);
    }
    if (vnni) cpublas::brgemm_release(true);
  });
}

// ---------------------------------------------------------------------------------------------

constexpr int64_t kDecodeRows = 16;  // at most this many query rows: the decode path

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slopes, const c10::optional<at::Tensor>& key_offset,
                                int64_t query_start, double scale, int64_t block_q, int64_t block_k) {
  Geometry g = geometry(q, k, v, slopes, key_offset, query_start, scale);
  TORCH_CHECK(block_q > 0 && block_k > 0 && block_k % 2 == 0, "alibi_attention: bad block sizes");
  auto out = at::empty({g.B, g.Sq, g.H, g.D}, q.options());
  auto lse = at::empty({g.B, g.H, g.Sq}, q.options().dtype(at::kFloat));
  if (g.B * g.H * g.Sq == 0) return {out, lse};
  const bool decode = g.Sq <= kDecodeRows;
  if (q.scalar_type() == at::kFloat) {
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    if (decode) forward_decode<float>(g, qp, kp, vp, out.data_ptr<float>(), lse.data_ptr<float>());
    else forward_blocked<float>(g, qp, kp, vp, out.data_ptr<float>(), lse.data_ptr<float>(), block_q, block_k);
  } else {
    auto* qp = q.data_ptr<BFloat16>();
    auto* kp = k.data_ptr<BFloat16>();
    auto* vp = v.data_ptr<BFloat16>();
    if (decode) forward_decode<BFloat16>(g, qp, kp, vp, out.data_ptr<BFloat16>(), lse.data_ptr<float>());
    else forward_blocked<BFloat16>(g, qp, kp, vp, out.data_ptr<BFloat16>(), lse.data_ptr<float>(), block_q, block_k);
  }
  return {out, lse};
}

// grad_out and out: [b, s_q, heads, hd] contiguous. Returns dq, dk, dv as [b, heads, s, hd] views
// of [b, s, heads, hd] buffers.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& slopes, const c10::optional<at::Tensor>& key_offset,
                                 int64_t query_start, double scale, int64_t block_q, int64_t block_k) {
  Geometry g = geometry(q, k, v, slopes, key_offset, query_start, scale);
  TORCH_CHECK(block_q > 0 && block_k > 0 && block_q % 2 == 0 && block_k % 2 == 0, "alibi_attention: bad block sizes");
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "alibi_attention backward: grad_out, out and lse must be contiguous");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "alibi_attention backward: dtype mismatch");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == g.B && out.size(1) == g.Sq && out.size(2) == g.H &&
              out.size(3) == g.D, "alibi_attention backward: out must be [b, s_q, heads, hd]");
  auto dq = at::empty({g.B, g.Sq, g.H, g.D}, q.options());
  auto dk = at::empty({g.B, g.Sk, g.H, g.D}, q.options());
  auto dv = at::empty({g.B, g.Sk, g.H, g.D}, q.options());
  if (g.B * g.H * g.Sq == 0 || g.Sk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
  } else if (q.scalar_type() == at::kFloat) {
    backward_blocked<float>(g, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                            grad_out.data_ptr<float>(), lse.data_ptr<float>(), dq.data_ptr<float>(),
                            dk.data_ptr<float>(), dv.data_ptr<float>(), block_q, block_k);
  } else {
    backward_blocked<BFloat16>(g, q.data_ptr<BFloat16>(), k.data_ptr<BFloat16>(), v.data_ptr<BFloat16>(),
                               out.data_ptr<BFloat16>(), grad_out.data_ptr<BFloat16>(), lse.data_ptr<float>(),
                               dq.data_ptr<BFloat16>(), dk.data_ptr<BFloat16>(), dv.data_ptr<BFloat16>(),
                               block_q, block_k);
  }
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused causal ALiBi attention for CPU (forward and backward, fp32 and bf16)";
  m.def("forward", &forward, "q, k, v, slopes, key_offset, query_start, scale, block_q, block_k -> [out, lse]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("slopes"), py::arg("key_offset"),
        py::arg("query_start"), py::arg("scale"), py::arg("block_q"), py::arg("block_k"));
  m.def("backward", &backward,
        "grad_out, q, k, v, out, lse, slopes, key_offset, query_start, scale, block_q, block_k -> [dq, dk, dv]",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("slopes"), py::arg("key_offset"), py::arg("query_start"), py::arg("scale"),
        py::arg("block_q"), py::arg("block_k"));
  m.def("bf16_vnni_available", &bf16_vnni_available, "whether bf16 products use the VNNI brgemm ukernel");
  m.attr("cpu_capability") = py::str(C10_STRINGIZE(CPU_CAPABILITY));
}
