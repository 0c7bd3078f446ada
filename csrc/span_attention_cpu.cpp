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
// at the end. When (batch, KV head) tasks alone keep every thread busy, one task per KV head runs its
// group's query heads in turn into one [B, Hkv, Tk, D] buffer instead (G x less memory). It takes
// the output and log-sum-exp from outside (the composed path passes the merged ones) and an optional
// gradient of the log-sum-exp.
//
// bfloat16 with an even head dim, where oneDNN's bf16 micro-kernel runs (at::native::cpublas::brgemm,
// exported by libtorch; it needs AVX-512, and uses AVX512-BF16 / AMX when present): every block
// product runs in bf16 with fp32 accumulation (5x the fp32 GEMM rate on the 2-core AVX512-BF16 CPU
// here), as PyTorch's own flash kernel does. Its B operand must be pair-interleaved along the
// reduction dimension ("VNNI": Bp[k / 2][n][k % 2]); K^T, V^T, K and V are packed once per call,
// the query and dO blocks of the backward once per block. P and dS are rounded to bf16 before
// their products (as in FlashAttention's bf16 backward); the softmax itself stays fp32.
// fp32 blocks (fp32 inputs, fp16 converted) run on oneDNN's fp32 micro-kernel the same way (plain
// row-major operands, K^T / V^T transposed once per call), 2.5x at::mm_out here. Without either
// micro-kernel (another CPU, torch.backends.mkldnn off) the products go through at::mm_out.
// LLAVIT_CPP_NO_BRGEMM=1 forces that at::mm_out path (tests compare all three).
//
// Registered as the CPU kernels of llavit::span_attention_cpp_fwd / _bwd, whose schemas, fake
// kernels and autograd live in llavit_kernels/ops/_span_attention_cpp.py.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <cstdlib>
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
  thread_local std::vector<float> buffers[4];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// Runs fn(task) for task in order[0..n) on torch's intra-op threads, handing tasks out one at a
// time (a shared counter), so heavy blocks placed first balance across threads.
// at_end() runs on each worker thread after its last task (the bf16 path releases the micro-kernel's
// hardware context there).
template <typename F, typename G>
void run_tasks(const std::vector<int64_t>& order, const F& fn, const G& at_end) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t w = b0; w < b1; ++w) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(order[i]);
    }
    at_end();
  });
}

// ----------------------------------------------------------------------------- bf16 block products
using bf16 = at::BFloat16;

// oneDNN's micro-kernels may be used: LLAVIT_CPP_NO_BRGEMM is not set and the user has not turned
// oneDNN off (torch.backends.mkldnn); read on every call, so tests can switch paths.
bool micro_kernels_allowed() {
  const char* off = std::getenv("LLAVIT_CPP_NO_BRGEMM");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
  return at::globalContext().userEnabledMkldnn();
}

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) || defined(CPUBLAS_BRGEMM_F32F32F32)
// Whether brgemm multiplies A = [[1, 2], [3, 4]] by B = [[5, 6], [7, 8]] right (b holds B in the
// operand layout the call expects): it throws where the CPU lacks the ISA. Called once per dtype.
template <typename T>
bool brgemm_probe(const T* a, const T* b, bool vnni) {
  try {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, vnni);
    at::native::cpublas::brgemm_release(vnni);
    return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
  } catch (const std::exception&) {
    return false;
  }
}
#endif

// Whether the bf16 micro-kernel runs here (the header declares it, it is allowed, and the probe passes).
bool brgemm_bf16_usable() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if (!micro_kernels_allowed()) return false;
  static const bool probe = [] {
    const bf16 a[4] = {bf16(1.f), bf16(2.f), bf16(3.f), bf16(4.f)};
    const bf16 bp[4] = {bf16(5.f), bf16(7.f), bf16(6.f), bf16(8.f)};  // pair-interleaved: Bp[0][n][k] = B[k][n]
    return brgemm_probe(a, bp, true);
  }();
  return probe;
#else
  return false;
#endif
}

// C[M, N] (+)= A[M, K] @ B, A row-major (row stride lda), B pair-interleaved (ldb pairs per row).
inline void gemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                      const bf16* A, const bf16* Bp, float* C) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, Bp, C, true);
#else
  TORCH_CHECK(false, "span_attention_cpp: bf16 micro-kernel not available in this torch");
#endif
}

