// The passes of neighborhood_aggregate (any2point_fast.torch_ops.aggregation) that touch the
// [rows, 2C] neighbour rows, on the CPU (loaded by any2point_fast.torch_ops.native). A tile of
// centres (its tile·k rows) at a time lives in per-thread buffers held in cache, so no
// [B·S·k, 2C] tensor is ever made:
//   aggregate_hidden(fa, fb, off, nbr, ctr, w1, divisors, beta, tile) -> (h, mean, var)
//       h = W1 PE(o) + fa[n] + fb[c]  [CS, k, H], and the float64 mean and biased variance of h;
//   aggregate_moments(h, scale1, shift1, tile, runs) -> float64 Σ a [H], Σ (a − ā)(a − ā)ᵀ [H, H]
//       of a = relu(h·scale1 + shift1) (BN2's statistics are W2's products with them);
//   aggregate_max(h, scale1, shift1, w2, scale2, shift2, f, off, nbr, ctr, divisors, beta, tile)
//       -> (out, arg, y_at_max): v = relu(x + y·scale2 + shift2), y = W2 relu(h·scale1 + shift1),
//       x = cat(f[n], f[c]) + PE(o); its maximum over the k [CS, 2C], the neighbour holding it
//       (the first; a NaN wins) and y there;
//   aggregate_hidden_grad(h, scale1, shift1, mean1, arg, du, w2s, cross, da_shift, tile, runs)
//       -> (dz, Σ du aᵀ [2C, H], Σ dz [H], Σ dz·(h − mean1) [H]): dz = [a > 0]·da,
//       da = da_shift − a·cross (cross empty: no such term) plus du·w2s at each argmax row;
//   aggregate_position_grad(dz, h, scale1, slope1, shift1, off, nbr, ctr, points, divisors, slopes, beta, w1,
//                           arg, du, offsets_grad, tile, runs)
//       -> (Σ dh per neighbour point [points, H], Σ dh per centre point [points, H], Σ dhᵀ PE [H, 2C],
//       the offsets' gradient [CS, k, 3] or an empty tensor), dh = scale1·dz − slope1·h + shift1 (BN1).
// f, fa, fb are per point ([B·P, C], [B·P, H]); nbr [CS, k] and ctr [CS] hold flat point rows.
// Values are float or double; the position code is formed in float32 whatever (the reference's
// angles bit for bit, see position_code). Products of a tile go to BLAS (one thread per call);
// threads claim tiles (or runs) as they come free; reductions over tiles are summed per run of
// tiles (`runs` fixed), then run after run: the same bits whatever the thread count.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

