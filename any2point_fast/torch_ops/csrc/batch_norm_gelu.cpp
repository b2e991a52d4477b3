// BatchNorm of groups of rows followed by exact GELU, on the CPU (loaded by any2point_fast.torch_ops.native).
//
// Rows [S, C] come in G groups of consecutive rows, offsets[g] .. offsets[g + 1] - 1 (the pooled
// rows of the M views, or of the voxels), each group with its own BatchNorm. A group normalises
// with its own statistics where batch[g] is set (training), otherwise with the given mean and var
// (running statistics). Work goes in chunks of whole rows (streamed, not strided): a pass for the
// statistics, partial per chunk and combined in a fixed order (repeated runs are bit-identical),
// then a pass writing the output, and GELU'(z) where backward will need it (the slope: [S, C]
// more memory, but backward then evaluates no erf or exp, which dominate this kernel's time).
// Backward takes two passes too: the per-channel sums, then dx.
//   batch_norm_gelu:          y = gelu(z), z = (x - mean[g]) * rstd[g] * weight[g] + bias[g]
//   batch_norm_gelu_backward: the gradients of x, weight and bias (through the batch statistics
//                             where batch[g] is set), from dz = dy * slope
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using any2point::exp_approx;

// Φ(z) (GELU = z·Φ(z)) and the normal density φ(z) (GELU' = Φ + z·φ). In float, erf by
// Abramowitz & Stegun 7.1.26 (absolute error under 1.5e-7; PyTorch's vectorised CPU erf uses the
// same approximation) with a vectorisable exp; in double, the exact functions.
inline void normal_cdf_pdf(float z, float& cdf, float& pdf) {
  const float t = 1.0f / std::fma(0.3275911f * 0.70710678f, std::fabs(z), 1.0f);
  float r = 1.061405429f;
  r = std::fma(r, t, -1.453152027f);
  r = std::fma(r, t, 1.421413741f);
  r = std::fma(r, t, -0.284496736f);
  r = std::fma(r, t, 0.254829592f);
  const float e = exp_approx(-0.5f * z * z);
  const float tail = 0.5f * r * t * e;  // (1 - erf(|z|/√2)) / 2
  cdf = z >= 0.0f ? 1.0f - tail : tail;
  pdf = 0.3989422804014327f * e;
}

inline void normal_cdf_pdf(double z, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-z * 0.7071067811865476);
  pdf = 0.3989422804014327 * std::exp(-0.5 * z * z);
}

// Chunks of at most kRows consecutive rows of one group: the unit of work. Each chunk's partial
// statistics stay apart and are combined in chunk order, so results do not depend on threads.
constexpr int64_t kRows = 32;

struct Chunk {
  int64_t g, first, n;
};

// The chunks, group after group; group g's are list[first[g]] .. list[first[g + 1] - 1].
struct Chunks {
  std::vector<Chunk> list;
  std::vector<int64_t> first;

  Chunks(const int64_t* offsets, int64_t groups) : first(groups + 1, 0) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t row = offsets[g]; row < offsets[g + 1]; row += kRows)
        list.push_back({g, row, std::min(kRows, offsets[g + 1] - row)});
      first[g + 1] = static_cast<int64_t>(list.size());
    }
  }
  int64_t size() const { return static_cast<int64_t>(list.size()); }
};

// Calls body(k, chunk) for every chunk k of group g, in parallel.
template <typename Body>
void for_each_chunk_of(const Chunks& chunks, int64_t g, Body body) {
  at::parallel_for(chunks.first[g], chunks.first[g + 1], 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) body(k, chunks.list[k]);
  });
}

// Two [chunks, C] double arrays of per-chunk partial sums; zeroed(k) zeroes and returns chunk k's rows.
struct ChunkSums {
  at::Tensor storage;
  int64_t channels;

  ChunkSums(int64_t chunks, int64_t channels)
      : storage(any2point::scratch<double>(2 * chunks * channels)), channels(channels) {}
  double* first() { return storage.data_ptr<double>(); }
  double* second() { return first() + storage.numel() / 2; }
  std::pair<double*, double*> zeroed(int64_t k) {
    double *a = first() + k * channels, *b = second() + k * channels;
    std::fill(a, a + channels, 0.0);
    std::fill(b, b + channels, 0.0);
    return {a, b};
  }
};

// z = (x − mean) · rstd · weight + bias of one element, with Φ(z) and φ(z).
template <typename T>
inline T normalized(T x, T mean, T rstd, T weight, T bias, T& cdf, T& pdf) {
  const T z = (x - mean) * rstd * weight + bias;
  normal_cdf_pdf(z, cdf, pdf);
  return z;
}

