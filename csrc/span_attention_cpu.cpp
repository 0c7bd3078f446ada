// CPU span attention: forward and backward under the interval mask of a SpanLayout.
//
// The mask is one key interval per query, [kv_start[q], kv_end[q]) in key coordinates (see
// llavit_kernels/layout.py). FlashAttention-style: for a block of BM queries only the keys in
// [min kv_start, max kv_end) are visited, in chunks of at most BN keys, with an online softmax in
// fp32; each row is clipped to its own interval (the columns outside it get probability 0, so a
// chunk that lies inside every row's interval runs unmasked). The log-sum-exp is saved for the
// backward. The block products run through at::mm_out / addmm_ on views (MKL or the BLAS torch was
// built with; at::cpublas::gemm is not exported to extensions); the row work (max, exp, sums) is a
// plain loop the compiler vectorises (built with -O3 and the machine's AVX2/FMA/AVX-512 flags).
//
// Layouts: q [B, Tq, H, D] (padded) or [N, H, D] (packed = batch 1, the intervals keep documents
// apart); k, v [B, Tk, Hkv, D] or [N, Hkv, D]; query head h reads KV head h / (H / Hkv) (GQA by
// index, no repeat). Tq != Tk for query chunks against a cache: the intervals already carry the
// offset. Half inputs: the forward converts K/V once and each query block per task (no fp32 copy of
// q or out); the backward still converts q, k, v, out, grad_out once (O(T) fp32 copies).
//
// Backward (deterministic, no atomics): one task per (batch, query head) walks its query blocks once
// (5 block products per chunk, exps computed once), owns its dQ rows, and accumulates dK/dV of that
// head in an fp32 buffer [B, H, Tk, D]; the query heads of a KV group are summed in a fixed order
// at the end. It takes the output and log-sum-exp from outside (the composed path passes the
// merged ones) and an optional gradient of the log-sum-exp.
//
// Registered as the CPU kernels of llavit::span_attention_cpp_fwd / _bwd, whose schemas, fake
// kernels and autograd live in llavit_kernels/ops/_span_attention_cpp.py.

#include <ATen/ATen.h>
#include <cstdlib>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Measured on 2 shared cores (0.5B and 7B shapes, T 2048): 64 x 512 was as fast as 128 x 256/512
// and 32 x 512 within the noise; smaller chunks only add calls.
constexpr int64_t kBlockM = 64;   // query rows per block
constexpr int64_t kBlockN = 512;  // keys per chunk (the online softmax steps over chunks)

// x[i] = exp(x[i] * scale - shift) for a row of floats, exactly 0 when the argument is below -87
// (so exp(-inf) == 0); Cephes expf polynomial, ~1 ulp. A flat loop without calls: gcc vectorises it.
inline void exp_row(float* __restrict x, int64_t n, float scale, float shift) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] * scale - shift;
    const bool underflow = v < -87.0f;
    v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
    const float nf = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = v - nf * 0.693359375f + nf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
    float pow2;
    std::memcpy(&pow2, &bits, sizeof(float));
    x[i] = underflow ? 0.0f : p * pow2;
  }
}

inline float scalar_exp(float v) {
  exp_row(&v, 1, 1.0f, 0.0f);
  return v;
}

// Reductions with kLanes independent accumulators: without -ffast-math gcc does not reorder a float
// reduction, but it vectorises the fixed-width lane loop.
constexpr int kLanes = 16;