// The same for fp32 blocks (oneDNN's fp32 micro-kernel; AVX2 and up): measured 2.5x at::mm_out's rate
// on this AMD CPU (at::mm_out goes to the MKL of the PyPI wheel), for 64 x 512 x 128 blocks.
bool brgemm_f32_usable() {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if (!micro_kernels_allowed()) return false;
  static const bool probe = [] {
    const float a[4] = {1.f, 2.f, 3.f, 4.f}, b[4] = {5.f, 6.f, 7.f, 8.f};  // row-major B
    return brgemm_probe(a, b, false);
  }();
  return probe;
#else
  return false;
#endif
}

// C[M, N] (+)= A[M, K] @ B[K, N], all row-major fp32 with row strides lda, ldb, ldc.
inline void gemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                     const float* A, const float* B, float* C) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
#else
  TORCH_CHECK(false, "span_attention_cpp: fp32 micro-kernel not available in this torch");
#endif
}

inline void release_f32() {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  at::native::cpublas::brgemm_release(false);
#endif
}

// dst[j * rows + i] = src[i * ld_src + j]: a rows x cols fp32 block transposed into [cols][rows].
inline void transpose_f32(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst) {
  for (int64_t j = 0; j < cols; ++j) {
    float* o = dst + j * rows;
    for (int64_t i = 0; i < rows; ++i) o[i] = src[i * ld_src + j];
  }
}

// Per (batch, KV head) K^T (or V^T) in fp32: [B, Hkv][D][Tk], the B operand of X @ K^T.
at::Tensor transpose_kv_f32(const at::Tensor& x4, const Dims& d) {
  return x4.permute({0, 2, 3, 1}).contiguous();  // [B, Tk, Hkv, D] -> [B, Hkv, D, Tk]
}

inline void release_bf16() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm_release(true);
#endif
}

inline int64_t round_even(int64_t n) { return n + (n & 1); }

// dst[(r / 2) * 2 * ld + 2 * c + r % 2] = src[r * rs + c * cs] for r < rows, c < cols; when rows is
// odd the last pair's second half is 0 (so a product over the rounded-up reduction adds nothing).
inline void pack_pairs(const bf16* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, bf16* dst, int64_t ld) {
  const bf16 zero(0.f);
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const bf16* r0 = src + 2 * p * rs;
    const bool has_r1 = 2 * p + 1 < rows;
    const bf16* r1 = r0 + rs;
    bf16* d = dst + p * 2 * ld;
    for (int64_t c = 0; c < cols; ++c) {
      d[2 * c] = r0[c * cs];
      d[2 * c + 1] = has_r1 ? r1[c * cs] : zero;
    }
  }
}

// Per (batch, KV head) pair-interleaved copies of K or V, [B, Hkv, ...] in one buffer:
// transposed (B operand of X @ K^T, the reduction over D): [D / 2][Tk][2], or
// plain (B operand of P @ V, the reduction over keys): [ceil(Tk / 2)][D][2], zero key at Tk when odd.
at::Tensor pack_kv(const at::Tensor& x4, const Dims& d, bool transposed) {
  const int64_t B = d.B, Tk = d.Tk, Hkv = d.Hkv, D = d.D;
  const int64_t per = transposed ? D * Tk : round_even(Tk) * D;
  at::Tensor out = at::empty({B * Hkv * per}, x4.options());
  const bf16* X = x4.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      const bf16* src = X + (b * Tk * Hkv + hk) * D;
      if (transposed)
        pack_pairs(src, D, Tk, 1, Hkv * D, O + bh * per, Tk);
      else
        pack_pairs(src, Tk, D, Hkv * D, 1, O + bh * per, D);
    }
  });
  return out;
}

// Per-thread bf16 scratch, as scratch() for floats.
inline bf16* scratch_bf16(int slot, int64_t n) {
  thread_local std::vector<bf16> buffers[3];
  std::vector<bf16>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// rows x cols fp32 block (row stride ld_src) -> bf16 [rows][ld_dst], columns [cols, ld_dst) zeroed.
inline void to_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src, bf16* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * ld_src;
    bf16* o = dst + i * ld_dst;
    for (int64_t j = 0; j < cols; ++j) o[j] = bf16(s[j]);
    for (int64_t j = cols; j < ld_dst; ++j) o[j] = bf16(0.f);
  }
}

