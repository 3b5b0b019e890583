// Fused CPU selective scan (mamba-ssm selective_scan_ref semantics), forward and backward.
//
// Shapes: u, delta, z, out: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); state: (B, D, N).
// Per channel (b, d), with dt_l = softplus(delta_l + bias) (or without softplus):
//   h_l = exp(dt_l * A) * h_{l-1} + dt_l * B_l * u_l,   y_l = <C_l, h_l> + D * u_l,   out_l = y_l * silu(z_l)
//
// Layout: the vector lanes run over W neighbouring channels d of one batch row b (a "block"), not over the
// state index n. Each step then computes N independent lane-wide exponentials and recurrences (plenty of
// instruction-level parallelism), B_l[n] and C_l[n] are scalars broadcast to all lanes, and <C_l, h_l>
// is a vertical sum over n: no horizontal reductions in the time loop. A block's rows of u, delta, z
// (and dout) are read once, with any strides, into (L, W) buffers; the softplus, skip and gate run on
// those buffers and the results are written back to the (B, D, L) outputs. Lanes past D are zero.
// Forward: parallel over the (b, block) pairs. With `reverse` the time loop walks L backwards (out_l
// stays at position l), in the backward pass too.
// Backward: per block, one forward pass recomputes the decays exp(dt_l A) and the decayed states
// exp(dt_l A) h_{l-1} into (L, N) lane buffers (the only exponentials of the backward), writing
// dC_l = dy_l h_l at once; one reverse pass then accumulates the other gradients. Parallel over the
// blocks with the batch loop outside, so that dA, dD and d(delta_bias) of a block are owned by one thread
// and dB, dC (summed over d) are accumulated lane-wide per thread and batch row, reduced over lanes once
// per batch row and over threads at the end.
// The Python side passes float32 or float64 tensors of one dtype. The vector width is the widest the
// build targets (AVX-512: 64 bytes, AVX2: 32, otherwise 16), through GCC/Clang vector extensions.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define SS_INLINE inline __attribute__((always_inline))

namespace {

using at::Tensor;

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// Lane-wide vectors of T and of the unsigned integers of T's width (the attribute needs a concrete type).
template <typename T>
struct VectorTypes;
template <>
struct VectorTypes<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef uint32_t U __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorTypes<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef uint64_t U __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VectorTypes<T>::V;
template <typename T>
using Bits = typename VectorTypes<T>::U;
template <typename V>
using ElementOf = std::remove_cvref_t<decltype(std::declval<V>()[0])>;
template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);

template <typename T>
SS_INLINE Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

template <typename T>
SS_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// max(lo, x) and min(hi, x) lane-wise, keeping a NaN x: x86's MAXPS / MINPS with the bound as the first
// operand return the second one when either is NaN (compilers do not turn the selects into them).
template <typename V, typename T = ElementOf<V>>
SS_INLINE V at_least(V x, T lo) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) return (V)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)x);
  else return (V)_mm512_max_pd(_mm512_set1_pd(lo), (__m512d)x);
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4) return (V)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)x);
  else return (V)_mm256_max_pd(_mm256_set1_pd(lo), (__m256d)x);
#elif defined(__SSE2__)
  if constexpr (sizeof(T) == 4) return (V)_mm_max_ps(_mm_set1_ps(lo), (__m128)x);
  else return (V)_mm_max_pd(_mm_set1_pd(lo), (__m128d)x);
#else
  return x < lo ? splat(lo) : x;
#endif
}

template <typename V, typename T = ElementOf<V>>
SS_INLINE V at_most(V x, T hi) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) return (V)_mm512_min_ps(_mm512_set1_ps(hi), (__m512)x);
  else return (V)_mm512_min_pd(_mm512_set1_pd(hi), (__m512d)x);
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4) return (V)_mm256_min_ps(_mm256_set1_ps(hi), (__m256)x);
  else return (V)_mm256_min_pd(_mm256_set1_pd(hi), (__m256d)x);
#elif defined(__SSE2__)
  if constexpr (sizeof(T) == 4) return (V)_mm_min_ps(_mm_set1_ps(hi), (__m128)x);
  else return (V)_mm_min_pd(_mm_set1_pd(hi), (__m128d)x);
#else
  return x > hi ? splat(hi) : x;
#endif
}

