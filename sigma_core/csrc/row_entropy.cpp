// Row entropies of softmax(scale * q k^T) without forming the T x T logits in memory.
//
// Built on first use by sigma_core.native (torch.utils.cpp_extension); the EntropyMonitor's fast
// path on the CPU.  For every (batch, head): the keys are transposed into a buffer in the core's
// cache, the logits of RB query rows x NV * W keys are accumulated in vector registers over the head
// dimension, stored for those RB rows only (RB x T floats, in the cache), and each row is reduced
// at once in the stable form
//     Ent = log sum_j e_j - sum_j e_j s_j / sum_j e_j,   s_j = max(z_j - max_k z_k, -80),  e_j = exp(s_j)
// (no cancellation: s <= 0; keys below the floor e^-80 weigh less than float32 rounding of sum e >= 1).
// Causal rows see keys 0..i (top-left aligned, Tq == Tk); hidden and padding lanes weigh exactly 0.
// A non-finite logit anywhere in a (batch, head) makes all its entropies NaN.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// W: lanes of one vector, the machine's own width (GCC vector extension).  A wider generic vector
// than the hardware's (16 lanes on AVX2) is split by the compiler into register pairs, and the RB
// accumulators then no longer fit the 16 ymm registers: they live on the stack, every FMA a load
// and a store, three times slower than PyTorch's own matmul on an AMD EPYC (AVX2).
// RB query rows x NV vectors of keys per tile: RB * NV accumulators, which with the NV key vectors
// and one broadcast must fit the register file (AVX2: 16 ymm registers, 6 x 2 + 2 + 1; measured
// 10 % faster than 8 x 1 on an AMD EPYC).
#if defined(__AVX512F__)
constexpr int W = 16, RB = 8, NV = 1;
#elif defined(__AVX__)
constexpr int W = 8, RB = 6, NV = 2;
#else
constexpr int W = 4, RB = 8, NV = 1;  // SSE2, NEON: 128-bit vectors
#endif
constexpr int PAD = 16;  // keys are padded to a multiple of this: a whole number of tiles on every ISA
static_assert(PAD % (W * NV) == 0, "a tile must divide the padding");
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float a) { vf v = {}; return v + a; }

// horizontal sum / max (once per row, outside the inner loops): a fixed order, so the same bits
// on every call
inline float hsum(vf v) {
  float a = v[0];
  for (int i = 1; i < W; ++i) a += v[i];
  return a;
}

inline float hmax(vf v) {
  float a = v[0];
  for (int i = 1; i < W; ++i) a = v[i] > a ? v[i] : a;
  return a;
}