extern "C" {
// BLAS (column-major), as torch links it; weak, so that a torch without it fails at the call only.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace {

using at::Tensor;

// Row-major c[m, n] = alpha·op(a)·op(b) + beta·c, op(a) [m, kk] (a transposed when ta), op(b) [kk, n].
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t kk, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // column-major: cᵀ = op(b)ᵀ op(a)ᵀ, a row-major matrix read column-major being its transpose
  const char transb = tb ? 'T' : 'N', transa = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(kk);
  const int ilda = static_cast<int>(std::max<int64_t>(ldb, 1)), ildb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    TORCH_CHECK(sgemm_ != nullptr, "aggregate: this torch exports no BLAS sgemm_");
    sgemm_(&transb, &transa, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  } else {
    TORCH_CHECK(dgemm_ != nullptr, "aggregate: this torch exports no BLAS dgemm_");
    dgemm_(&transb, &transa, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  }
}

// A thread's scratch [size] of T, from ATen's allocator (memory profiles see it).
template <typename T>
struct Scratch {
  at::Tensor tensor;
  T* ptr;
  explicit Scratch(int64_t size) : tensor(any2point::scratch<T>(size)), ptr(tensor.data_ptr<T>()) {}
  T* data() const { return ptr; }
  T& operator[](int64_t i) const { return ptr[i]; }
};

// sin x and cos x in float32, vectorisable: x reduced by π/2 in three parts (exact products for
// |x| < 2^15), Cephes' polynomials on [−π/4, π/4]; within an ulp or so of ATen's.
inline void sin_cos(float x, float& s, float& c) {
  const float n = (x * 0.636619772367581f + 12582912.0f) - 12582912.0f;  // 1.5·2^23: rounds to an integer
  float r = std::fma(n, -1.5703125f, x);
  r = std::fma(n, -4.837512969970703125e-4f, r);
  r = std::fma(n, -7.54978995489188216e-8f, r);
  const float r2 = r * r;
  float ps = std::fma(r2, -1.9515295891e-4f, 8.3321608736e-3f);
  ps = std::fma(r2, ps, -1.6666654611e-1f);
  ps = std::fma(r2 * r, ps, r);
  float pc = std::fma(r2, 2.443315711809948e-5f, -1.388731625493765e-3f);
  pc = std::fma(r2, pc, 4.166664568298827e-2f);
  pc = std::fma(r2 * r2, pc, std::fma(r2, -0.5f, 1.0f));
  const int32_t q = static_cast<int32_t>(n);
  const float sw = (q & 1) ? pc : ps, cw = (q & 1) ? ps : pc;
  s = (q & 2) ? -sw : sw;
  c = ((q + 1) & 2) ? -cw : cw;
}

// code[r, 2e] = sin, code[r, 2e + 1] = cos of angle e = (axis, frequency) of row r, cut to dim:
// the angles in float32 as the reference forms them, (beta·x) / divisor, bit for bit; their sine
// and cosine by sin_cos for float, and ATen's float32 ones for double (the reference's code to
// the bit, which float64 is compared with). buf: code_scratch<T>(rows, freqs) floats.
template <typename T>
constexpr int64_t code_scratch(int64_t rows, int64_t freqs) {
  return (std::is_same_v<T, float> ? 3 : 9) * rows * freqs;
}

template <typename T>
void position_code(const T* off, int64_t rows, const float* divisors, int64_t freqs, float beta, int64_t dim,
                   float* buf, T* code) {
  const int64_t width = 3 * freqs, n = rows * width;
  float* angle = buf;
  for (int64_t e = 0; e < rows * 3; ++e) {
    const float bx = beta * static_cast<float>(off[e]);
#pragma omp simd
    for (int64_t i = 0; i < freqs; ++i) angle[e * freqs + i] = bx / divisors[i];
  }
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t r = 0; r < rows; ++r) {
      T* row = code + r * dim;
      const float* a = angle + r * width;
#pragma omp simd
      for (int64_t e = 0; e < dim / 2; ++e) {
        float s, c;
        sin_cos(a[e], s, c);
        row[2 * e] = s;
        row[2 * e + 1] = c;
      }
    }
  } else {
    float* sine = angle + n;
    float* cosine = sine + n;
    const Tensor angles = at::from_blob(angle, {n}, at::TensorOptions().dtype(at::kFloat));
    Tensor sines = at::from_blob(sine, {n}, angles.options()), cosines = at::from_blob(cosine, {n}, angles.options());
    at::sin_out(sines, angles);
    at::cos_out(cosines, angles);
    for (int64_t r = 0; r < rows; ++r) {
      T* row = code + r * dim;
#pragma omp simd
      for (int64_t e = 0; e < dim / 2; ++e) {
        row[2 * e] = sine[r * width + e];
        row[2 * e + 1] = cosine[r * width + e];
      }
    }
  }
}

// Rows gathered at random from [points, ·] tensors miss the cache: their loads are asked for this
// many rows ahead.
constexpr int64_t kAhead = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t size, int write = 0) {
  for (int64_t i = 0; i < size; i += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + i, write);
}

// Tiles of `tile` centres (the last one shorter).
struct Tiling {
  int64_t centres, tile, count;
  Tiling(int64_t centres, int64_t tile) : centres(centres), tile(tile) {
    TORCH_CHECK(tile > 0, "aggregate: a tile of at least one centre");
    count = (centres + tile - 1) / tile;
  }
  int64_t first(int64_t t) const { return t * tile; }
  int64_t size(int64_t t) const { return std::min(centres, (t + 1) * tile) - t * tile; }
};

// Calls body(claim) once per thread, claim() giving the next item to do (count or more: none
// left): a thread takes work whenever it is free, since on a busy machine threads run unevenly.
template <typename Body>
void claimed(Body body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { body([&] { return next.fetch_add(1); }); });
}

// The tiles [first, end) of run `run` of `runs`: a fixed partition, whatever the threads.
inline std::pair<int64_t, int64_t> run_tiles(int64_t tiles, int64_t run, int64_t runs) {
  return {tiles * run / runs, tiles * (run + 1) / runs};
}

// The sum of the runs' partial results [runs, ...], run after run.
Tensor sum_runs(const Tensor& parts) {
  Tensor total = parts[0].clone();
  for (int64_t run = 1; run < parts.size(0); ++run) total.add_(parts[run]);
  return total;
}

// a = relu(h·scale + shift) of `n` rows [n, H].
template <typename T>
void activation(const T* h, int64_t n, int64_t hidden, const T* scale, const T* shift, T* a) {
  for (int64_t r = 0; r < n; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const T v = h[r * hidden + j] * scale[j] + shift[j];
      a[r * hidden + j] = v < T(0) ? T(0) : v;
    }
  }
}

struct Shapes {
  int64_t centres, k, hidden, dim, channels, freqs;
};

Shapes shapes_of(const Tensor& off, const Tensor& divisors, int64_t hidden, int64_t dim) {
  TORCH_CHECK(off.dim() == 3 && off.size(2) == 3 && off.is_contiguous() && off.device().is_cpu(),
              "aggregate: contiguous CPU offsets [CS, k, 3]");
  TORCH_CHECK(divisors.dim() == 1 && divisors.scalar_type() == at::kFloat && divisors.is_contiguous() &&
                  6 * divisors.size(0) >= dim,
              "aggregate: float32 divisors [ceil(2C / 6)]");
  TORCH_CHECK(dim % 2 == 0, "aggregate: an even row width 2C");
  return {off.size(0), off.size(1), hidden, dim, dim / 2, divisors.size(0)};
}