inline float row_max(const float* __restrict x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] < x[j + l] ? x[j + l] : acc[l];
  float m = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kLanes; ++l) m = std::max(m, acc[l]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

inline float row_sum(const float* __restrict x, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += x[j];
  return s;
}

// A 2-D fp32 view [rows, cols] with row stride `ld` over memory we own; no copy, no allocation of
// storage (the caller keeps the memory alive).
inline at::Tensor view2d(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

struct Dims {
  int64_t B, Tq, Tk, H, Hkv, D, G;
  bool packed;
};

Dims check_and_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_start,
                    const at::Tensor& kv_end) {
  TORCH_CHECK(q.device().is_cpu(), "span_attention_cpp: expected CPU tensors, got q on ", q.device());
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "span_attention_cpp: q must be [B, T, H, D] or [N, H, D], got ",
              q.sizes());
  TORCH_CHECK(k.dim() == q.dim() && v.sizes() == k.sizes(), "span_attention_cpp: k, v must match q's rank, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "span_attention_cpp: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "span_attention_cpp: dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(kv_start.scalar_type() == at::kInt && kv_end.scalar_type() == at::kInt,
              "span_attention_cpp: intervals must be int32");
  Dims d{};
  d.packed = q.dim() == 3;
  d.B = d.packed ? 1 : q.size(0);
  d.Tq = q.size(-3);
  d.Tk = k.size(-3);
  d.H = q.size(-2);
  d.Hkv = k.size(-2);
  d.D = q.size(-1);
  TORCH_CHECK(k.size(-1) == d.D, "span_attention_cpp: head dims of q and k differ");
  TORCH_CHECK(d.Hkv > 0 && d.H % d.Hkv == 0, "span_attention_cpp: KV heads must divide query heads");
  TORCH_CHECK(d.packed || k.size(0) == d.B, "span_attention_cpp: batch of k differs from q");
  TORCH_CHECK(kv_start.numel() == d.B * d.Tq && kv_end.numel() == d.B * d.Tq,
              "span_attention_cpp: kv_start/kv_end must have one entry per query");
  d.G = d.H / d.Hkv;
  return d;
}

// LLAVIT_CPP_POISON=1 (tests): fresh buffers start full of NaN, so an element the kernel forgets to
// write shows up.
at::Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& options) {
  const char* poison = std::getenv("LLAVIT_CPP_POISON");
  if (poison != nullptr && poison[0] == '1') return at::full(shape, std::numeric_limits<float>::quiet_NaN(), options);
  return at::empty(shape, options);
}

// fp32, contiguous [B, T, heads, D] (packed: [1, N, heads, D]).
at::Tensor as_f32(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  return (f.dim() == 3 ? f.unsqueeze(0) : f).contiguous();
}

// Key range of one query block: [min kv_start, max kv_end) clipped to [0, Tk); empty -> lo >= hi.
inline void block_range(const int32_t* ks, const int32_t* ke, int64_t m0, int64_t m1, int64_t Tk, int64_t& lo,
                        int64_t& hi) {
  lo = Tk;
  hi = 0;
  for (int64_t i = m0; i < m1; ++i) {
    const int64_t a = std::max<int64_t>(ks[i], 0), e = std::min<int64_t>(ke[i], Tk);
    if (a < e) {
      lo = std::min(lo, a);
      hi = std::max(hi, e);
    }
  }
}

// Per-thread scratch, grown on demand and kept between calls: no allocation per task.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// Runs fn(task) for task in order[0..n) on torch's intra-op threads, handing tasks out one at a
// time (a shared counter), so heavy blocks placed first balance across threads.
template <typename F>
void run_tasks(const std::vector<int64_t>& order, const F& fn) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t w = b0; w < b1; ++w) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(order[i]);
    }
  });
}

