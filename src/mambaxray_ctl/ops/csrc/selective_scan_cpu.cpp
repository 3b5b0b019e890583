// Fused CPU selective scan (mamba-ssm selective_scan_ref semantics), forward and backward.
//
// Shapes: u, delta, z, out: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); state: (B, D, N).
// Per channel (b, d), with dt_l = softplus(delta_l + bias) (or without softplus):
//   h_l = exp(dt_l * A) * h_{l-1} + dt_l * B_l * u_l,   y_l = <C_l, h_l> + D * u_l,   out_l = y_l * silu(z_l)
// The inner loops run over the state index n (vectorised; N = 16 is compiled as a constant so that the
// carried state stays in registers); the per-step scalars (softplus, gate, <C, h> sums) are computed in
// separate passes vectorised over l.
// Forward: one pass per channel; parallel over the B*D channels. With `reverse` the time loop walks L
// backwards (the backward op has no such flag: the Python side flips around it).
// Backward: per channel, the states and decays are recomputed into per-thread L x N buffers, then a
// reverse pass accumulates the gradients. Parallel over d (batch loop inside), so dA, dD and d(delta_bias)
// are owned by one thread; dB and dC (summed over d) go to per-thread (B, L, N) buffers reduced at the end.
// The Python side passes float32 or float64 tensors of one dtype; B and C are made (B, L, N)-contiguous
// here (free when they are transposed views of (B, L, N) tensors, as in Mamba) so that the inner loop over
// n is contiguous; dB and dC are returned as (B, N, L) views of that layout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#define SS_INLINE inline __attribute__((always_inline))

namespace {

using at::Tensor;

template <typename To, typename From>
SS_INLINE To bit_cast(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// exp() from plain arithmetic, so that `#pragma omp simd` loops vectorise it: Cody-Waite reduction
// x = k ln2 + r, |r| <= ln2/2, Taylor polynomial for exp(r) (float: degree 7, double: degree 13;
// truncation error below one ulp) and 2^k applied in two factors, so that results next to the overflow
// and in the denormal range come out right. The clamps are max/min that keep NaN; +-inf give inf / 0.
SS_INLINE float vexp(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa
  const float t = xc * 1.44269504088896341f + magic;
  const float k = t - magic;
  const float r = (xc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // kb = k + 256 in [106, 385]; 2^k = 2^(h - 128) * 2^(kb - h - 128) with h = kb / 2 (unsigned: no UB
  // for the garbage k of a NaN input).
  const uint32_t kb = bit_cast<uint32_t>(t) - bit_cast<uint32_t>(magic) + 256u, h = kb >> 1;
  return p * bit_cast<float>((h - 1u) << 23) * bit_cast<float>((kb - h - 1u) << 23);
}

SS_INLINE double vexp(double x) {
  double xc = x < -746.0 ? -746.0 : x;
  xc = xc > 710.0 ? 710.0 : xc;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double t = xc * 1.4426950408889634074 + magic;
  const double k = t - magic;
  const double r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const uint64_t kb = bit_cast<uint64_t>(t) - bit_cast<uint64_t>(magic) + 2048u, h = kb >> 1;
  return p * bit_cast<double>((h - 1u) << 52) * bit_cast<double>((kb - h - 1u) << 52);
}

// log1p(e) for e in [0, 1] as 2 atanh(e / (2 + e)): an odd series in s = e / (2 + e) <= 1/3 that
// vectorises (float: 7 terms, double: 16 terms; truncation error below one ulp).
SS_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  for (int k = 5; k >= 0; --k) p = p * s2 + 1.0f / static_cast<float>(2 * k + 1);
  return 2.0f * s * p;
}

SS_INLINE double log1p_unit(double e) {
  const double s = e / (2.0 + e), s2 = s * s;
  double p = 1.0 / 31.0;
  for (int k = 14; k >= 0; --k) p = p * s2 + 1.0 / static_cast<double>(2 * k + 1);
  return 2.0 * s * p;
}

template <typename T>
SS_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + vexp(-x));
}

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative, in vectorisable form.
template <typename T>
SS_INLINE T softplus(T x) {
  return x > T(20) ? x : std::max(x, T(0)) + log1p_unit(vexp(-std::abs(x)));
}

template <typename T>
SS_INLINE T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

template <typename T>
struct ScanArgs {
  const T* u;
  const T* delta;
  const T* A;
  const T* Bt;  // (B, L, N)
  const T* Ct;  // (B, L, N)
  const T* D;     // nullable
  const T* z;     // nullable
  const T* bias;  // nullable
  int64_t batch, dim, len, nstate;
  bool softplus;

  int64_t channel(int64_t b, int64_t d) const { return (b * dim + d) * len; }