// Constants of exp(): the range [lo, hi] = [-(bias - 1) ln 2, (bias - 1/2) ln 2] in which 2^k is a normal
// number, 1.5 * 2^(mantissa bits) (adding it rounds to an integer kept in the low mantissa), ln 2 in
// two parts (Cody-Waite), the exponent bias and mantissa width, the Taylor degree.
template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  static constexpr float lo = -87.3365447505531f, hi = 88.3762626647950f, magic = 12582912.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187045e-06f;
  static constexpr uint32_t bias = 127, shift = 23;
  static constexpr int degree = 7;
};
template <>
struct ExpConstants<double> {
  static constexpr double lo = -708.396418532264, hi = 709.436139303104, magic = 6755399441055744.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr uint64_t bias = 1023, shift = 52;
  static constexpr int degree = 13;
};

// 1 / k!, the Taylor coefficients of exp.
template <typename T>
constexpr T inverse_factorial(int k) {
  T f = 1;
  for (int i = 2; i <= k; ++i) f *= i;
  return T(1) / f;
}

// exp(x) lane-wise: x = k ln2 + r with |r| <= ln2/2, a Taylor polynomial for exp(r) (float: degree 7,
// double: 13; truncation error below one ulp) times 2^k built in the exponent field. x is clamped to the
// range where 2^k is normal: below it the result is 0 (as a flush of the denormal range), above it the
// largest value of the range instead of an overflow to inf; NaN stays NaN.
template <typename V, typename T = ElementOf<V>>
SS_INLINE V vexp(V x) {
  using K = ExpConstants<T>;
  using U = Bits<T>;
  const V xc = at_most(at_least(x, K::lo), K::hi);
  const V t = xc * K::log2e + K::magic;
  const V k = t - K::magic;
  const V r = (xc - k * K::ln2_hi) - k * K::ln2_lo;
  V p = splat(inverse_factorial<T>(K::degree));
#pragma GCC unroll 16
  for (int d = K::degree - 1; d >= 0; --d) p = p * r + inverse_factorial<T>(d);
  // The low bits of t hold k (two's complement): (k + bias) << shift is 2^k.
  const V scaled = p * (V)(((U)t - (U)splat(K::magic) + K::bias) << K::shift);
  return (V)((U)scaled & ~(U)(x < K::lo));
}

// log1p(e) for e in [0, 1] as 2 atanh(e / (2 + e)): an odd series in s = e / (2 + e) <= 1/3 (float: 7
// terms, double: 16 terms; truncation error below one ulp).
template <typename V, typename T = ElementOf<V>>
SS_INLINE V log1p_unit(V e) {
  constexpr int terms = sizeof(T) == 4 ? 7 : 16;
  const V s = e / (T(2) + e), s2 = s * s;
  V p = splat(T(1) / T(2 * terms - 1));
#pragma GCC unroll 16
  for (int k = terms - 2; k >= 0; --k) p = p * s2 + T(1) / T(2 * k + 1);
  return T(2) * s * p;
}

template <typename V, typename T = ElementOf<V>>
SS_INLINE V sigmoid(V x) {
  return T(1) / (T(1) + vexp(-x));
}

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative.
template <typename V, typename T = ElementOf<V>>
SS_INLINE V softplus(V x) {
  const V absx = x < T(0) ? -x : x;
  const V smooth = at_least(x, T(0)) + log1p_unit(vexp(-absx));
  return x > T(20) ? x : smooth;
}

template <typename V, typename T = ElementOf<V>>
SS_INLINE V softplus_grad(V x) {
  return x > T(20) ? splat(T(1)) : sigmoid(x);
}

// A (B, D, L) tensor with any strides.
template <typename T>
struct Strided {
  const T* data;
  int64_t sb, sd, sl;
};

