// The normalised rows of LayerNorm (no affine part), on the CPU (loaded by
// any2point_fast.torch_ops.native): the view-independent x̂ that neighborhood_attention_pool folds
// into its projection, in its forward and again in its backward.
//   layer_norm_rows: xhat[r] = (x[r] − mean[r]) · rstd[r], with the mean and rstd = 1/√(var + eps)
//                    (biased var) of every row, shaped [R, 1] as ATen's native_layer_norm returns them
//   layer_norm_rows_backward: grad_x[r] += rstd[r] · (g[r] − mean(g[r]) − xhat[r] · mean(g[r] · xhat[r]))
//                    for the gradient g of xhat, x̂ recomputed from x
// Each row is read once from memory: its reductions and the output pass run on it in cache.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"

namespace {

// Vectors of partial sums per row: independent chains of adds.
constexpr int64_t kAccumulators = 4;

template <typename T>
T row_sum(const T* row, int64_t channels, T shift, bool squares) {
  using V = any2point::Vec<T>;
  constexpr int64_t lanes = any2point::kLanes<T>, step = kAccumulators * lanes;
  V acc[kAccumulators] = {};
  int64_t c = 0;
  for (; c + step <= channels; c += step)
    for (int64_t a = 0; a < kAccumulators; ++a) {
      const V d = any2point::load_as<V>(row + c + a * lanes) - shift;
      acc[a] += squares ? d * d : d;
    }
  for (int64_t a = 1; a < kAccumulators; ++a) acc[0] += acc[a];
  T sum = any2point::lane_sum<T>(acc[0]);
  for (; c < channels; ++c) {
    const T d = row[c] - shift;
    sum += squares ? d * d : d;
  }
  return sum;
}

template <typename T>
void layer_norm_kernel(const T* x, int64_t rows, int64_t channels, T eps, T* xhat, T* mean, T* rstd) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * channels;
      const T mu = row_sum(row, channels, T(0), false) / channels;
      const T inverse = T(1) / std::sqrt(row_sum(row, channels, mu, true) / channels + eps);
      T* out = xhat + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) out[c] = (row[c] - mu) * inverse;
      mean[r] = mu;
      rstd[r] = inverse;
    }
  });
}

template <typename T>
void layer_norm_backward_kernel(const T* grad, const T* x, const T* mean, const T* rstd, int64_t rows,
                                int64_t channels, T* grad_x) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T *g = grad + r * channels, *row = x + r * channels;
      const T mu = mean[r], inverse = rstd[r];
      T sum_g = 0, sum_g_xhat = 0;
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
      for (int64_t c = 0; c < channels; ++c) {
        sum_g += g[c];
        sum_g_xhat += g[c] * ((row[c] - mu) * inverse);
      }
      const T mean_g = sum_g / channels, mean_g_xhat = sum_g_xhat / channels;
      T* out = grad_x + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c)
        out[c] += inverse * (g[c] - mean_g - (row[c] - mu) * inverse * mean_g_xhat);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_rows(const at::Tensor& x, double eps) {
  any2point::check_values(x, {&x});
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x [R, C] with C > 0");
  auto xhat = at::empty_like(x), mean = at::empty({x.size(0), 1}, x.options()), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_rows", [&] {
    layer_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<scalar_t>(eps),
                                xhat.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {xhat, mean, rstd};
}

// Adds the gradient of x through xhat to grad_x [R, C] (mean and rstd as layer_norm_rows returns them).
void layer_norm_rows_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& rstd, at::Tensor grad_x) {
  any2point::check_values(x, {&grad, &x, &mean, &rstd, &grad_x});
  TORCH_CHECK(x.dim() == 2 && grad.sizes() == x.sizes() && grad_x.sizes() == x.sizes() &&
                  mean.numel() == x.size(0) && rstd.numel() == x.size(0),
              "grad, x and grad_x [R, C], mean and rstd [R, 1]");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_rows_backward", [&] {
    layer_norm_backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                         rstd.data_ptr<scalar_t>(), x.size(0), x.size(1), grad_x.data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(any2point_native, m) {
  m.def("layer_norm_rows(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_rows_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor(a!) grad_x) -> ()");
}

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) {
  m.impl("layer_norm_rows", &layer_norm_rows);
  m.impl("layer_norm_rows_backward", &layer_norm_rows_backward);
}