  // dt_l = softplus(delta_l + bias) (or without softplus) of channel (b, d) into dt[0..L).
  void time_steps(int64_t b, int64_t d, T* dt) const {
    const T* x = delta + channel(b, d);
    const T db = bias ? bias[d] : T(0);
    if (softplus) {
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) dt[l] = ::softplus(x[l] + db);
    } else {
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) dt[l] = x[l] + db;
    }
  }
};

template <typename T>
ScanArgs<T> make_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& Bt,
                      const Tensor& Ct, const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                      const std::optional<Tensor>& bias, bool softplus) {
  return ScanArgs<T>{u.data_ptr<T>(), delta.data_ptr<T>(), A.data_ptr<T>(), Bt.data_ptr<T>(),
                     Ct.data_ptr<T>(), D ? D->data_ptr<T>() : nullptr, z ? z->data_ptr<T>() : nullptr,
                     bias ? bias->data_ptr<T>() : nullptr, u.size(0), u.size(1), u.size(2), A.size(1),
                     softplus};
}

inline int team_size(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work)));
}

// N per-channel values carried across time steps: a local array when N = NS is known at compile time, so
// that the compiler keeps it in vector registers instead of reloading it (store-forwarding latency sits
// on the recurrence's critical path otherwise); a heap buffer when N is only known at run time.
template <typename T, int NS>
struct Carried {
  alignas(64) T fixed[NS > 0 ? NS : 1];
  std::vector<T> dynamic;
  explicit Carried(int64_t n) : dynamic(NS > 0 ? 0 : n) {}
  T* data() {
    if constexpr (NS > 0) {
      return fixed;
    } else {
      return dynamic.data();
    }
  }
};

// out[l] = sum_n P[l * N + n] for l < L. Summing whole rows after the time loop, vectorised over l,
// is several times cheaper than a horizontal vector sum inside every step.
template <typename T, int NS>
SS_INLINE void row_sums(const T* P, T* out, int64_t L, int64_t N) {
  const int64_t n_cols = NS > 0 ? NS : N;
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) {
    T s = T(0);
    for (int64_t n = 0; n < n_cols; ++n) s += P[l * n_cols + n];
    out[l] = s;
  }
}