template <typename T>
Strided<T> strided(const Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// A block: lanes j < lanes of channels (b, d0 + j).
struct Block {
  int64_t b, d0;
  int lanes;
};

// buf[l][j] = x[b, d0 + j, l] (0 for lanes past D).
template <typename T>
void gather(const Strided<T>& x, const Block& blk, int64_t L, Vec<T>* buf) {
  T* out = reinterpret_cast<T*>(buf);
  constexpr int W = kLanes<T>;
  for (int j = 0; j < W; ++j) {
    if (j < blk.lanes) {
      const T* row = x.data + blk.b * x.sb + (blk.d0 + j) * x.sd;
      for (int64_t l = 0; l < L; ++l) out[l * W + j] = row[l * x.sl];
    } else {
      for (int64_t l = 0; l < L; ++l) out[l * W + j] = T(0);
    }
  }
}

// out[b, d0 + j, l] = buf[l][j] for the block's lanes; out is contiguous (B, D, L).
template <typename T>
void scatter(const Vec<T>* buf, const Block& blk, int64_t D, int64_t L, T* out) {
  const T* in = reinterpret_cast<const T*>(buf);
  constexpr int W = kLanes<T>;
  for (int j = 0; j < blk.lanes; ++j) {
    T* row = out + (blk.b * D + blk.d0 + j) * L;
    for (int64_t l = 0; l < L; ++l) row[l] = in[l * W + j];
  }
}

// Per-lane parameters of a block: A transposed to (N, W), D and delta_bias; zero past D.
template <typename T>
struct BlockParams {
  std::vector<Vec<T>> A;
  Vec<T> D{}, bias{};
};

template <typename T>
struct ScanArgs {
  Strided<T> u, delta, z;  // z.data nullable
  const T* A;
  const T* Bt;  // (B, L, N)
  const T* Ct;  // (B, L, N)
  const T* D;     // nullable
  const T* bias;  // nullable
  int64_t batch, dim, len, nstate;
  bool softplus, reverse;

  int64_t blocks_per_row() const { return (dim + kLanes<T> - 1) / kLanes<T>; }

  Block block(int64_t b, int64_t k) const {
    const int64_t d0 = k * kLanes<T>;
    return {b, d0, static_cast<int>(std::min<int64_t>(kLanes<T>, dim - d0))};
  }

  // The position of the scan's step-th step.
  int64_t position(int64_t step) const { return reverse ? len - 1 - step : step; }

  void params(const Block& blk, BlockParams<T>& p) const {
    const int64_t N = nstate;
    p.A.assign(N, Vec<T>{});
    p.D = Vec<T>{};
    p.bias = Vec<T>{};
    for (int j = 0; j < blk.lanes; ++j) {
      const int64_t d = blk.d0 + j;
      for (int64_t n = 0; n < N; ++n) p.A[n][j] = A[d * N + n];
      if (D) p.D[j] = D[d];
      if (bias) p.bias[j] = bias[d];
    }
  }

  // dt[l] = softplus(delta + bias) (or without softplus), read from `raw` = the block's delta rows.
  void time_steps(const Vec<T>* raw, const BlockParams<T>& p, Vec<T>* dt) const {
    for (int64_t l = 0; l < len; ++l) dt[l] = softplus ? ::softplus(raw[l] + p.bias) : raw[l] + p.bias;
  }
};

template <typename T>
ScanArgs<T> make_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bt,
                      const Tensor& Ct, const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                      const std::optional<Tensor>& bias, bool softplus, bool reverse) {
  return ScanArgs<T>{strided<T>(u),
                     strided<T>(delta),
                     z ? strided<T>(*z) : Strided<T>{nullptr, 0, 0, 0},
                     A.data_ptr<T>(),
                     Bt.data_ptr<T>(),
                     Ct.data_ptr<T>(),
                     D ? D->data_ptr<T>() : nullptr,
                     bias ? bias->data_ptr<T>() : nullptr,
                     u.size(0),
                     u.size(1),
                     u.size(2),
                     A.size(1),
                     softplus,
                     reverse};
}

inline int team_size(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work)));
}