// exp(s) for s in [-80, 0]: s = k ln2 + r, |r| <= ln2/2 (k rounded to nearest by adding and
// subtracting 1.5 * 2^23), exp(r) by the Cephes expf polynomial (relative error ~1e-7), 2^k from
// the exponent bits (k >= -116: a normal float, no subnormal slow path).
inline vf exp_nonpos(vf s) {
  const vf magic = splat(12582912.0f);
  const vf kf = (s * 1.44269504088896341f + magic) - magic;
  const vf r = s - kf * 0.693359375f + kf * 2.12194440e-4f;
  vf p = ((((splat(1.9875691500e-4f) * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
           + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(kf, vi) + 127) << 23;
  vf two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

}  // namespace

//: the vector width this build was compiled for (keys are padded to a multiple of it)
constexpr int row_entropy_lanes = W;

// The entropies of one (batch, head): qb (Tq, d) with row stride qs2 and unit stride on d; kb
// (d, Tkp) contiguous, the keys transposed and zero-padded to Tkp (a multiple of W * NV) >= Tk
// columns; scratch: row_entropy_scratch(Tkp, d) floats; out: Tq entropies.  Returns false when a
// logit is inf or NaN.
inline int64_t row_entropy_scratch(int64_t Tkp, int64_t d) { return RB * (Tkp + d); }

__attribute__((noinline)) bool row_entropy_head(const float* __restrict qb, int64_t qs2,
                                                const float* __restrict kb, int64_t Tq, int64_t Tk,
                                                int64_t Tkp, int64_t d, float sc, bool causal,
                                                float* __restrict scratch, float* __restrict out) {
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  float* const z = scratch;              // RB rows of Tkp logits
  float* const qpack = scratch + RB * Tkp;  // the block's RB query rows interleaved: qpack[t * RB + r]
  vf poison = {};  // stays 0 unless a logit is inf or NaN (then inf * 0 or NaN * 0 = NaN)
  for (int64_t i0 = 0; i0 < Tq; i0 += RB) {
    const int64_t R = std::min<int64_t>(RB, Tq - i0);
    // one pointer for the inner loop instead of RB (which spill to the stack, and the accumulators
    // with them); the tail of the last block repeats its last row
    for (int r = 0; r < RB; ++r) {
      const float* qr = qb + (i0 + std::min<int64_t>(r, R - 1)) * qs2;
      for (int64_t t = 0; t < d; ++t) qpack[t * RB + r] = qr[t];
    }
    const int64_t nmax = causal ? i0 + R : Tk;
    vf mv[RB];  // running maximum of each row over the keys it sees
    for (int r = 0; r < RB; ++r) mv[r] = splat(-INFINITY);
    for (int64_t j0 = 0; j0 < nmax; j0 += W * NV) {
      vf acc[RB][NV] = {};
      const float* qt = qpack;
      const float* kp = kb + j0;
      for (int64_t t = 0; t < d; ++t, qt += RB, kp += Tkp) {
        vf kv[NV];
        for (int u = 0; u < NV; ++u) kv[u] = load(kp + u * W);
        for (int r = 0; r < RB; ++r) {
          for (int u = 0; u < NV; ++u) acc[r][u] += qt[r] * kv[u];
        }
      }
      for (int r = 0; r < RB; ++r) {
        for (int u = 0; u < NV; ++u) {
          const vf v = acc[r][u] * sc;
          store(&z[r * Tkp + j0 + u * W], v);
          poison += v * 0.0f;
          const int32_t seen = static_cast<int32_t>((causal ? i0 + r + 1 : Tk) - j0 - u * W);  // keys of row r here
          mv[r] = (lane < seen) & (v > mv[r]) ? v : mv[r];
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = causal ? i0 + r + 1 : Tk;  // keys this row sees
      const float* zr = &z[r * Tkp];
      const float m = hmax(mv[r]);
      vf lv = {}, ev = {};
      for (int64_t j0 = 0; j0 < n; j0 += W) {
        const auto seen = lane < static_cast<int32_t>(n - j0);
        vf s = load(zr + j0) - m;
        s = seen ? (s < -80.0f ? splat(-80.0f) : s) : splat(0.0f);  // unseen lanes: weight 0, s 0
        const vf e = seen ? exp_nonpos(s) : splat(0.0f);
        lv += e;
        ev += e * s;
      }
      const float l = hsum(lv);
      out[i0 + r] = std::log(l) - hsum(ev) / l;
    }
  }
  return !std::isnan(hsum(poison));
}

#ifndef SIGMA_CORE_STANDALONE  // the PyTorch binding (a standalone build times the core alone)
#include <torch/extension.h>
#include <ATen/Parallel.h>

// The keys of one (batch, head), (Tk, d) with row stride ks2 and unit stride on d, transposed into
// kt (d, Tkp) with zero padding columns: in the core's cache, where the head's pass reads them.
inline void transpose_keys(const float* __restrict kb, int64_t ks2, int64_t Tk, int64_t d, int64_t Tkp,
                           float* __restrict kt) {
  for (int64_t j = 0; j < Tk; ++j)
    for (int64_t t = 0; t < d; ++t) kt[t * Tkp + j] = kb[j * ks2 + t];
  for (int64_t t = 0; t < d; ++t) std::fill(kt + t * Tkp + Tk, kt + (t + 1) * Tkp, 0.0f);
}

// q: (B, H, Tq, d), k: (B, H, Tk, d), float32 with unit stride on d (any other strides).
// Returns (B, H, Tq).
torch::Tensor row_entropy(const torch::Tensor& q, const torch::Tensor& k, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.scalar_type() == torch::kFloat32
              && k.scalar_type() == torch::kFloat32 && q.device().is_cpu() && k.device().is_cpu(),
              "row_entropy: q (B, H, Tq, d) and k (B, H, Tk, d) float32 CPU tensors");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3), Tk = k.size(2);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && k.size(0) == B && k.size(1) == H && k.size(3) == d
              && Tq >= 1 && Tk >= 1 && d >= 1 && (!causal || Tq == Tk),
              "row_entropy: shapes or strides not as documented");
  const int64_t Tkp = (Tk + PAD - 1) / PAD * PAD;
  auto out = torch::empty({B, H, Tq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(d * Tkp), scratch(row_entropy_scratch(Tkp, d));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      transpose_keys(kp + b * ks0 + h * ks1, ks2, Tk, d, Tkp, kt.data());
      // every query row and every key enters some computed logit: a non-finite q or k (a diverging
      // model) gives NaN for the whole (batch, head), which the caller declines
      if (!row_entropy_head(qp + b * qs0 + h * qs1, qs2, kt.data(), Tq, Tk, Tkp, d, sc, causal,
                            scratch.data(), op + bh * Tq))
        std::fill(op + bh * Tq, op + (bh + 1) * Tq, NAN);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_entropy", &row_entropy, "row entropies of softmax(scale q k^T), (B, H, Tq)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("scale"), pybind11::arg("causal"));
  m.attr("lanes") = row_entropy_lanes;
}
#endif