// Group g's mean and biased var [C] from its chunks' means and sums of squared deviations
// (Chan et al.'s pairwise update, in chunk order, in double).
template <typename T>
void combine_stats(const Chunks& chunks, int64_t g, ChunkSums& partial, T* mean, T* var) {
  const int64_t channels = partial.channels;
  std::vector<double> mu(channels, 0.0), m2(channels, 0.0);
  int64_t count = 0;
  for (int64_t k = chunks.first[g]; k < chunks.first[g + 1]; ++k) {
    const int64_t n = chunks.list[k].n, total = count + n;
    const double *cm = partial.first() + k * channels, *cq = partial.second() + k * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const double delta = cm[c] - mu[c];
      mu[c] += delta * n / total;
      m2[c] += cq[c] + delta * delta * count * n / total;
    }
    count = total;
  }
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = static_cast<T>(mu[c]);
    var[c] = static_cast<T>(m2[c] / count);
  }
}

// Groups go one after the other, each pass over a group's chunks in parallel: a group's rows (a
// few MB) are then still in the last-level cache when its second pass reads them again.
// slope: nullptr, or where to write GELU'(z) for backward.
template <typename T>
void forward_kernel(const T* x, const int64_t* offsets, int64_t groups, int64_t channels, const T* weight,
                    const T* bias, const bool* batch, T eps, T* mean, T* var, T* rstd, T* y, T* slope) {
  const Chunks chunks(offsets, groups);
  ChunkSums partial(chunks.size(), channels);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t base = g * channels;
    if (batch[g] && chunks.first[g] < chunks.first[g + 1]) {  // else the given statistics (or no rows)
      for_each_chunk_of(chunks, g, [&](int64_t k, const Chunk& t) {
        const auto [mu, m2] = partial.zeroed(k);
        for (int64_t i = 0; i < t.n; ++i) {
          const T* row = x + (t.first + i) * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) mu[c] += row[c];
        }
        for (int64_t c = 0; c < channels; ++c) mu[c] /= t.n;
        for (int64_t i = 0; i < t.n; ++i) {  // the chunk is in cache now
          const T* row = x + (t.first + i) * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            const double d = row[c] - mu[c];
            m2[c] += d * d;
          }
        }
      });
      combine_stats(chunks, g, partial, mean + base, var + base);
    }
    for (int64_t c = base; c < base + channels; ++c) rstd[c] = T(1) / std::sqrt(var[c] + eps);
    const T *m = mean + base, *s = rstd + base, *w = weight + base, *b = bias + base;
    for_each_chunk_of(chunks, g, [&](int64_t, const Chunk& t) {
      for (int64_t i = 0; i < t.n; ++i) {
        const int64_t row = (t.first + i) * channels;
        if (slope == nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            T cdf, pdf;
            y[row + c] = normalized(x[row + c], m[c], s[c], w[c], b[c], cdf, pdf) * cdf;
          }
          continue;
        }
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          T cdf, pdf;
          const T z = normalized(x[row + c], m[c], s[c], w[c], b[c], cdf, pdf);
          y[row + c] = z * cdf;
          slope[row + c] = cdf + z * pdf;
        }
      }
    });
  }
}

// Group by group as forward. slope: GELU'(z), written by forward.
template <typename T>
void backward_kernel(const T* dy, const T* x, const T* slope, const int64_t* offsets, int64_t groups,
                     int64_t channels, const T* weight, const bool* batch, const T* mean, const T* rstd, T* dx,
                     T* dweight, T* dbias) {
  const Chunks chunks(offsets, groups);
  ChunkSums partial(chunks.size(), channels);
  std::vector<double> sum_dz(channels), sum_dz_xhat(channels);
  std::vector<T> scale(channels), mean_dz(channels), mean_dz_xhat(channels);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t base = g * channels, n = offsets[g + 1] - offsets[g];
    const T *m = mean + base, *s = rstd + base;
    // per chunk, Σ dz and Σ dz · xhat with dz = dy · GELU'(z), xhat = (x - mean) · rstd
    for_each_chunk_of(chunks, g, [&](int64_t k, const Chunk& t) {
      const auto [chunk_dz, chunk_dz_xhat] = partial.zeroed(k);
      for (int64_t i = 0; i < t.n; ++i) {
        const int64_t row = (t.first + i) * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          const T dz = dy[row + c] * slope[row + c];
          chunk_dz[c] += dz;
          chunk_dz_xhat[c] += dz * ((x[row + c] - m[c]) * s[c]);
        }
      }
    });
    // d bias = Σ dz, d weight = Σ dz · xhat (chunk order); with batch statistics, the mean and
    // var depend on every row of the group, which brings in the two means
    std::fill(sum_dz.begin(), sum_dz.end(), 0.0);
    std::fill(sum_dz_xhat.begin(), sum_dz_xhat.end(), 0.0);
    for (int64_t k = chunks.first[g]; k < chunks.first[g + 1]; ++k) {
      const double *chunk_dz = partial.first() + k * channels, *chunk_dz_xhat = partial.second() + k * channels;
      for (int64_t c = 0; c < channels; ++c) {
        sum_dz[c] += chunk_dz[c];
        sum_dz_xhat[c] += chunk_dz_xhat[c];
      }
    }
    const bool own = batch[g] && n > 0;
    for (int64_t c = 0; c < channels; ++c) {
      dbias[base + c] = static_cast<T>(sum_dz[c]);
      dweight[base + c] = static_cast<T>(sum_dz_xhat[c]);
      scale[c] = weight[base + c] * s[c];
      mean_dz[c] = own ? static_cast<T>(sum_dz[c] / n) : T(0);
      mean_dz_xhat[c] = own ? static_cast<T>(sum_dz_xhat[c] / n) : T(0);
    }
    const T *a = scale.data(), *md = mean_dz.data(), *mdx = mean_dz_xhat.data();
    for_each_chunk_of(chunks, g, [&](int64_t, const Chunk& t) {
      for (int64_t i = 0; i < t.n; ++i) {
        const int64_t row = (t.first + i) * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          const T xhat = (x[row + c] - m[c]) * s[c];
          dx[row + c] = a[c] * (dy[row + c] * slope[row + c] - md[c] - xhat * mdx[c]);
        }
      }
    });
  }
}