void check_rows(const Tensor& off, const Tensor& nbr, const Tensor& ctr) {
  TORCH_CHECK(nbr.dim() == 2 && nbr.scalar_type() == at::kLong && nbr.is_contiguous() &&
                  nbr.sizes() == off.sizes().slice(0, 2),
              "aggregate: int64 contiguous neighbour rows [CS, k]");
  TORCH_CHECK(ctr.dim() == 1 && ctr.scalar_type() == at::kLong && ctr.is_contiguous() && ctr.size(0) == off.size(0),
              "aggregate: int64 contiguous centre rows [CS]");
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> hidden_impl(const Tensor& fa, const Tensor& fb, const Tensor& off,
                                               const Tensor& nbr, const Tensor& ctr, const Tensor& w1,
                                               const Tensor& divisors, double beta, int64_t tile) {
  const int64_t hidden = w1.size(0);
  const Shapes s = shapes_of(off, divisors, hidden, w1.size(1));
  check_rows(off, nbr, ctr);
  any2point::check_values(off, {&fa, &fb, &w1});
  const Tiling tiling(s.centres, tile);
  Tensor h = at::empty({s.centres, s.k, hidden}, off.options());
  Tensor tile_sum = at::zeros({tiling.count, hidden}, off.options().dtype(at::kDouble));
  Tensor tile_m2 = at::zeros({tiling.count, hidden}, off.options().dtype(at::kDouble));
  const T *pa = fa.data_ptr<T>(), *pb = fb.data_ptr<T>(), *po = off.data_ptr<T>(), *pw = w1.data_ptr<T>();
  const int64_t *pn = nbr.data_ptr<int64_t>(), *pc = ctr.data_ptr<int64_t>();
  const float* pd = divisors.data_ptr<float>();
  T* ph = h.data_ptr<T>();
  double *psum = tile_sum.data_ptr<double>(), *pm2 = tile_m2.data_ptr<double>();
  claimed([&](auto claim) {
    Scratch<float> buf(code_scratch<T>(tiling.tile * s.k, s.freqs));
    Scratch<T> code(tiling.tile * s.k * s.dim);
    std::vector<T> part(2 * hidden), centre(hidden);
    for (int64_t t = claim(); t < tiling.count; t = claim()) {
      const int64_t c0 = tiling.first(t), rows = tiling.size(t) * s.k, r0 = c0 * s.k;
      T* ht = ph + r0 * hidden;
      for (int64_t r = 0; r < rows; ++r) {
        if (r + kAhead < rows) prefetch_row(pa + pn[r0 + r + kAhead] * hidden, hidden);
        const T* na = pa + pn[r0 + r] * hidden;
        const T* cb = pb + pc[c0 + r / s.k] * hidden;
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) ht[r * hidden + j] = na[j] + cb[j];
      }
      position_code(po + r0 * 3, rows, pd, s.freqs, static_cast<float>(beta), s.dim, buf.data(), code.data());
      gemm<T>(false, true, rows, hidden, s.dim, T(1), code.data(), s.dim, pw, s.dim, T(1), ht, hidden);
      // the tile's sum and centred second moment (about its mean rounded to T, then corrected),
      // merged below tile after tile (Chan); sums over the tile in T (vector loops)
      std::fill(part.begin(), part.end(), T(0));
      for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) part[j] += ht[r * hidden + j];
      }
      for (int64_t j = 0; j < hidden; ++j) centre[j] = static_cast<T>(static_cast<double>(part[j]) / rows);
      for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) {
          const T d = ht[r * hidden + j] - centre[j];
          part[hidden + j] += d * d;
        }
      }
      for (int64_t j = 0; j < hidden; ++j) {
        const double shift = static_cast<double>(part[j]) / rows - centre[j];
        psum[t * hidden + j] = part[j];
        pm2[t * hidden + j] = std::max(0.0, part[hidden + j] - rows * shift * shift);
      }
    }
  });
  Tensor mean = at::zeros({hidden}, tile_sum.options()), var = at::zeros({hidden}, tile_sum.options());
  double *pmean = mean.data_ptr<double>(), *pvar = var.data_ptr<double>();
  double count = 0;
  for (int64_t t = 0; t < tiling.count; ++t) {
    const double size = static_cast<double>(tiling.size(t) * s.k);
    for (int64_t j = 0; j < hidden; ++j) {
      const double part_mean = psum[t * hidden + j] / size, delta = part_mean - pmean[j];
      pvar[j] += pm2[t * hidden + j] + delta * delta * count * size / (count + size);
      pmean[j] += delta * size / (count + size);
    }
    count += size;
  }
  var.div_(std::max(count, 1.0));
  return {h, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> aggregate_hidden(const Tensor& fa, const Tensor& fb, const Tensor& off,
                                                    const Tensor& nbr, const Tensor& ctr, const Tensor& w1,
                                                    const Tensor& divisors, double beta, int64_t tile) {
  if (off.scalar_type() == at::kDouble) return hidden_impl<double>(fa, fb, off, nbr, ctr, w1, divisors, beta, tile);
  TORCH_CHECK(off.scalar_type() == at::kFloat, "aggregate: float32 or float64 values");
  return hidden_impl<float>(fa, fb, off, nbr, ctr, w1, divisors, beta, tile);
}

// Merges the moments (count_b, mean_b [H], spread_b [H, H]) of a set of rows into (count, mean,
// spread) of another (Chan's pairwise update of centred moments).
inline void merge_moments(double& count, double* mean, double* spread, double count_b, const double* mean_b,
                          const double* spread_b, int64_t hidden) {
  const double total = count + count_b, weight = count * count_b / std::max(total, 1.0);
  std::vector<double> delta(hidden);
  for (int64_t i = 0; i < hidden; ++i) delta[i] = mean_b[i] - mean[i];
  for (int64_t i = 0; i < hidden; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j)
      spread[i * hidden + j] += spread_b[i * hidden + j] + weight * delta[i] * delta[j];
    mean[i] += delta[i] * count_b / std::max(total, 1.0);
  }
  count = total;
}