// NS > 0: the state size N, fixed at compile time (the common N = 16); NS = 0: N = a.nstate.
// reverse: the scan walks l = L-1 .. 0 (same as flipping every input along L, scanning and flipping out
// back); out[l] stays at position l.
template <typename T, int NS>
void forward_kernel(const ScanArgs<T>& a, T* out, T* last_state, bool reverse) {
  const int64_t L = a.len, N = NS > 0 ? NS : a.nstate, channels = a.batch * a.dim;
#pragma omp parallel num_threads(team_size(channels))
  {
    std::vector<T> dt(L), prod(L * N);  // prod[l, n] = C[l, n] * h_l[n]
    Carried<T, NS> h(N);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t b = c / a.dim, d = c % a.dim;
      a.time_steps(b, d, dt.data());
      const T* u = a.u + a.channel(b, d);
      const T* Ad = a.A + d * N;
      const T* Bt = a.Bt + b * L * N;
      const T* Ct = a.Ct + b * L * N;
      T* hp = h.data();
      std::fill(hp, hp + N, T(0));
      for (int64_t step = 0; step < L; ++step) {
        const int64_t l = reverse ? L - 1 - step : step;
        const T dtl = dt[l], dtu = dtl * u[l];
        const T* Bl = Bt + l * N;
        const T* Cl = Ct + l * N;
        T* pl = prod.data() + l * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          hp[n] = vexp(dtl * Ad[n]) * hp[n] + dtu * Bl[n];
          pl[n] = Cl[n] * hp[n];
        }
      }
      T* y = out + a.channel(b, d);
      row_sums<T, NS>(prod.data(), y, L, N);
      const T Dd = a.D ? a.D[d] : T(0);
      if (a.z) {
        const T* z = a.z + a.channel(b, d);
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) y[l] = (y[l] + Dd * u[l]) * z[l] * sigmoid(z[l]);
      } else {
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) y[l] += Dd * u[l];
      }
      std::copy(hp, hp + N, last_state + c * N);
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
void backward_kernel(const ScanArgs<T>& a, const T* dout, const T* dlast, const Grads<T>& g) {
  const int64_t L = a.len, N = NS > 0 ? NS : a.nstate, Bsz = a.batch, LN = L * N;
  const int nthreads = team_size(a.dim);
  std::vector<T> acc(static_cast<size_t>(nthreads) * 2 * Bsz * LN, T(0));  // per thread: dB | dC
#pragma omp parallel num_threads(nthreads)
  {
    T* dB_acc = acc.data() + static_cast<int64_t>(omp_get_thread_num()) * 2 * Bsz * LN;
    T* dC_acc = dB_acc + Bsz * LN;
    std::vector<T> dt(L), y(L), gout(L), dh_B(L), ddt(L);
    std::vector<T> decay(LN), states((L + 1) * N, T(0)), p1(LN), p2(LN);
    Carried<T, NS> h(N), carry(N), dA_d(N);
#pragma omp for schedule(static)
    for (int64_t d = 0; d < a.dim; ++d) {
      const T* Ad = a.A + d * N;
      const T Dd = a.D ? a.D[d] : T(0);
      const T db = a.bias ? a.bias[d] : T(0);
      T dD_d = T(0), dbias_d = T(0);
      T* dAd = dA_d.data();
      std::fill(dAd, dAd + N, T(0));
      for (int64_t b = 0; b < Bsz; ++b) {
        const int64_t ch = a.channel(b, d);
        const T* u = a.u + ch;
        const T* Bt = a.Bt + b * LN;
        const T* Ct = a.Ct + b * LN;
        a.time_steps(b, d, dt.data());
        // Recompute decay[l] = exp(dt_l A), states[l + 1] = h_l (states[0] = h_{-1} = 0) and the products
        // C_l[n] h_l[n] whose row sums are y_l - D u_l (needed for dz).
        T* hp = h.data();
        std::fill(hp, hp + N, T(0));
        for (int64_t l = 0; l < L; ++l) {
          const T dtl = dt[l], dtu = dtl * u[l];
          const T* Bl = Bt + l * N;
          const T* Cl = Ct + l * N;
          T* hl = states.data() + (l + 1) * N;
          T* dec = decay.data() + l * N;
          T* p1l = p1.data() + l * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            dec[n] = vexp(dtl * Ad[n]);
            hp[n] = dec[n] * hp[n] + dtu * Bl[n];
            hl[n] = hp[n];
            p1l[n] = Cl[n] * hp[n];
          }
        }
        // Gradient w.r.t. y (through the gate), and dz, dD.
        const T* dy = dout + ch;
        if (a.z) {
          const T* z = a.z + ch;
          T* dz = g.dz + ch;
          row_sums<T, NS>(p1.data(), y.data(), L, N);
#pragma omp simd reduction(+ : dD_d)
          for (int64_t l = 0; l < L; ++l) {
            const T s = sigmoid(z[l]);
            dz[l] = dy[l] * (y[l] + Dd * u[l]) * s * (T(1) + z[l] * (T(1) - s));
            gout[l] = dy[l] * z[l] * s;
            dD_d += gout[l] * u[l];
          }
        } else {
#pragma omp simd reduction(+ : dD_d)
          for (int64_t l = 0; l < L; ++l) {
            gout[l] = dy[l];
            dD_d += gout[l] * u[l];
          }
        }
        // Reverse pass; carry = exp(dt_{l+1} A) * dh_{l+1}, starting from d(last_state).
        T* cr = carry.data();
        if (dlast) {
          std::copy(dlast + (b * a.dim + d) * N, dlast + (b * a.dim + d) * N + N, cr);
        } else {
          std::fill(cr, cr + N, T(0));
        }
        for (int64_t l = L - 1; l >= 0; --l) {
          const T dtl = dt[l], ul = u[l], go = gout[l], dtu = dtl * ul;
          const T* Bl = Bt + l * N;
          const T* Cl = Ct + l * N;
          const T* hprev = states.data() + l * N;
          const T* hl = states.data() + (l + 1) * N;
          const T* dec = decay.data() + l * N;
          T* dBl = dB_acc + b * LN + l * N;
          T* dCl = dC_acc + b * LN + l * N;
          T* p1l = p1.data() + l * N;
          T* p2l = p2.data() + l * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            const T dh = go * Cl[n] + cr[n];
            const T dlog = dh * hprev[n] * dec[n];  // gradient w.r.t. dt_l * A[n]
            dCl[n] += go * hl[n];
            dBl[n] += dh * dtu;
            dAd[n] += dlog * dtl;
            p1l[n] = dh * Bl[n];
            p2l[n] = dlog * Ad[n];
            cr[n] = dec[n] * dh;
          }
        }
        row_sums<T, NS>(p1.data(), dh_B.data(), L, N);  // sum_n dh_l[n] B_l[n]
        row_sums<T, NS>(p2.data(), ddt.data(), L, N);   // sum_n dlog_l[n] A[n]
        T* du = g.du + ch;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          du[l] = gout[l] * Dd + dt[l] * dh_B[l];
          ddt[l] += dh_B[l] * u[l];
        }
        const T* x = a.delta + ch;
        T* ddelta = g.ddelta + ch;
        if (a.softplus) {
#pragma omp simd reduction(+ : dbias_d)
          for (int64_t l = 0; l < L; ++l) {
            ddelta[l] = ddt[l] * softplus_grad(x[l] + db);
            dbias_d += ddelta[l];
          }
        } else {
#pragma omp simd reduction(+ : dbias_d)
          for (int64_t l = 0; l < L; ++l) {
            ddelta[l] = ddt[l];
            dbias_d += ddelta[l];
          }
        }
      }
      std::copy(dAd, dAd + N, g.dA + d * N);
      if (g.dD) g.dD[d] = dD_d;
      if (g.dbias) g.dbias[d] = dbias_d;
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
// torch.ops.mambaxray_ctl get an error instead of an out-of-bounds read). B and C may have any strides.
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
  expect(u, {batch, dim, len}, true, "u");
  expect(delta, {batch, dim, len}, true, "delta");
  expect(A, {dim, nstate}, true, "A");
  expect(B, {batch, nstate, len}, false, "B");
  expect(C, {batch, nstate, len}, false, "C");
  if (D) expect(*D, {dim}, true, "D");
  if (z) expect(*z, {batch, dim, len}, true, "z");
  if (delta_bias) expect(*delta_bias, {dim}, true, "delta_bias");
}