// ----------------------------------------------------------------------------- forward
std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& kv_start, const at::Tensor& kv_end,
                                           const at::Tensor& q_start, const at::Tensor& q_end,
                                           double softmax_scale) {
  const Dims d = check_and_dims(q, k, v, kv_start, kv_end);
  // fp32 inputs are read in place. Half inputs: K/V (Hkv heads, small with GQA) are converted once;
  // each query block is converted when its task starts and its output rounded when it ends, so no
  // fp32 copy of q or of the output exists.
  const bool half = q.scalar_type() != at::kFloat;
  const at::Tensor q4 = (q.dim() == 3 ? q.unsqueeze(0) : q).contiguous();
  const at::Tensor kf = as_f32(k), vf = as_f32(v);
  const at::Tensor ks_t = kv_start.contiguous(), ke_t = kv_end.contiguous();
  at::Tensor out4 = new_buffer({d.B, d.Tq, d.H, d.D}, q.options());
  at::Tensor lse = new_buffer({d.B, d.H, d.Tq}, q.options().dtype(at::kFloat));

  const float* Q = half ? nullptr : q4.data_ptr<float>();
  char* Qraw = static_cast<char*>(q4.data_ptr());
  char* Oraw = static_cast<char*>(out4.data_ptr());
  const int64_t esize = q4.element_size();
  const auto half_opts = at::TensorOptions().dtype(q.scalar_type());
  const float* K = kf.data_ptr<float>();
  const float* V = vf.data_ptr<float>();
  float* O = half ? nullptr : out4.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const int32_t* KS = ks_t.data_ptr<int32_t>();
  const int32_t* KE = ke_t.data_ptr<int32_t>();
  const int64_t B = d.B, Tq = d.Tq, Tk = d.Tk, H = d.H, Hkv = d.Hkv, D = d.D, G = d.G;
  const float scale = static_cast<float>(softmax_scale);
  const int64_t nqb = (Tq + kBlockM - 1) / kBlockM;

  // Key range per (batch, query block); tasks are (batch, head, query block), heaviest first.
  std::vector<int64_t> lo_v(B * nqb), hi_v(B * nqb);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t qb = 0; qb < nqb; ++qb)
      block_range(KS + b * Tq, KE + b * Tq, qb * kBlockM, std::min(Tq, (qb + 1) * kBlockM), Tk,
                  lo_v[b * nqb + qb], hi_v[b * nqb + qb]);
  std::vector<int64_t> order(B * H * nqb);
  std::iota(order.begin(), order.end(), 0);
  auto cost = [&](int64_t t) {
    const int64_t bq = (t / (H * nqb)) * nqb + t % nqb;
    return std::max<int64_t>(hi_v[bq] - lo_v[bq], 0);
  };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });

  run_tasks(order, [&](int64_t task) {
    const int64_t b = task / (H * nqb), h = (task / nqb) % H, qb = task % nqb;
    const int64_t hk = h / G;
    const int64_t m0 = qb * kBlockM, m1 = std::min(Tq, m0 + kBlockM), mr = m1 - m0;
    const int64_t lo = lo_v[b * nqb + qb], hi = hi_v[b * nqb + qb];
    const int32_t* ks = KS + b * Tq;
    const int32_t* ke = KE + b * Tq;
    float* lrow = L + (b * H + h) * Tq;
    const int64_t ldq = H * D, ldk = Hkv * D;
    const int64_t off = ((b * Tq + m0) * H + h) * D;  // element offset of the block in q and out
    if (lo >= hi) {  // no row of this block has a key
      if (half) {
        at::from_blob(Oraw + off * esize, {mr, D}, {ldq, 1}, half_opts).zero_();
      } else {
        for (int64_t i = 0; i < mr; ++i) std::fill(O + off + i * ldq, O + off + i * ldq + D, 0.0f);
      }
      for (int64_t i = 0; i < mr; ++i) lrow[m0 + i] = std::numeric_limits<float>::infinity();
      return;
    }
    float* sbuf = scratch(0, mr * kBlockN);
    float* acc = scratch(1, mr * D);
    float* mx = scratch(2, 2 * mr);
    float* sum = mx + mr;
    std::fill(acc, acc + mr * D, 0.0f);
    std::fill(mx, mx + mr, -std::numeric_limits<float>::infinity());
    std::fill(sum, sum + mr, 0.0f);
    const at::Tensor Qv = half ? at::from_blob(Qraw + off * esize, {mr, D}, {ldq, 1}, half_opts).to(at::kFloat)
                               : view2d(Q + off, mr, D, ldq);
    at::Tensor Acc = view2d(acc, mr, D, D);
    for (int64_t c0 = lo; c0 < hi; c0 += kBlockN) {
      const int64_t nc = std::min(kBlockN, hi - c0);
      const at::Tensor Kc = view2d(K + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk);
      const at::Tensor Vc = view2d(V + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk);
      at::Tensor S = view2d(sbuf, mr, nc, nc);
      at::mm_out(S, Qv, Kc.t());
      for (int64_t i = 0; i < mr; ++i) {
        float* s = sbuf + i * nc;
        const int64_t a = std::max<int64_t>(std::max<int64_t>(ks[m0 + i], 0), c0) - c0;
        const int64_t e = std::min<int64_t>(std::min<int64_t>(ke[m0 + i], Tk), c0 + nc) - c0;
        if (a >= e) {
          std::fill(s, s + nc, 0.0f);
          continue;
        }
        const float m = row_max(s + a, e - a) * scale;
        const float m_new = std::max(mx[i], m);
        const float alpha = std::isinf(mx[i]) ? 0.0f : scalar_exp(mx[i] - m_new);
        std::fill(s, s + a, 0.0f);
        std::fill(s + e, s + nc, 0.0f);
        exp_row(s + a, e - a, scale, m_new);
        sum[i] = sum[i] * alpha + row_sum(s + a, e - a);
        mx[i] = m_new;
        if (alpha != 1.0f) {
          float* ar = acc + i * D;
          for (int64_t j = 0; j < D; ++j) ar[j] *= alpha;
        }
      }
      Acc.addmm_(S, Vc);
    }
    for (int64_t i = 0; i < mr; ++i) {
      // fp32: straight into the output; half: normalise in place, then one rounding copy below.
      float* orow = half ? acc + i * D : O + off + i * ldq;
      const float* ar = acc + i * D;
      if (sum[i] > 0.0f) {
        const float inv = 1.0f / sum[i];
        for (int64_t j = 0; j < D; ++j) orow[j] = ar[j] * inv;
        lrow[m0 + i] = mx[i] + std::log(sum[i]);
      } else {
        std::fill(orow, orow + D, 0.0f);
        lrow[m0 + i] = std::numeric_limits<float>::infinity();
      }
    }
    if (half) at::from_blob(Oraw + off * esize, {mr, D}, {ldq, 1}, half_opts).copy_(Acc);
  });

  at::Tensor out = out4;
  if (d.packed) {
    out = out.squeeze(0);
    lse = lse.squeeze(0);
  }
  return {out, lse};
}