// NS > 0: the state size N, fixed at compile time (the common N = 16, so that the n loops unroll);
// NS = 0: N = a.nstate.
template <typename T, int NS>
void forward_kernel(const ScanArgs<T>& a, T* out, T* last_state) {
  using V = Vec<T>;
  const int64_t L = a.len, N = NS > 0 ? NS : a.nstate, per_row = a.blocks_per_row();
  const int64_t blocks = a.batch * per_row;
#pragma omp parallel num_threads(team_size(blocks))
  {
    std::vector<V> u(L), dt(L), y(L), h(N);
    BlockParams<T> p;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < blocks; ++i) {
      const Block blk = a.block(i / per_row, i % per_row);
      a.params(blk, p);
      gather(a.delta, blk, L, y.data());
      a.time_steps(y.data(), p, dt.data());
      gather(a.u, blk, L, u.data());
      const T* Bt = a.Bt + blk.b * L * N;
      const T* Ct = a.Ct + blk.b * L * N;
      std::fill(h.begin(), h.end(), V{});
      for (int64_t step = 0; step < L; ++step) {
        const int64_t l = a.position(step);
        const V dtl = dt[l], dtu = dtl * u[l];
        const T* Bl = Bt + l * N;
        const T* Cl = Ct + l * N;
        V acc0{}, acc1{};  // two partial sums shorten the dependency chain of <C_l, h_l>
#pragma GCC unroll 16
        for (int64_t n = 0; n < N; ++n) {
          h[n] = vexp(dtl * p.A[n]) * h[n] + dtu * Bl[n];
          (n % 2 == 0 ? acc0 : acc1) += Cl[n] * h[n];
        }
        y[l] = acc0 + acc1 + p.D * u[l];
      }
      if (a.z.data) {
        gather(a.z, blk, L, u.data());  // u is no longer needed
        for (int64_t l = 0; l < L; ++l) y[l] = y[l] * u[l] * sigmoid(u[l]);
      }
      scatter(y.data(), blk, a.dim, L, out);
      for (int j = 0; j < blk.lanes; ++j) {
        T* last = last_state + (blk.b * a.dim + blk.d0 + j) * N;
        for (int64_t n = 0; n < N; ++n) last[n] = h[n][j];
      }
    }
  }
}

template <typename T>
struct Grads {
  T* du;
  T* ddelta;
  T* dA;
  T* dBt;  // (B, L, N), fully written by the reduction
  T* dCt;
  T* dD;     // nullable
  T* dz;     // nullable
  T* dbias;  // nullable
};