// Transposed: dst[j][i] = src[i][j] for a rows x cols block, dst [cols][ld_dst], columns [rows, ld_dst) zeroed.
inline void to_bf16_t(const float* src, int64_t rows, int64_t cols, int64_t ld_src, bf16* dst, int64_t ld_dst) {
  for (int64_t j = 0; j < cols; ++j) {
    bf16* o = dst + j * ld_dst;
    for (int64_t i = 0; i < rows; ++i) o[i] = bf16(src[i * ld_src + j]);
    for (int64_t i = rows; i < ld_dst; ++i) o[i] = bf16(0.f);
  }
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
  // bf16 block products (see the header): K^T and V packed once, Q read in place
  const bool mm16 = q.scalar_type() == at::kBFloat16 && d.D % 2 == 0 && brgemm_bf16_usable();
  const at::Tensor q4 = (q.dim() == 3 ? q.unsqueeze(0) : q).contiguous();
  const at::Tensor kf = mm16 ? at::Tensor() : as_f32(k), vf = mm16 ? at::Tensor() : as_f32(v);
  // fp32 block products on oneDNN's micro-kernel (fp32 inputs, and fp16 / bf16 converted per block):
  // K^T transposed once; V and the query block read in place
  const bool mm32 = !mm16 && brgemm_f32_usable();
  const at::Tensor kt32 = mm32 ? transpose_kv_f32(kf, d) : at::Tensor();
  const float* Kt32 = mm32 ? kt32.data_ptr<float>() : nullptr;
  const at::Tensor kt16 = mm16 ? pack_kv((k.dim() == 3 ? k.unsqueeze(0) : k).contiguous(), d, true) : at::Tensor();
  const at::Tensor v16 = mm16 ? pack_kv((v.dim() == 3 ? v.unsqueeze(0) : v).contiguous(), d, false) : at::Tensor();
  const bf16* Kt16 = mm16 ? kt16.data_ptr<bf16>() : nullptr;
  const bf16* V16 = mm16 ? v16.data_ptr<bf16>() : nullptr;
  const int64_t Tk_even = round_even(d.Tk);
  const at::Tensor ks_t = kv_start.contiguous(), ke_t = kv_end.contiguous();
  at::Tensor out4 = new_buffer({d.B, d.Tq, d.H, d.D}, q.options());
  at::Tensor lse = new_buffer({d.B, d.H, d.Tq}, q.options().dtype(at::kFloat));

  const float* Q = half ? nullptr : q4.data_ptr<float>();
  char* Qraw = static_cast<char*>(q4.data_ptr());
  char* Oraw = static_cast<char*>(out4.data_ptr());
  const int64_t esize = q4.element_size();
  const auto half_opts = at::TensorOptions().dtype(q.scalar_type());
  const float* K = mm16 ? nullptr : kf.data_ptr<float>();
  const float* V = mm16 ? nullptr : vf.data_ptr<float>();
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
    // bf16 products: chunks start at even keys (the packed V pairs keys 2i, 2i + 1)
    const int64_t lo = mm16 ? (lo_v[b * nqb + qb] & ~int64_t(1)) : lo_v[b * nqb + qb], hi = hi_v[b * nqb + qb];
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
    const at::Tensor Qv = mm16   ? at::Tensor()
                          : half ? at::from_blob(Qraw + off * esize, {mr, D}, {ldq, 1}, half_opts).to(at::kFloat)
                                 : view2d(Q + off, mr, D, ldq);
    const bf16* Q16 = mm16 ? reinterpret_cast<const bf16*>(Qraw) + off : nullptr;
    const bf16* Kt16b = mm16 ? Kt16 + (b * Hkv + hk) * D * Tk : nullptr;
    const bf16* V16b = mm16 ? V16 + (b * Hkv + hk) * Tk_even * D : nullptr;
    bf16* p16 = mm16 ? scratch_bf16(0, mr * kBlockN) : nullptr;
    at::Tensor Acc = view2d(acc, mr, D, D);
    for (int64_t c0 = lo; c0 < hi; c0 += kBlockN) {
      const int64_t nc = std::min(kBlockN, hi - c0);
      if (mm16) {
        gemm_bf16(mr, nc, D, ldq, Tk, nc, false, Q16, Kt16b + 2 * c0, sbuf);
      } else if (mm32) {
        const float* Qa = Qv.data_ptr<float>();  // fp32: the input block (row stride ldq); half: converted, D
        gemm_f32(mr, nc, D, Qv.stride(0), Tk, nc, false, Qa, Kt32 + (b * Hkv + hk) * D * Tk + c0, sbuf);
      } else {
        at::Tensor S = view2d(sbuf, mr, nc, nc);
        at::mm_out(S, Qv, view2d(K + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk).t());
      }
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
      if (mm16) {
        const int64_t nce = round_even(nc);  // the reduction over keys, rounded up to whole pairs
        to_bf16(sbuf, mr, nc, nc, p16, nce);
        gemm_bf16(mr, D, nce, nce, D, D, true, p16, V16b + c0 * D, acc);
      } else if (mm32) {
        gemm_f32(mr, D, nc, nc, ldk, D, true, sbuf, V + ((b * Tk + c0) * Hkv + hk) * D, acc);
      } else {
        Acc.addmm_(view2d(sbuf, mr, nc, nc), view2d(V + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk));
      }
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
  }, [&] {
    if (mm16) release_bf16();
    if (mm32) release_f32();
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
  // bf16 block products (see the header): q, dO read in place; K^T, V^T and K packed once; the
  // query and dO blocks packed per block for the dK / dV products. Otherwise fp32 copies.
  const bool mm16 = q.scalar_type() == at::kBFloat16 && grad_out.scalar_type() == at::kBFloat16 && D % 2 == 0 &&
                    brgemm_bf16_usable();
  auto as4 = [](const at::Tensor& t) { return (t.dim() == 3 ? t.unsqueeze(0) : t).contiguous(); };
  const at::Tensor qf = mm16 ? as4(q) : as_f32(q), dof = mm16 ? as4(grad_out) : as_f32(grad_out);
  const at::Tensor kf = mm16 ? at::Tensor() : as_f32(k), vf = mm16 ? at::Tensor() : as_f32(v);
  const at::Tensor k4 = mm16 ? as4(k) : at::Tensor(), v4 = mm16 ? as4(v) : at::Tensor();
  const at::Tensor kt16 = mm16 ? pack_kv(k4, d, true) : at::Tensor();
  const at::Tensor vt16 = mm16 ? pack_kv(v4, d, true) : at::Tensor();
  const at::Tensor k16 = mm16 ? pack_kv(k4, d, false) : at::Tensor();
  // fp32 block products on oneDNN's micro-kernel: K^T and V^T transposed once; q, dO, K read in place
  const bool mm32 = !mm16 && brgemm_f32_usable();
  const at::Tensor kt32 = mm32 ? transpose_kv_f32(kf, d) : at::Tensor();
  const at::Tensor vt32 = mm32 ? transpose_kv_f32(vf, d) : at::Tensor();
  const int64_t Tk_even = round_even(Tk);
  const at::Tensor lf = lse.to(at::kFloat).contiguous();
  // delta[b, h, i] = <dO_i, O_i> - dlse_i   (dS = P * (dP - delta)), in fp32
  at::Tensor delta = (as4(grad_out).to(at::kFloat) * as4(out).to(at::kFloat)).sum(-1).permute({0, 2, 1}).contiguous();
  if (grad_lse.has_value() && grad_lse->defined())
    delta.sub_(grad_lse->to(at::kFloat).reshape({B, H, Tq}));
  const at::Tensor ks_t = kv_start.contiguous(), ke_t = kv_end.contiguous();
  at::Tensor dqf = new_buffer({B, Tq, H, D}, q.options().dtype(at::kFloat));
  // dK / dV accumulate in fp32 per KV head when the (batch, KV head) tasks alone keep every thread
  // busy (the G query heads of a group then run one after another in one task: G x less accumulator
  // memory), else per query head, summed over each group at the end. Either order is fixed.
  const bool per_kv = G > 1 && B * Hkv >= at::get_num_threads();
  const int64_t A = per_kv ? Hkv : H;  // accumulator heads
  at::Tensor dkh = at::zeros({B, A, Tk, D}, q.options().dtype(at::kFloat));
  at::Tensor dvh = at::zeros({B, A, Tk, D}, q.options().dtype(at::kFloat));

  const float* Q = mm16 ? nullptr : qf.data_ptr<float>();
  const float* K = mm16 ? nullptr : kf.data_ptr<float>();
  const float* V = mm16 ? nullptr : vf.data_ptr<float>();
  const float* dO = mm16 ? nullptr : dof.data_ptr<float>();
  const bf16* Q16 = mm16 ? qf.data_ptr<bf16>() : nullptr;
  const bf16* dO16 = mm16 ? dof.data_ptr<bf16>() : nullptr;
  const bf16* Kt16 = mm16 ? kt16.data_ptr<bf16>() : nullptr;
  const bf16* Vt16 = mm16 ? vt16.data_ptr<bf16>() : nullptr;
  const bf16* K16 = mm16 ? k16.data_ptr<bf16>() : nullptr;
  const float* Kt32 = mm32 ? kt32.data_ptr<float>() : nullptr;
  const float* Vt32 = mm32 ? vt32.data_ptr<float>() : nullptr;
  const float* LSE = lf.data_ptr<float>();
  const float* DEL = delta.data_ptr<float>();
  float* dQ = dqf.data_ptr<float>();
  float* dKh = dkh.data_ptr<float>();
  float* dVh = dvh.data_ptr<float>();
  const int32_t* KS = ks_t.data_ptr<int32_t>();
  const int32_t* KE = ke_t.data_ptr<int32_t>();
  const float scale = static_cast<float>(softmax_scale);
  const int64_t nqb = (Tq + kBlockM - 1) / kBlockM;

  std::vector<int64_t> order(B * A);
  std::iota(order.begin(), order.end(), 0);
  run_tasks(order, [&](int64_t task) {
   const int64_t b = task / A, a = task % A;
   for (int64_t h = per_kv ? a * G : a; h < (per_kv ? (a + 1) * G : a + 1); ++h) {
    const int64_t hk = h / G;
    const int32_t* ks = KS + b * Tq;
    const int32_t* ke = KE + b * Tq;
    const float* lrow = LSE + (b * H + h) * Tq;
    const float* drow = DEL + (b * H + h) * Tq;
    const int64_t ldq = H * D, ldk = Hkv * D;
    float* dKb = dKh + (b * A + a) * Tk * D;
    float* dVb = dVh + (b * A + a) * Tk * D;
    float* pbuf = scratch(0, kBlockM * kBlockN);
    float* dpbuf = scratch(1, kBlockM * kBlockN);
    float* dqacc = scratch(2, kBlockM * D);
    // bf16: [rows][cols rounded to pairs] copies of P^T, dS and dS^T, and the packed q / dO block
    bf16* pt16 = mm16 ? scratch_bf16(0, kBlockN * kBlockM) : nullptr;
    bf16* ds16 = mm16 ? scratch_bf16(1, kBlockM * kBlockN) : nullptr;
    bf16* qdo16 = mm16 ? scratch_bf16(2, 2 * kBlockM * D) : nullptr;
    const bf16* Kt16b = mm16 ? Kt16 + (b * Hkv + hk) * D * Tk : nullptr;
    const bf16* Vt16b = mm16 ? Vt16 + (b * Hkv + hk) * D * Tk : nullptr;
    const bf16* K16b = mm16 ? K16 + (b * Hkv + hk) * Tk_even * D : nullptr;
    float* ptbuf = mm32 ? scratch(3, kBlockN * kBlockM) : nullptr;  // P^T / dS^T, [nc][mr]
    const float* Kt32b = mm32 ? Kt32 + (b * Hkv + hk) * D * Tk : nullptr;
    const float* Vt32b = mm32 ? Vt32 + (b * Hkv + hk) * D * Tk : nullptr;
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
      const int64_t off = ((b * Tq + m0) * H + h) * D;
      const int64_t mre = round_even(mr);  // the reduction over queries (dK, dV), in whole pairs
      if (mm16) {
        lo &= ~int64_t(1);  // chunks start at even keys (the packed K pairs keys 2i, 2i + 1)
        pack_pairs(Q16 + off, mr, D, ldq, 1, qdo16, D);
        pack_pairs(dO16 + off, mr, D, ldq, 1, qdo16 + mre * D, D);
      }
      const at::Tensor Qv = mm16 ? at::Tensor() : view2d(Q + off, mr, D, ldq);
      const at::Tensor dOv = mm16 ? at::Tensor() : view2d(dO + off, mr, D, ldq);
      at::Tensor dQacc = view2d(dqacc, mr, D, D);
      for (int64_t c0 = lo; c0 < hi; c0 += kBlockN) {
        const int64_t nc = std::min(kBlockN, hi - c0);
        const int64_t nce = round_even(nc);
        if (mm16) {
          gemm_bf16(mr, nc, D, ldq, Tk, nc, false, Q16 + off, Kt16b + 2 * c0, pbuf);
        } else if (mm32) {
          gemm_f32(mr, nc, D, ldq, Tk, nc, false, Q + off, Kt32b + c0, pbuf);
        } else {
          at::Tensor P = view2d(pbuf, mr, nc, nc);
          at::mm_out(P, Qv, view2d(K + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk).t());
        }
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
        if (mm16) {
          to_bf16_t(pbuf, mr, nc, nc, pt16, mre);
          gemm_bf16(nc, D, mre, mre, D, D, true, pt16, qdo16 + mre * D, dVb + c0 * D);  // dV += P^T dO
          gemm_bf16(mr, nc, D, ldq, Tk, nc, false, dO16 + off, Vt16b + 2 * c0, dpbuf);  // dP = dO V^T
        } else if (mm32) {
          transpose_f32(pbuf, mr, nc, nc, ptbuf);
          gemm_f32(nc, D, mr, mr, ldq, D, true, ptbuf, dO + off, dVb + c0 * D);  // dV += P^T dO
          gemm_f32(mr, nc, D, ldq, Tk, nc, false, dO + off, Vt32b + c0, dpbuf);  // dP = dO V^T
        } else {
          const at::Tensor Vc = view2d(V + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk);
          view2d(dVb + c0 * D, nc, D, D).addmm_(view2d(pbuf, mr, nc, nc).t(), dOv);
          at::Tensor dP = view2d(dpbuf, mr, nc, nc);
          at::mm_out(dP, dOv, Vc.t());
        }
        for (int64_t i = 0; i < mr; ++i) {
          float* p = pbuf + i * nc;
          float* dp = dpbuf + i * nc;
          const float dl = drow[m0 + i];
          for (int64_t j = 0; j < nc; ++j) dp[j] = p[j] * (dp[j] - dl);
        }
        if (mm16) {
          to_bf16(dpbuf, mr, nc, nc, ds16, nce);
          gemm_bf16(mr, D, nce, nce, D, D, true, ds16, K16b + c0 * D, dqacc);  // dQ += dS K
          to_bf16_t(dpbuf, mr, nc, nc, pt16, mre);
          gemm_bf16(nc, D, mre, mre, D, D, true, pt16, qdo16, dKb + c0 * D);  // dK += dS^T Q
        } else if (mm32) {
          gemm_f32(mr, D, nc, nc, ldk, D, true, dpbuf, K + ((b * Tk + c0) * Hkv + hk) * D, dqacc);  // dQ += dS K
          transpose_f32(dpbuf, mr, nc, nc, ptbuf);
          gemm_f32(nc, D, mr, mr, ldq, D, true, ptbuf, Q + off, dKb + c0 * D);  // dK += dS^T Q
        } else {
          const at::Tensor Kc = view2d(K + ((b * Tk + c0) * Hkv + hk) * D, nc, D, ldk);
          const at::Tensor dS = view2d(dpbuf, mr, nc, nc);
          dQacc.addmm_(dS, Kc);
          view2d(dKb + c0 * D, nc, D, D).addmm_(dS.t(), Qv);
        }
      }
      for (int64_t i = 0; i < mr; ++i) {
        float* row = dQb + i * ldq;
        const float* ar = dqacc + i * D;
        for (int64_t j = 0; j < D; ++j) row[j] = ar[j] * scale;
      }
    }
   }
  }, [&] {
    if (mm16) release_bf16();
    if (mm32) release_f32();
  });

  // Per query head: sum the heads of each KV group in a fixed order; back to [B, Tk, Hkv, D].
  at::Tensor dk = per_kv ? dkh.mul_(scale).permute({0, 2, 1, 3})
                         : dkh.view({B, Hkv, G, Tk, D}).sum(2).mul_(scale).permute({0, 2, 1, 3});
  at::Tensor dv = per_kv ? dvh.permute({0, 2, 1, 3}) : dvh.view({B, Hkv, G, Tk, D}).sum(2).permute({0, 2, 1, 3});
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

// Whether bf16 inputs get bf16 block products here (else they are converted to fp32): the CPU default
// (ops/span_attention.py) picks this kernel for bf16 training only where they do.
bool bf16_block_products() { return brgemm_bf16_usable(); }
bool f32_block_products() { return brgemm_f32_usable(); }

TORCH_LIBRARY_FRAGMENT(llavit_cpp, m) {
  m.def("bf16_block_products() -> bool", &bf16_block_products);
  m.def("f32_block_products() -> bool", &f32_block_products);
}

TORCH_LIBRARY_IMPL(llavit, CPU, m) {
  m.impl("span_attention_cpp_fwd", &fwd_cpu);
  m.impl("span_attention_cpp_bwd", &bwd_cpu);
}