std::tuple<Tensor, Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                    const Tensor& C, const std::optional<Tensor>& D,
                                    const std::optional<Tensor>& z, const std::optional<Tensor>& delta_bias,
                                    bool delta_softplus, bool reverse) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  const Tensor Bt = B.transpose(1, 2).contiguous(), Ct = C.transpose(1, 2).contiguous();
  Tensor out = at::empty_like(u);
  Tensor last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    const auto args = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus);
    if (A.size(1) == 16) {
      forward_kernel<scalar_t, 16>(args, out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(), reverse);
    } else {
      forward_kernel<scalar_t, 0>(args, out.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(), reverse);
    }
  });
  return {out, last};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, d(delta_bias); the last three are empty when the input is absent.
std::vector<Tensor> scan_bwd(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                             const Tensor& C, const std::optional<Tensor>& D, const std::optional<Tensor>& z,
                             const std::optional<Tensor>& delta_bias, bool delta_softplus, const Tensor& dout,
                             const std::optional<Tensor>& dlast) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  TORCH_CHECK(dout.is_contiguous() && dout.scalar_type() == u.scalar_type() && dout.sizes() == u.sizes(),
              "selective_scan_cpu: dout must be contiguous, of u's dtype and shape");
  TORCH_CHECK(!dlast || (dlast->is_contiguous() && dlast->scalar_type() == u.scalar_type() &&
                         dlast->sizes() == at::IntArrayRef({u.size(0), u.size(1), A.size(1)})),
              "selective_scan_cpu: dlast must be contiguous, of u's dtype and shape (B, D, N)");
  const Tensor Bt = B.transpose(1, 2).contiguous(), Ct = C.transpose(1, 2).contiguous();
  Tensor du = at::empty_like(u), ddelta = at::empty_like(u), dA = at::empty_like(A);
  Tensor dBt = at::empty_like(Bt), dCt = at::empty_like(Ct);
  Tensor dD = D ? at::empty_like(*D) : at::empty({0}, u.options());
  Tensor dz = z ? at::empty_like(*z) : at::empty({0}, u.options());
  Tensor dbias = delta_bias ? at::empty_like(*delta_bias) : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    const Grads<scalar_t> grads{du.data_ptr<scalar_t>(),
                                ddelta.data_ptr<scalar_t>(),
                                dA.data_ptr<scalar_t>(),
                                dBt.data_ptr<scalar_t>(),
                                dCt.data_ptr<scalar_t>(),
                                D ? dD.data_ptr<scalar_t>() : nullptr,
                                z ? dz.data_ptr<scalar_t>() : nullptr,
                                delta_bias ? dbias.data_ptr<scalar_t>() : nullptr};
    const auto args = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus);
    const scalar_t* dlast_ptr = dlast ? dlast->data_ptr<scalar_t>() : nullptr;
    if (A.size(1) == 16) {
      backward_kernel<scalar_t, 16>(args, dout.data_ptr<scalar_t>(), dlast_ptr, grads);
    } else {
      backward_kernel<scalar_t, 0>(args, dout.data_ptr<scalar_t>(), dlast_ptr, grads);
    }
  });
  return {du, ddelta, dA, dBt.transpose(1, 2), dCt.transpose(1, 2), dD, dz, dbias};
}

}  // namespace

TORCH_LIBRARY(mambaxray_ctl, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, bool reverse=False) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor dout, Tensor? dlast) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mambaxray_ctl, CPU, m) {
  m.impl("selective_scan_fwd", &scan_fwd);
  m.impl("selective_scan_bwd", &scan_bwd);
}