template <typename T, int NS>
void backward_kernel(const ScanArgs<T>& a, const Strided<T>& dout, const T* dlast, const Grads<T>& g) {
  using V = Vec<T>;
  constexpr int W = kLanes<T>;
  const int64_t L = a.len, N = NS > 0 ? NS : a.nstate, Bsz = a.batch, LN = L * N;
  const int64_t per_row = a.blocks_per_row();
  const int nthreads = team_size(per_row);
  std::vector<T> acc(static_cast<size_t>(nthreads) * 2 * Bsz * LN, T(0));  // per thread: dB | dC
  // Per block, accumulated over the batch by the thread that owns the block: dA (N vectors), dD, dbias.
  std::vector<V> owned(per_row * (N + 2), V{});
#pragma omp parallel num_threads(nthreads)
  {
    T* dB_acc = acc.data() + static_cast<int64_t>(omp_get_thread_num()) * 2 * Bsz * LN;
    T* dC_acc = dB_acc + Bsz * LN;
    // dy: d(out); gy: the gradient of the output before the gate; pre: that output (y + D u).
    std::vector<V> u(L), dt(L), dy(L), zb(a.z.data ? L : 0), gy_gated(a.z.data ? L : 0), pre(L);
    std::vector<V> decay(LN), decayed(LN), dB_lanes(LN), dC_lanes(LN), carry(N);
    BlockParams<T> p;
    for (int64_t b = 0; b < Bsz; ++b) {
      std::fill(dB_lanes.begin(), dB_lanes.end(), V{});
      std::fill(dC_lanes.begin(), dC_lanes.end(), V{});
      bool touched = false;
      // The same static schedule for every b: a block always goes to the same thread.
#pragma omp for schedule(static) nowait
      for (int64_t k = 0; k < per_row; ++k) {
        touched = true;
        const Block blk = a.block(b, k);
        V* dA_blk = owned.data() + k * (N + 2);
        a.params(blk, p);
        gather(a.delta, blk, L, pre.data());
        a.time_steps(pre.data(), p, dt.data());
        gather(a.u, blk, L, u.data());
        gather(dout, blk, L, dy.data());
        V* gy = dy.data();
        if (a.z.data) {
          gather(a.z, blk, L, zb.data());
          gy = gy_gated.data();
          for (int64_t l = 0; l < L; ++l) gy[l] = dy[l] * zb[l] * sigmoid(zb[l]);
        }
        // Recompute: decay[l] = exp(dt_l A), decayed[l] = decay[l] * h_{l-1}, pre[l] = y_l + D u_l,
        // and dC_l += gy_l h_l while h_l is at hand.
        V* const h = carry.data();
        std::fill(h, h + N, V{});
        for (int64_t step = 0; step < L; ++step) {
          const int64_t l = a.position(step);
          const V dtu = dt[l] * u[l], go = gy[l];
          const T* Bl = a.Bt + b * LN + l * N;
          const T* Cl = a.Ct + b * LN + l * N;
          V* dec = decay.data() + l * N;
          V* q = decayed.data() + l * N;
          V* dCl = dC_lanes.data() + l * N;
          V y0{}, y1{};  // two partial sums shorten the dependency chain of <C_l, h_l>
#pragma GCC unroll 16
          for (int64_t n = 0; n < N; ++n) {
            dec[n] = vexp(dt[l] * p.A[n]);
            q[n] = dec[n] * h[n];
            h[n] = q[n] + dtu * Bl[n];
            dCl[n] += go * h[n];
            (n % 2 == 0 ? y0 : y1) += Cl[n] * h[n];
          }
          pre[l] = y0 + y1 + p.D * u[l];
        }
        if (a.z.data) {  // dz = dy * pre * s * (1 + z (1 - s)), s = sigmoid(z)
          for (int64_t l = 0; l < L; ++l) {
            const V s = sigmoid(zb[l]);
            dy[l] = dy[l] * pre[l] * s * (T(1) + zb[l] * (T(1) - s));
          }
          scatter(dy.data(), blk, a.dim, L, g.dz);
        }
        // Reverse pass; carry = exp(dt_{l+1} A) * dh_{l+1}, starting from d(last_state). du and d(dt)
        // overwrite u and dt at each step, after their last use.
        for (int64_t n = 0; n < N; ++n) {
          carry[n] = V{};
          for (int j = 0; j < blk.lanes && dlast; ++j) carry[n][j] = dlast[(b * a.dim + blk.d0 + j) * N + n];
        }
        V dD{};
        for (int64_t step = L - 1; step >= 0; --step) {
          const int64_t l = a.position(step);
          const V dtl = dt[l], ul = u[l], go = gy[l], dtu = dtl * ul;
          const T* Bl = a.Bt + b * LN + l * N;
          const T* Cl = a.Ct + b * LN + l * N;
          const V* dec = decay.data() + l * N;
          const V* q = decayed.data() + l * N;
          V* dBl = dB_lanes.data() + l * N;
          V dhB0{}, dhB1{}, ddt0{}, ddt1{};
#pragma GCC unroll 16
          for (int64_t n = 0; n < N; ++n) {
            const V dh = go * Cl[n] + carry[n];
            const V dlog = dh * q[n];  // gradient w.r.t. dt_l * A[n]
            dBl[n] += dh * dtu;
            dA_blk[n] += dlog * dtl;
            (n % 2 == 0 ? dhB0 : dhB1) += dh * Bl[n];
            (n % 2 == 0 ? ddt0 : ddt1) += dlog * p.A[n];
            carry[n] = dec[n] * dh;
          }
          const V dhB = dhB0 + dhB1;
          dD += go * ul;
          u[l] = go * p.D + dtl * dhB;
          dt[l] = ddt0 + ddt1 + dhB * ul;
        }
        dA_blk[N] += dD;
        scatter(u.data(), blk, a.dim, L, g.du);
        if (a.softplus) {
          gather(a.delta, blk, L, pre.data());
          for (int64_t l = 0; l < L; ++l) dt[l] = dt[l] * softplus_grad(pre[l] + p.bias);
        }
        V dbias{};
        for (int64_t l = 0; l < L; ++l) dbias += dt[l];
        dA_blk[N + 1] += dbias;
        scatter(dt.data(), blk, a.dim, L, g.ddelta);
      }
      if (touched) {  // this thread's dB[b] += dB_lanes summed over the lanes; the same for dC
        T* dB_row = dB_acc + b * LN;
        T* dC_row = dC_acc + b * LN;
        for (int64_t i = 0; i < LN; ++i) {
          T sb = T(0), sc = T(0);
          for (int j = 0; j < W; ++j) {
            sb += dB_lanes[i][j];
            sc += dC_lanes[i][j];
          }
          dB_row[i] += sb;
          dC_row[i] += sc;
        }
      }
    }
  }
  for (int64_t k = 0; k < per_row; ++k) {
    const Block blk = a.block(0, k);
    const V* dA_blk = owned.data() + k * (N + 2);
    for (int j = 0; j < blk.lanes; ++j) {
      const int64_t d = blk.d0 + j;
      for (int64_t n = 0; n < N; ++n) g.dA[d * N + n] = dA_blk[n][j];
      if (g.dD) g.dD[d] = dA_blk[N][j];
      if (g.dbias) g.dbias[d] = dA_blk[N + 1][j];
    }
  }
  // Reduce the per-thread dB / dC buffers.
  at::parallel_for(0, 2 * Bsz * LN, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T s = T(0);
      for (int t = 0; t < nthreads; ++t) s += acc[static_cast<int64_t>(t) * 2 * Bsz * LN + i];
      (i < Bsz * LN ? g.dBt[i] : g.dCt[i - Bsz * LN]) = s;
    }
  });
}