template <typename T>
std::tuple<Tensor, Tensor> moments_impl(const Tensor& h, const Tensor& scale1, const Tensor& shift1, int64_t tile,
                                        int64_t runs) {
  TORCH_CHECK(h.dim() == 3 && runs > 0, "aggregate_moments: h [CS, k, H]");
  any2point::check_values(h, {&scale1, &shift1});
  const int64_t k = h.size(1), hidden = h.size(2);
  const Tiling tiling(h.size(0), tile);
  const auto wide = h.options().dtype(at::kDouble);
  Tensor counts = at::zeros({runs}, wide), means = at::zeros({runs, hidden}, wide);
  Tensor spreads = at::zeros({runs, hidden, hidden}, wide);
  const T *ph = h.data_ptr<T>(), *ps = scale1.data_ptr<T>(), *pt = shift1.data_ptr<T>();
  double *pcount = counts.data_ptr<double>(), *pmean = means.data_ptr<double>(), *pspread = spreads.data_ptr<double>();
  claimed([&](auto claim) {
    Scratch<T> a(tiling.tile * k * hidden);
    Scratch<double> centred(tiling.tile * k * hidden), spread(hidden * hidden);
    std::vector<double> mean(hidden);
    for (int64_t run = claim(); run < runs; run = claim()) {
      const auto [first, last] = run_tiles(tiling.count, run, runs);
      for (int64_t t = first; t < last; ++t) {
        const int64_t rows = tiling.size(t) * k;
        activation(ph + tiling.first(t) * k * hidden, rows, hidden, ps, pt, a.data());
        std::fill(mean.begin(), mean.end(), 0.0);
        for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
          for (int64_t j = 0; j < hidden; ++j) mean[j] += a[r * hidden + j];
        }
        for (int64_t j = 0; j < hidden; ++j) mean[j] /= rows;
        for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
          for (int64_t j = 0; j < hidden; ++j) centred[r * hidden + j] = a[r * hidden + j] - mean[j];
        }
        gemm<double>(true, false, hidden, hidden, rows, 1.0, centred.data(), hidden, centred.data(), hidden, 0.0,
                     spread.data(), hidden);
        merge_moments(pcount[run], pmean + run * hidden, pspread + run * hidden * hidden, rows, mean.data(),
                      spread.data(), hidden);
      }
    }
  });
  for (int64_t run = 1; run < runs; ++run)
    merge_moments(pcount[0], pmean, pspread, pcount[run], pmean + run * hidden, pspread + run * hidden * hidden,
                  hidden);
  return {means[0].mul(pcount[0]), spreads[0].clone()};
}