void check_groups(const at::Tensor& rows, const at::Tensor& offsets, const at::Tensor& batch,
                  std::initializer_list<const at::Tensor*> per_group) {
  any2point::check_indices({&offsets});
  const int64_t groups = offsets.numel() - 1;
  TORCH_CHECK(rows.dim() == 2 && offsets.numel() > 0, "rows [S, C], offsets [G + 1]");
  TORCH_CHECK(batch.scalar_type() == at::kBool && batch.is_contiguous() && batch.numel() == groups, "batch: G bools");
  for (const at::Tensor* t : per_group)
    TORCH_CHECK(t->dim() == 2 && t->size(0) == groups && t->size(1) == rows.size(1), "per-group tensors [G, C]");
  any2point::check_offsets(offsets, rows.size(0), "offsets");
}

// (y, mean, var, rstd, slope): slope is GELU'(z) [S, C] for backward where keep_slope is set, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_gelu(
    const at::Tensor& rows, const at::Tensor& offsets, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch, double eps, bool keep_slope) {
  any2point::check_values(rows, {&rows, &weight, &bias, &mean, &var});
  check_groups(rows, offsets, batch, {&weight, &bias, &mean, &var});
  auto y = at::empty_like(rows), slope = keep_slope ? at::empty_like(rows) : at::empty({0}, rows.options());
  auto used_mean = mean.clone(), used_var = var.clone(), rstd = at::empty_like(var);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "batch_norm_gelu", [&] {
    forward_kernel<scalar_t>(rows.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), offsets.numel() - 1,
                             rows.size(1), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                             batch.data_ptr<bool>(), static_cast<scalar_t>(eps), used_mean.data_ptr<scalar_t>(),
                             used_var.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                             keep_slope ? slope.data_ptr<scalar_t>() : nullptr);
  });
  return {y, used_mean, used_var, rstd, slope};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_gelu_backward(
    const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& slope, const at::Tensor& offsets,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& batch) {
  any2point::check_values(rows, {&grad, &rows, &slope, &weight, &mean, &rstd});
  check_groups(rows, offsets, batch, {&weight, &mean, &rstd});
  TORCH_CHECK(grad.sizes() == rows.sizes() && slope.sizes() == rows.sizes(), "grad and slope: the shape of rows");
  auto dx = at::empty_like(rows), dweight = at::empty_like(weight), dbias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "batch_norm_gelu_backward", [&] {
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(), slope.data_ptr<scalar_t>(),
                              offsets.data_ptr<int64_t>(), offsets.numel() - 1, rows.size(1),
                              weight.data_ptr<scalar_t>(), batch.data_ptr<bool>(), mean.data_ptr<scalar_t>(),
                              rstd.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dweight.data_ptr<scalar_t>(),
                              dbias.data_ptr<scalar_t>());
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(any2point_native, m) {
  m.def("batch_norm_gelu(Tensor rows, Tensor offsets, Tensor weight, Tensor bias, Tensor mean, Tensor var, "
        "Tensor batch, float eps, bool keep_slope) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_gelu_backward(Tensor grad, Tensor rows, Tensor slope, Tensor offsets, Tensor weight, "
        "Tensor mean, Tensor rstd, Tensor batch) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) {
  m.impl("batch_norm_gelu", &batch_norm_gelu);
  m.impl("batch_norm_gelu_backward", &batch_norm_gelu_backward);
}