// Shapes, dtypes and layouts the kernels rely on (the Python wrapper guarantees them; direct callers of
// torch.ops.mambaxray_ctl get an error instead of an out-of-bounds read). u, delta, z, B and C may have
// any strides.
void check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                  const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                  const std::optional<Tensor>& delta_bias) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective_scan_cpu: float32 or float64 expected, got ", u.scalar_type());
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "selective_scan_cpu: u must be (B, D, L) and A (D, N)");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1);
  const auto expect = [&](const Tensor& t, at::IntArrayRef shape, bool contiguous, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == u.scalar_type(), "selective_scan_cpu: ", name,
                " must be a CPU tensor of u's dtype");
    TORCH_CHECK(t.sizes() == shape, "selective_scan_cpu: ", name, " has shape ", t.sizes(), ", expected ",
                shape);
    TORCH_CHECK(!contiguous || t.is_contiguous(), "selective_scan_cpu: ", name, " must be contiguous");
  };
  expect(u, {batch, dim, len}, false, "u");
  expect(delta, {batch, dim, len}, false, "delta");
  expect(A, {dim, nstate}, true, "A");
  expect(B, {batch, nstate, len}, false, "B");
  expect(C, {batch, nstate, len}, false, "C");
  if (D) expect(*D, {dim}, true, "D");
  if (z) expect(*z, {batch, dim, len}, false, "z");
  if (delta_bias) expect(*delta_bias, {dim}, true, "delta_bias");
}

std::tuple<Tensor, Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                    const Tensor& C, const std::optional<Tensor>& D,
                                    const std::optional<Tensor>& z, const std::optional<Tensor>& delta_bias,
                                    bool delta_softplus, bool reverse) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  const Tensor Bt = B.transpose(1, 2).contiguous(), Ct = C.transpose(1, 2).contiguous();
  Tensor out = at::empty(u.sizes(), u.options());
  Tensor last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    const auto args = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, reverse);
    if (A.size(1) == 16) {
      forward_kernel<scalar_t, 16>(args, out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>());
    } else {
      forward_kernel<scalar_t, 0>(args, out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>());
    }
  });
  return {out, last};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, d(delta_bias); the last three are empty when the input is absent.
std::vector<Tensor> scan_bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                             const Tensor& C, const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                             const std::optional<Tensor>& delta_bias, bool delta_softplus, const Tensor& dout,
                             const std::optional<Tensor>& dlast, bool reverse) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  TORCH_CHECK(dout.scalar_type() == u.scalar_type() && dout.sizes() == u.sizes(),
              "selective_scan_cpu: dout must be of u's dtype and shape");
  TORCH_CHECK(!dlast || (dlast->is_contiguous() && dlast->scalar_type() == u.scalar_type() &&
                         dlast->sizes() == at::IntArrayRef({u.size(0), u.size(1), A.size(1)})),
              "selective_scan_cpu: dlast must be contiguous, of u's dtype and shape (B, D, N)");
  const Tensor Bt = B.transpose(1, 2).contiguous(), Ct = C.transpose(1, 2).contiguous();
  const auto options = u.options();
  Tensor du = at::empty(u.sizes(), options), ddelta = at::empty(u.sizes(), options), dA = at::empty_like(A);
  Tensor dBt = at::empty_like(Bt), dCt = at::empty_like(Ct);
  Tensor dD = D ? at::empty_like(*D) : at::empty({0}, options);
  Tensor dz = z ? at::empty(u.sizes(), options) : at::empty({0}, options);
  Tensor dbias = delta_bias ? at::empty_like(*delta_bias) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    const Grads<scalar_t> grads{du.data_ptr<scalar_t>(),
                                ddelta.data_ptr<scalar_t>(),
                                dA.data_ptr<scalar_t>(),
                                dBt.data_ptr<scalar_t>(),
                                dCt.data_ptr<scalar_t>(),
                                D ? dD.data_ptr<scalar_t>() : nullptr,
                                z ? dz.data_ptr<scalar_t>() : nullptr,
                                delta_bias ? dbias.data_ptr<scalar_t>() : nullptr};
    const auto args = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, reverse);
    const scalar_t* dlast_ptr = dlast ? dlast->data_ptr<scalar_t>() : nullptr;
    if (A.size(1) == 16) {
      backward_kernel<scalar_t, 16>(args, strided<scalar_t>(dout), dlast_ptr, grads);
    } else {
      backward_kernel<scalar_t, 0>(args, strided<scalar_t>(dout), dlast_ptr, grads);
    }
  });
  return {du, ddelta, dA, dBt.transpose(1, 2), dCt.transpose(1, 2), dD, dz, dbias};
}