// ----------------------------------------------------------------------------- backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad_out,
                                                       const std::optional<at::Tensor>& grad_lse,
                                                       const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse,
                                                       const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                       const at::Tensor& q_start, const at::Tensor& q_end,
                                                       double softmax_scale) {
  const Dims d = check_and_dims(q, k, v, kv_start, kv_end);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "span_attention_cpp_bwd: grad_out and out must have q's shape");
  const int64_t B = d.B, Tq = d.Tq, Tk = d.Tk, H = d.H, Hkv = d.Hkv, D = d.D, G = d.G;
  TORCH_CHECK(lse.numel() == B * H * Tq, "span_attention_cpp_bwd: lse must be [B, H, Tq] or [H, N]");
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), dof = as_f32(grad_out), of = as_f32(out);
  const at::Tensor lf = lse.to(at::kFloat).contiguous();
  // delta[b, h, i] = <dO_i, O_i> - dlse_i   (dS = P * (dP - delta))
  at::Tensor delta = (dof * of).sum(-1).permute({0, 2, 1}).contiguous();  // [B, H, Tq]
  if (grad_lse.has_value() && grad_lse->defined())
    delta.sub_(grad_lse->to(at::kFloat).reshape({B, H, Tq}));
  const at::Tensor ks_t = kv_start.contiguous(), ke_t = kv_end.contiguous();
  at::Tensor dqf = new_buffer({B, Tq, H, D}, q.options().dtype(at::kFloat));
  at::Tensor dkh = at::zeros({B, H, Tk, D}, q.options().dtype(at::kFloat));  // per query head
  at::Tensor dvh = at::zeros({B, H, Tk, D}, q.options().dtype(at::kFloat));

  const float* Q = qf.data_ptr<float>();
  const float* K = kf.data_ptr<float>();
  const float* V = vf.data_ptr<float>();
  const float* dO = dof.data_ptr<float>();
  const float* LSE = lf.data_ptr<float>();
  const float* DEL = delta.data_ptr<float>();
  float* dQ = dqf.data_ptr<float>();
  float* dKh = dkh.data_ptr<float>();
  float* dVh = dvh.data_ptr<float>();
  const int32_t* KS = ks_t.data_ptr<int32_t>();
  const int32_t* KE = ke_t.data_ptr<int32_t>();
  const float scale = static_cast<float>(softmax_scale);
  const int64_t nqb = (Tq + kBlockM - 1) / kBlockM;

  std::vector<int64_t> order(B * H);
  std::iota(order.begin(), order.end(), 0);
  run_tasks(order, [&](int64_t task) {
    const int64_t b = task / H, h = task % H, hk = h / G;
    const int32_t* ks = KS + b * Tq;
    const int32_t* ke = KE + b * Tq;
    const float* lrow = LSE + (b * H + h) * Tq;
    const float* drow = DEL + (b * H + h) * Tq;
    const int64_t ldq = H * D, ldk = Hkv * D;
    float* dKb = dKh + (b * H + h) * Tk * D;
    float* dVb = dVh + (b * H + h) * Tk * D;
    float* pbuf = scratch(0, kBlockM * kBlockN);
    float* dpbuf = scratch(1, kBlockM * kBlockN);
    float* dqacc = scratch(2, kBlockM * D);
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t m0 = qb * kBlockM, m1 = std::min(Tq, m0 + kBlockM), mr = m1 - m0;
      int64_t lo, hi;
      block_range(ks, ke, m0, m1, Tk, lo, hi);
      float* dQb = dQ + ((b * Tq + m0) * H + h) * D;
      if (lo >= hi) {
        for (int64_t i = 0; i < mr; ++i) std::fill(dQb + i * ldq, dQb + i * ldq + D, 0.0f);
        continue;
      }
      std::fill(dqacc, dqacc + mr * D, 0.0f);
      const at::Tensor Qv = view2d(Q + ((b * Tq + m0) * H + h) * D, mr, D, ldq);
      const at::Tensor dOv = view2d(dO + ((b * Tq + m0) * H + h) * D, mr, D, ldq);
      at::Tensor dQacc = view2d(dqacc, mr, D, D);
      for (int64_t c0 = lo; c0 < hi; c0 += kBlockN) {
        const int64_t nc = std::min(kBlockN, hi - c0);
        const at::Tensor Kc = view2d(K + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk);
        const at::Tensor Vc = view2d(V + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk);
        at::Tensor P = view2d(pbuf, mr, nc, nc);
        at::Tensor dP = view2d(dpbuf, mr, nc, nc);
        at::mm_out(P, Qv, Kc.t());
        for (int64_t i = 0; i < mr; ++i) {
          float* s = pbuf + i * nc;
          const int64_t a = std::max<int64_t>(std::max<int64_t>(ks[m0 + i], 0), c0) - c0;
          const int64_t e = std::min<int64_t>(std::min<int64_t>(ke[m0 + i], Tk), c0 + nc) - c0;
          const float l = lrow[m0 + i];
          if (a >= e || std::isinf(l)) {
            std::fill(s, s + nc, 0.0f);
            continue;
          }
          std::fill(s, s + a, 0.0f);
          std::fill(s + e, s + nc, 0.0f);
          exp_row(s + a, e - a, scale, l);
        }
        at::Tensor dVc = view2d(dVb + c0 * D, nc, D, D);
        dVc.addmm_(P.t(), dOv);
        at::mm_out(dP, dOv, Vc.t());
        for (int64_t i = 0; i < mr; ++i) {
          float* p = pbuf + i * nc;
          float* dp = dpbuf + i * nc;
          const float dl = drow[m0 + i];
          for (int64_t j = 0; j < nc; ++j) dp[j] = p[j] * (dp[j] - dl);
        }
        dQacc.addmm_(dP, Kc);
        at::Tensor dKc = view2d(dKb + c0 * D, nc, D, D);
        dKc.addmm_(dP.t(), Qv);
      }
      for (int64_t i = 0; i < mr; ++i) {
        float* row = dQb + i * ldq;
        const float* ar = dqacc + i * D;
        for (int64_t j = 0; j < D; ++j) row[j] = ar[j] * scale;
      }
    }
  });

  // Sum the query heads of each KV group in a fixed order; back to [B, Tk, Hkv, D].
  at::Tensor dk = dkh.view({B, Hkv, G, Tk, D}).sum(2).mul_(scale).permute({0, 2, 1, 3});
  at::Tensor dv = dvh.view({B, Hkv, G, Tk, D}).sum(2).permute({0, 2, 1, 3});
  at::Tensor dq = dqf.to(q.scalar_type());
  dk = dk.to(k.scalar_type()).contiguous();
  dv = dv.to(v.scalar_type()).contiguous();
  if (d.packed) {
    dq = dq.squeeze(0);
    dk = dk.squeeze(0);
    dv = dv.squeeze(0);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llavit, CPU, m) {
  m.impl("span_attention_cpp_fwd", &fwd_cpu);
  m.impl("span_attention_cpp_bwd", &bwd_cpu);
}