// Σ a [H] and Σ (a − ā)(a − ā)ᵀ [H, H] in float64 of a = relu(h·scale1 + shift1) over every row of h.
std::tuple<Tensor, Tensor> aggregate_moments(const Tensor& h, const Tensor& scale1, const Tensor& shift1,
                                             int64_t tile, int64_t runs) {
  if (h.scalar_type() == at::kDouble) return moments_impl<double>(h, scale1, shift1, tile, runs);
  TORCH_CHECK(h.scalar_type() == at::kFloat, "aggregate: float32 or float64 values");
  return moments_impl<float>(h, scale1, shift1, tile, runs);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> max_impl(const Tensor& h, const Tensor& scale1, const Tensor& shift1,
                                            const Tensor& w2, const Tensor& scale2, const Tensor& shift2,
                                            const Tensor& f, const Tensor& off, const Tensor& nbr, const Tensor& ctr,
                                            const Tensor& divisors, double beta, int64_t tile) {
  const int64_t hidden = w2.size(1);
  const Shapes s = shapes_of(off, divisors, hidden, w2.size(0));
  check_rows(off, nbr, ctr);
  any2point::check_values(off, {&h, &scale1, &shift1, &w2, &scale2, &shift2, &f});
  TORCH_CHECK(h.numel() == s.centres * s.k * hidden && f.size(-1) == s.channels, "aggregate_max: shapes");
  const Tiling tiling(s.centres, tile);
  Tensor out = at::empty({s.centres, s.dim}, off.options());
  Tensor arg = at::empty({s.centres, s.dim}, off.options().dtype(at::kLong));
  Tensor at_max = at::empty({s.centres, s.dim}, off.options());
  const T *ph = h.data_ptr<T>(), *ps1 = scale1.data_ptr<T>(), *pt1 = shift1.data_ptr<T>(), *pw = w2.data_ptr<T>();
  const T *ps2 = scale2.data_ptr<T>(), *pt2 = shift2.data_ptr<T>(), *pf = f.data_ptr<T>(), *po = off.data_ptr<T>();
  const int64_t *pn = nbr.data_ptr<int64_t>(), *pc = ctr.data_ptr<int64_t>();
  const float* pd = divisors.data_ptr<float>();
  T *pout = out.data_ptr<T>(), *pym = at_max.data_ptr<T>();
  int64_t* parg = arg.data_ptr<int64_t>();
  const int64_t dim = s.dim, half = s.channels, lanes = any2point::kLanes<T>;
  claimed([&](auto claim) {
    Scratch<float> buf(code_scratch<T>(tiling.tile * s.k, s.freqs));
    Scratch<T> a(tiling.tile * s.k * hidden), y(tiling.tile * s.k * dim), code(tiling.tile * s.k * dim);
    for (int64_t t = claim(); t < tiling.count; t = claim()) {
      const int64_t c0 = tiling.first(t), rows = tiling.size(t) * s.k, r0 = c0 * s.k;
      activation(ph + r0 * hidden, rows, hidden, ps1, pt1, a.data());
      gemm<T>(false, true, rows, dim, hidden, T(1), a.data(), hidden, pw, hidden, T(0), y.data(), dim);
      position_code(po + r0 * 3, rows, pd, s.freqs, static_cast<float>(beta), dim, buf.data(), code.data());
      // the residual x = PE + cat(f[n], f[c]) in place of the code, a row at a time (the gathers
      // stream, rather than stall the loop below)
      for (int64_t r = 0; r < rows; ++r) {
        if (r + kAhead < rows) prefetch_row(pf + pn[r0 + r + kAhead] * half, half);
        T* x = code.data() + r * dim;
        const T* fn = pf + pn[r0 + r] * half;
        const T* fc = pf + pc[c0 + r / s.k] * half;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          x[d] += fn[d];
          x[half + d] += fc[d];
        }
      }
      for (int64_t c = c0; c < c0 + tiling.size(t); ++c) {
        const int64_t base = (c - c0) * s.k;
        // channels [d, d + lanes of V) of centre c, V a vector or a scalar: v = relu(shift2 +
        // y·scale2 + x) of every neighbour, its first maximum (or first NaN) held in registers with
        // y and the neighbour there
        auto pool = [&](auto zero, int64_t d) {
          using V = decltype(zero);
          const V scale = any2point::load_as<V>(ps2 + d), shift = any2point::load_as<V>(pt2 + d);
          V best = zero - std::numeric_limits<T>::infinity(), y_best = zero, which = zero;
          for (int64_t j = 0; j < s.k; ++j) {
            const int64_t r = base + j;
            const V yr = any2point::load_as<V>(y.data() + r * dim + d);
            V v = shift + yr * scale + any2point::load_as<V>(code.data() + r * dim + d);
            v = v < zero ? zero : v;
            const auto take = (v > best) | ((v != v) & (best == best));
            best = take ? v : best;
            y_best = take ? yr : y_best;
            which = take ? zero + T(j) : which;
          }
          any2point::store_as(pout + c * dim + d, best);
          any2point::store_as(pym + c * dim + d, y_best);
          T index[sizeof(V) / sizeof(T)];
          std::memcpy(index, &which, sizeof(V));
          for (int64_t l = 0; l < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++l)
            parg[c * dim + d + l] = static_cast<int64_t>(index[l]);
        };
        int64_t d = 0;
        for (; d + lanes <= dim; d += lanes) pool(any2point::Vec<T>{}, d);
        for (; d < dim; ++d) pool(T(0), d);
      }
    }
  });
  return {out, arg, at_max};
}