// ---------------------------------------------------------------------------------------------------------
// Mamba's depthwise causal convolution followed by SiLU, fused: y = silu(bias + sum_k w[k] x[l - K + 1 + k])
// per channel (zero padding), or with `reverse` causal towards the end: x[l + K - 1 - k]. x: (B, C, L) with
// any strides, w: (C, K), bias: (C,). A row is copied into a zero-padded buffer p (x[i] at p[i + K - 1])
// and the taps are vector loads along l: forward p[l + k], reverse p[l + 2 (K - 1) - k].

template <typename T>
struct ConvArgs {
  Strided<T> x;
  const T* w;     // (C, K)
  const T* bias;  // nullable
  int64_t batch, channels, len, width;
  bool reverse;

  int64_t tap(int k) const { return reverse ? 2 * (width - 1) - k : k; }

  // p = [K - 1 zeros, row (b, c), zeros]; the buffer has room for vector loads past the end.
  void pad_row(int64_t b, int64_t c, T* p) const {
    const T* row = x.data + b * x.sb + c * x.sd;
    std::fill(p, p + width - 1, T(0));
    for (int64_t l = 0; l < len; ++l) p[width - 1 + l] = row[l * x.sl];
    std::fill(p + width - 1 + len, p + padded_length(), T(0));
  }

  int64_t vectors() const { return (len + kLanes<T> - 1) / kLanes<T>; }
  int64_t padded_length() const { return vectors() * kLanes<T> + 2 * (width - 1); }

  // a[i] (vector i of the row) = bias + sum_k w[k] p[l + tap(k)], the convolution before the SiLU.
  void convolve(const T* p, int64_t c, Vec<T>* a) const {
    const T* wc = w + c * width;
    const T b0 = bias ? bias[c] : T(0);
    for (int64_t i = 0; i < vectors(); ++i) {
      Vec<T> acc = splat(b0);
      for (int k = 0; k < width; ++k) acc += wc[k] * load(p + i * kLanes<T> + tap(k));
      a[i] = acc;
    }
  }
};

template <typename T>
void conv_silu_forward(const ConvArgs<T>& a, T* out) {
  const int64_t rows = a.batch * a.channels;
#pragma omp parallel num_threads(team_size(rows))
  {
    std::vector<T> p(a.padded_length());
    std::vector<Vec<T>> acc(a.vectors());
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / a.channels, c = r % a.channels;
      a.pad_row(b, c, p.data());
      a.convolve(p.data(), c, acc.data());
      for (auto& v : acc) v = v * sigmoid(v);
      std::memcpy(out + r * a.len, acc.data(), a.len * sizeof(T));
    }
  }
}

// dx, dw, dbias from dy (any strides). Parallel over channels (dw and dbias of a channel have one owner).
template <typename T>
void conv_silu_backward(const ConvArgs<T>& a, const Strided<T>& dy, T* dx, T* dw, T* dbias) {
  using V = Vec<T>;
  constexpr int W = kLanes<T>;
  const int64_t K = a.width, n = a.vectors();
#pragma omp parallel num_threads(team_size(a.channels))
  {
    std::vector<T> p(a.padded_length()), gp(a.padded_length());
    std::vector<V> acc(n), dw_acc(K);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < a.channels; ++c) {
      const T* wc = a.w + c * K;
      std::fill(dw_acc.begin(), dw_acc.end(), V{});
      V db{};
      for (int64_t b = 0; b < a.batch; ++b) {
        a.pad_row(b, c, p.data());
        a.convolve(p.data(), c, acc.data());
        // g = dy * silu'(a), zero past L, into gp with the same padding as p.
        T* g = gp.data() + K - 1;
        std::fill(gp.begin(), gp.end(), T(0));
        const T* dyr = dy.data + b * dy.sb + c * dy.sd;
        for (int64_t i = 0; i < n; ++i) {
          const V s = sigmoid(acc[i]);
          acc[i] = s * (T(1) + acc[i] * (T(1) - s));
        }
        const T* dsilu = reinterpret_cast<const T*>(acc.data());
        for (int64_t l = 0; l < a.len; ++l) g[l] = dyr[l * dy.sl] * dsilu[l];
        for (int64_t i = 0; i < n; ++i) {
          const V gi = load(g + i * W);
          db += gi;
          for (int k = 0; k < K; ++k) dw_acc[k] += gi * load(p.data() + i * W + a.tap(k));
        }
        // x[j] feeds y[l] through tap k at l = j + K - 1 - k (reverse: l = j - K + 1 + k).
        T* dxr = dx + (b * a.channels + c) * a.len;
        for (int64_t i = 0; i < n; ++i) {
          V sum{};
          for (int k = 0; k < K; ++k) {
            const int64_t at = a.reverse ? i * W + k : i * W + 2 * (K - 1) - k;
            sum += wc[k] * load(gp.data() + at);
          }
          acc[i] = sum;
        }
        std::memcpy(dxr, acc.data(), a.len * sizeof(T));
      }
      for (int64_t k = 0; k < K; ++k) {
        T s = T(0);
        for (int j = 0; j < W; ++j) s += dw_acc[k][j];
        dw[c * K + k] = s;
      }
      if (dbias) {
        T s = T(0);
        for (int j = 0; j < W; ++j) s += db[j];
        dbias[c] = s;
      }
    }
  }
}

void check_conv_inputs(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_silu: float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "causal_conv1d_silu: x must be (B, C, L) and weight a contiguous (C, K) tensor of x's dtype");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == x.scalar_type() &&
                        bias->sizes() == at::IntArrayRef({x.size(1)})),
              "causal_conv1d_silu: bias must be a contiguous (C,) tensor of x's dtype");
}

template <typename T>
ConvArgs<T> make_conv_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           bool reverse) {
  return {strided<T>(x), weight.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr,
          x.size(0),     x.size(1),            x.size(2),
          weight.size(1), reverse};
}

Tensor conv_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, bool reverse) {
  check_conv_inputs(x, weight, bias);
  Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_silu_fwd", [&] {
    conv_silu_forward(make_conv_args<scalar_t>(x, weight, bias, reverse), out.data_ptr<scalar_t>());
  });
  return out;
}

// Returns dx, dweight and dbias (empty without bias).
std::vector<Tensor> conv_bwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                             const Tensor& dout, bool reverse) {
  check_conv_inputs(x, weight, bias);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(),
              "causal_conv1d_silu: dout must have x's shape and dtype");
  Tensor dx = at::empty(x.sizes(), x.options()), dw = at::empty_like(weight);
  Tensor db = bias ? at::empty_like(*bias) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_silu_bwd", [&] {
    conv_silu_backward(make_conv_args<scalar_t>(x, weight, bias, reverse), strided<scalar_t>(dout),
                       dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                       bias ? db.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY(mambaxray_ctl, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, bool reverse=False) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor dout, Tensor? dlast, bool reverse=False) -> Tensor[]");
  m.def("causal_conv1d_silu_fwd(Tensor x, Tensor weight, Tensor? bias, bool reverse=False) -> Tensor");
  m.def(
      "causal_conv1d_silu_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, bool reverse=False) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(mambaxray_ctl, CPU, m) {
  m.impl("selective_scan_fwd", &scan_fwd);
  m.impl("selective_scan_bwd", &scan_bwd);
  m.impl("causal_conv1d_silu_fwd", &conv_fwd);
  m.impl("causal_conv1d_silu_bwd", &conv_bwd);
}