std::tuple<Tensor, Tensor, Tensor> aggregate_max(const Tensor& h, const Tensor& scale1, const Tensor& shift1,
                                                 const Tensor& w2, const Tensor& scale2, const Tensor& shift2,
                                                 const Tensor& f, const Tensor& off, const Tensor& nbr,
                                                 const Tensor& ctr, const Tensor& divisors, double beta, int64_t tile) {
  if (off.scalar_type() == at::kDouble)
    return max_impl<double>(h, scale1, shift1, w2, scale2, shift2, f, off, nbr, ctr, divisors, beta, tile);
  TORCH_CHECK(off.scalar_type() == at::kFloat, "aggregate: float32 or float64 values");
  return max_impl<float>(h, scale1, shift1, w2, scale2, shift2, f, off, nbr, ctr, divisors, beta, tile);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> hidden_grad_impl(const Tensor& h, const Tensor& scale1,
                                                            const Tensor& shift1, const Tensor& mean1,
                                                            const Tensor& arg, const Tensor& du, const Tensor& w2s,
                                                            const Tensor& cross, const Tensor& da_shift,
                                                            int64_t tile, int64_t runs) {
  TORCH_CHECK(h.dim() == 3 && arg.dim() == 2 && arg.scalar_type() == at::kLong && arg.is_contiguous(),
              "aggregate_hidden_grad: h [CS, k, H], int64 arg [CS, 2C]");
  const int64_t centres = h.size(0), k = h.size(1), hidden = h.size(2), dim = arg.size(1);
  const bool training = cross.numel() > 0;
  any2point::check_values(h, {&scale1, &shift1, &mean1, &du, &w2s, &cross, &da_shift});
  TORCH_CHECK(runs > 0 && du.sizes() == arg.sizes() && w2s.size(0) == dim && w2s.size(1) == hidden,
              "aggregate_hidden_grad: shapes");
  const Tiling tiling(centres, tile);
  Tensor dz = at::empty_like(h);
  Tensor du_a = at::zeros({runs, dim, hidden}, h.options());
  Tensor sums = at::zeros({runs, 2, hidden}, h.options().dtype(at::kDouble));
  const T *ph = h.data_ptr<T>(), *ps1 = scale1.data_ptr<T>(), *pt1 = shift1.data_ptr<T>(), *pm = mean1.data_ptr<T>();
  const T *pdu = du.data_ptr<T>(), *pw = w2s.data_ptr<T>(), *pshift = da_shift.data_ptr<T>();
  const T* pcross = training ? cross.data_ptr<T>() : nullptr;
  const int64_t* parg = arg.data_ptr<int64_t>();
  T *pdz = dz.data_ptr<T>(), *pdua = du_a.data_ptr<T>();
  double* psums = sums.data_ptr<double>();
  claimed([&](auto claim) {
    Scratch<T> a(tiling.tile * k * hidden);
    std::vector<T> tile_sums(2 * hidden);
    for (int64_t run = claim(); run < runs; run = claim()) {
      const auto [first, last] = run_tiles(tiling.count, run, runs);
      T* dua = pdua + run * dim * hidden;
      double* bias_sum = psums + run * 2 * hidden;
      double* weight_sum = bias_sum + hidden;
      for (int64_t t = first; t < last; ++t) {
        const int64_t c0 = tiling.first(t), rows = tiling.size(t) * k, r0 = c0 * k;
        const T* ht = ph + r0 * hidden;
        T* da = pdz + r0 * hidden;
        activation(ht, rows, hidden, ps1, pt1, a.data());
        if (training) {
          gemm<T>(false, false, rows, hidden, hidden, T(-1), a.data(), hidden, pcross, hidden, T(0), da, hidden);
        } else {
          std::fill(da, da + rows * hidden, T(0));
        }
        for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
          for (int64_t j = 0; j < hidden; ++j) da[r * hidden + j] += pshift[j];
        }
        // the sparse terms: each channel's gradient enters at its maximum's row only
        for (int64_t c = c0; c < c0 + tiling.size(t); ++c) {
          for (int64_t d = 0; d < dim; ++d) {
            const T g = pdu[c * dim + d];
            if (g == T(0)) continue;
            const int64_t r = (c - c0) * k + parg[c * dim + d];
            const T* wd = pw + d * hidden;
            const T* ar = a.data() + r * hidden;
            T* dar = da + r * hidden;
            T* ud = dua + d * hidden;
#pragma omp simd
            for (int64_t j = 0; j < hidden; ++j) {
              dar[j] += g * wd[j];
              ud[j] += g * ar[j];
            }
          }
        }
        // BN1's sums, the tile's in T (a vector loop), the run's in float64
        std::fill(tile_sums.begin(), tile_sums.end(), T(0));
        T* tile_bias = tile_sums.data();
        T* tile_weight = tile_bias + hidden;
        for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
          for (int64_t j = 0; j < hidden; ++j) {
            const T v = a[r * hidden + j] > T(0) ? da[r * hidden + j] : T(0);
            da[r * hidden + j] = v;
            tile_bias[j] += v;
            tile_weight[j] += v * (ht[r * hidden + j] - pm[j]);
          }
        }
        for (int64_t j = 0; j < hidden; ++j) {
          bias_sum[j] += tile_bias[j];
          weight_sum[j] += tile_weight[j];
        }
      }
    }
  });
  const Tensor total = sum_runs(sums);
  return {dz, sum_runs(du_a), total[0].to(h.scalar_type()), total[1].to(h.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> aggregate_hidden_grad(const Tensor& h, const Tensor& scale1,
                                                                 const Tensor& shift1, const Tensor& mean1,
                                                                 const Tensor& arg, const Tensor& du,
                                                                 const Tensor& w2s, const Tensor& cross,
                                                                 const Tensor& da_shift, int64_t tile, int64_t runs) {
  if (h.scalar_type() == at::kDouble)
    return hidden_grad_impl<double>(h, scale1, shift1, mean1, arg, du, w2s, cross, da_shift, tile, runs);
  TORCH_CHECK(h.scalar_type() == at::kFloat, "aggregate: float32 or float64 values");
  return hidden_grad_impl<float>(h, scale1, shift1, mean1, arg, du, w2s, cross, da_shift, tile, runs);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> position_grad_impl(
    const Tensor& dz, const Tensor& h, const Tensor& scale1, const Tensor& slope1, const Tensor& shift1,
    const Tensor& off, const Tensor& nbr, const Tensor& ctr, int64_t points, const Tensor& divisors,
    const Tensor& slopes, double beta, const Tensor& w1, const Tensor& arg, const Tensor& du, bool offsets_grad,
    int64_t tile, int64_t runs) {
  const int64_t hidden = w1.size(0);
  const Shapes s = shapes_of(off, divisors, hidden, w1.size(1));
  check_rows(off, nbr, ctr);
  any2point::check_values(off, {&dz, &h, &scale1, &slope1, &shift1, &w1, &du});
  TORCH_CHECK(runs > 0 && dz.numel() == s.centres * s.k * hidden && h.numel() == dz.numel() &&
                  slopes.scalar_type() == at::kFloat && slopes.numel() == s.freqs && arg.scalar_type() == at::kLong &&
                  arg.sizes() == du.sizes() && arg.is_contiguous(),
              "aggregate_position_grad: shapes");
  const Tiling tiling(s.centres, tile);
  const int64_t dim = s.dim, k = s.k;
  Tensor grad_w1 = at::zeros({runs, hidden, dim}, off.options());
  Tensor per_nbr = at::zeros({runs, points, hidden}, off.options()), per_ctr = at::zeros_like(per_nbr);
  Tensor grad_off = offsets_grad ? at::empty_like(off) : at::empty({0}, off.options());
  const T *pdz = dz.data_ptr<T>(), *ph = h.data_ptr<T>(), *ps = scale1.data_ptr<T>(), *pl = slope1.data_ptr<T>();
  const T *pt = shift1.data_ptr<T>(), *po = off.data_ptr<T>(), *pw = w1.data_ptr<T>(), *pdu = du.data_ptr<T>();
  const int64_t *pn = nbr.data_ptr<int64_t>(), *pc = ctr.data_ptr<int64_t>(), *parg = arg.data_ptr<int64_t>();
  const float *pd = divisors.data_ptr<float>(), *pslope = slopes.data_ptr<float>();
  T *pgw = grad_w1.data_ptr<T>(), *ppn = per_nbr.data_ptr<T>(), *ppc = per_ctr.data_ptr<T>();
  T* pgo = offsets_grad ? grad_off.data_ptr<T>() : nullptr;
  claimed([&](auto claim) {
    Scratch<float> buf(code_scratch<T>(tiling.tile * k, s.freqs));
    Scratch<T> dh(tiling.tile * k * hidden), code(tiling.tile * k * dim), dx(offsets_grad ? tiling.tile * k * dim : 0);
    std::vector<float> d_angle(offsets_grad ? s.freqs : 0);
    for (int64_t run = claim(); run < runs; run = claim()) {
      const auto [first, last] = run_tiles(tiling.count, run, runs);
      T* nbr_sum = ppn + run * points * hidden;
      T* ctr_sum = ppc + run * points * hidden;
      for (int64_t t = first; t < last; ++t) {
        const int64_t c0 = tiling.first(t), rows = tiling.size(t) * k, r0 = c0 * k;
        // dh = (scale1·dz − slope1·h) + shift1, and its sums per neighbour point and per centre point
        for (int64_t r = 0; r < rows; ++r) {
          if (r + kAhead < rows) prefetch_row(nbr_sum + pn[r0 + r + kAhead] * hidden, hidden, 1);
          const T* dzr = pdz + (r0 + r) * hidden;
          const T* hr = ph + (r0 + r) * hidden;
          T* dhr = dh.data() + r * hidden;
          T* to_nbr = nbr_sum + pn[r0 + r] * hidden;
          T* to_ctr = ctr_sum + pc[c0 + r / k] * hidden;
#pragma omp simd
          for (int64_t j = 0; j < hidden; ++j) {
            dhr[j] = (dzr[j] * ps[j] + hr[j] * -pl[j]) + pt[j];
            to_nbr[j] += dhr[j];
            to_ctr[j] += dhr[j];
          }
        }
        position_code(po + r0 * 3, rows, pd, s.freqs, static_cast<float>(beta), dim, buf.data(), code.data());
        gemm<T>(true, false, hidden, dim, rows, T(1), dh.data(), hidden, code.data(), dim, T(1),
                pgw + run * hidden * dim, dim);
        if (!offsets_grad) continue;
        // the rows' gradient dx = dh·W1 plus, at each maximum, the output's (the residual)
        gemm<T>(false, false, rows, dim, hidden, T(1), dh.data(), hidden, pw, dim, T(0), dx.data(), dim);
        for (int64_t c = c0; c < c0 + tiling.size(t); ++c)
          for (int64_t d = 0; d < dim; ++d) dx[((c - c0) * k + parg[c * dim + d]) * dim + d] += pdu[c * dim + d];
        for (int64_t r = 0; r < rows; ++r) {
          const T* g = dx.data() + r * dim;
          const T* sc = code.data() + r * dim;  // sine at 2e, cosine at 2e + 1 (angles e ≥ dim / 2: cut)
          for (int64_t axis = 0; axis < 3; ++axis) {
            const int64_t first = axis * s.freqs, count = std::clamp<int64_t>(dim / 2 - first, 0, s.freqs);
#pragma omp simd
            for (int64_t i = 0; i < count; ++i) {
              const int64_t e = first + i;
              d_angle[i] = (static_cast<float>(g[2 * e]) * static_cast<float>(sc[2 * e + 1]) -
                            static_cast<float>(g[2 * e + 1]) * static_cast<float>(sc[2 * e])) *
                           pslope[i];
            }
            float sum = 0.f;
            for (int64_t i = 0; i < count; ++i) sum += d_angle[i];
            pgo[(r0 + r) * 3 + axis] = static_cast<T>(sum);
          }
        }
      }
    }
  });
  return {sum_runs(per_nbr), sum_runs(per_ctr), sum_runs(grad_w1), grad_off};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> aggregate_position_grad(
    const Tensor& dz, const Tensor& h, const Tensor& scale1, const Tensor& slope1, const Tensor& shift1,
    const Tensor& off, const Tensor& nbr, const Tensor& ctr, int64_t points, const Tensor& divisors,
    const Tensor& slopes, double beta, const Tensor& w1, const Tensor& arg, const Tensor& du, bool offsets_grad,
    int64_t tile, int64_t runs) {
  if (off.scalar_type() == at::kDouble)
    return position_grad_impl<double>(dz, h, scale1, slope1, shift1, off, nbr, ctr, points, divisors, slopes, beta,
                                      w1, arg, du, offsets_grad, tile, runs);
  TORCH_CHECK(off.scalar_type() == at::kFloat, "aggregate: float32 or float64 values");
  return position_grad_impl<float>(dz, h, scale1, slope1, shift1, off, nbr, ctr, points, divisors, slopes, beta, w1,
                                   arg, du, offsets_grad, tile, runs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(any2point_native, m) {
  m.def("aggregate_hidden(Tensor fa, Tensor fb, Tensor off, Tensor nbr, Tensor ctr, Tensor w1, Tensor divisors, "
        "float beta, int tile) -> (Tensor, Tensor, Tensor)");
  m.def("aggregate_moments(Tensor h, Tensor scale1, Tensor shift1, int tile, int runs) -> (Tensor, Tensor)");
  m.def("aggregate_max(Tensor h, Tensor scale1, Tensor shift1, Tensor w2, Tensor scale2, Tensor shift2, Tensor f, "
        "Tensor off, Tensor nbr, Tensor ctr, Tensor divisors, float beta, int tile) -> (Tensor, Tensor, Tensor)");
  m.def("aggregate_hidden_grad(Tensor h, Tensor scale1, Tensor shift1, Tensor mean1, Tensor arg, Tensor du, "
        "Tensor w2s, Tensor cross, Tensor da_shift, int tile, int runs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("aggregate_position_grad(Tensor dz, Tensor h, Tensor scale1, Tensor slope1, Tensor shift1, Tensor off, "
        "Tensor nbr, Tensor ctr, int points, Tensor divisors, Tensor slopes, float beta, Tensor w1, Tensor arg, "
        "Tensor du, bool offsets_grad, int tile, int runs) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) {
  m.impl("aggregate_hidden", &aggregate_hidden);
  m.impl("aggregate_moments", &aggregate_moments);
  m.impl("aggregate_max", &aggregate_max);
  m.impl("aggregate_hidden_grad", &aggregate_hidden_grad);
  m.impl("aggregate_position_grad", &aggregate_position_grad);
}
