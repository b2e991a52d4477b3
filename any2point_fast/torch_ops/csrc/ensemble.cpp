// The row products of ensemble_propagate, on the CPU (loaded by any2point_fast.torch_ops.native).
//
// Every product reads whole C-wide rows of the pooled tables by index, one token (or one table
// row) per task, and writes each output once: no [M, B·N, C] tensor, no atomics (the caller
// lists segment_rows' entries row after row).
//   row_dots:     dots[j][i] = a[ids[j][i]] · b[i]                 (backward: the gradients of w)
//   ensemble_forward: dots as row_dots, Eq. 3's weights w from them, and
//                 y[i] = x[i] + coef · Σ_j w[j][i] · a[ids[j][i]]  (the residual; the rows read once)
//   segment_rows: out[r] = Σ_{k in r} (alpha[k] · p[p_ids[k]] + beta[k] · q[q_ids[k]]) + gamma[r] · self[r]
//                 (the tables' gradients, entries listed row after row as in a CSR matrix)
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

// Views whose dot products share one pass over b's row, each with its own vector of partial sums
// (one accumulator would chain every add on the one before).
constexpr int64_t kViews = 8;

// Token i's M dots a[ids[j][i]] · bi into dots[j][i].
template <typename T>
inline void token_dots(const T* a, const int64_t* ids, const T* bi, int64_t i, int64_t views, int64_t tokens,
                       int64_t channels, T* dots) {
  using V = any2point::Vec<T>;
  constexpr int64_t lanes = any2point::kLanes<T>;
  const int64_t full = channels / lanes * lanes;
  for (int64_t j0 = 0; j0 < views; j0 += kViews) {
    const int64_t n = std::min(kViews, views - j0);
    const T* rows[kViews];
    V acc[kViews];
    for (int64_t j = 0; j < kViews; ++j) {
      rows[j] = a + ids[(j0 + std::min(j, n - 1)) * tokens + i] * channels;  // past n: a repeat, unused
      acc[j] = V{};
    }
    for (int64_t c = 0; c < full; c += lanes) {
      const V bv = any2point::load_as<V>(bi + c);
      for (int64_t j = 0; j < kViews; ++j) acc[j] += any2point::load_as<V>(rows[j] + c) * bv;
    }
    for (int64_t j = 0; j < n; ++j) {
      T sum = any2point::lane_sum<T>(acc[j]);
      for (int64_t c = full; c < channels; ++c) sum += rows[j][c] * bi[c];
      dots[(j0 + j) * tokens + i] = sum;
    }
  }
}

template <typename T>
void row_dots_kernel(const T* a, const int64_t* ids, const T* b, int64_t views, int64_t tokens, int64_t channels,
                     T* dots) {
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) token_dots(a, ids, b + i * channels, i, views, tokens, channels, dots);
  });
}

// Token by token: the dots, Eq. 3's weights from them (the arithmetic of the torch route's
// _weights), then the weighted sum of the same M rows, still in cache.
template <typename T>
void ensemble_forward_kernel(const T* x, const T* a, const int64_t* ids, const T* b, const int64_t* b_ids,
                             const T* a_norms, const T* b_norms, T coef, T eps, int64_t views, int64_t tokens,
                             int64_t channels, T* y, T* dots) {
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> w(views);
    for (int64_t i = begin; i < end; ++i) {
      token_dots(a, ids, b + b_ids[i] * channels, i, views, tokens, channels, dots);
      const T base_norm = b_norms[b_ids[i]];
      T total = 0;
      for (int64_t j = 0; j < views; ++j) {
        const T cos = dots[j * tokens + i] / std::max(base_norm * a_norms[ids[j * tokens + i]], eps);
        w[j] = (cos + 1) / 2;
        total += w[j];
      }
      total = std::max(total, eps);
      T* yi = y + i * channels;
      std::copy(x + i * channels, x + (i + 1) * channels, yi);
      for (int64_t j = 0; j < views; ++j) {
        const T* aj = a + ids[j * tokens + i] * channels;
        const T scale = coef * (w[j] / total);
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) yi[c] += scale * aj[c];
      }
    }
  });
}

template <typename T>
void segment_rows_kernel(const int64_t* offsets, const int64_t* order, int64_t rows, const T* alpha,
                         const int64_t* p_ids, const T* p, const T* beta, const int64_t* q_ids, const T* q,
                         const T* gamma, const T* self, int64_t channels, T* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = order ? order[n] : n;
      T* o = out + r * channels;
      const T* sr = self + r * channels;
      const T gr = gamma[r];
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) o[c] = gr * sr[c];
      for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) {
        const T* qk = q + q_ids[k] * channels;
        const T bk = beta[k];
        if (alpha) {
          const T* pk = p + p_ids[k] * channels;
          const T ak = alpha[k];
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) o[c] += ak * pk[c] + bk * qk[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) o[c] += bk * qk[c];
        }
      }
    }
  });
}

// dots [M, T]: a [Ra, C] rows ids [M, T] against b [T, C], a row per token.
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& ids, const at::Tensor& b) {
  any2point::check_values(a, {&a, &b});
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.is_contiguous(), "ids: contiguous int64 [M, T]");
  const int64_t views = ids.size(0), tokens = ids.size(1);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && b.size(0) == tokens,
              "a [Ra, C], b [T, C]: a row per token");
  auto dots = at::empty({views, tokens}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "row_dots", [&] {
    row_dots_kernel<scalar_t>(a.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), b.data_ptr<scalar_t>(), views, tokens,
                              a.size(1), dots.data_ptr<scalar_t>());
  });
  return dots;
}

// (y [T, C] = x + coef · Σ_j w[j] ⊙ a[ids[j]], dots [M, T]) with Eq. 3's weights w [M, T] from
// the dots of a's rows ids [M, T] with b's rows b_ids [T] and the rows' norms (a_norms [Ra],
// b_norms [Rb]); eps clamps the cosines' denominators and the weights' sums.
std::tuple<at::Tensor, at::Tensor> ensemble_forward(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ids,
                                                    const at::Tensor& b, const at::Tensor& b_ids,
                                                    const at::Tensor& a_norms, const at::Tensor& b_norms, double coef,
                                                    double eps) {
  any2point::check_values(x, {&x, &a, &b, &a_norms, &b_norms});
  any2point::check_indices({&b_ids});
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 2 && x.dim() == 2 &&
                  x.size(0) == ids.size(1) && b_ids.numel() == ids.size(1) && a.dim() == 2 && b.dim() == 2 &&
                  a.size(1) == x.size(1) && b.size(1) == x.size(1) && a_norms.numel() == a.size(0) &&
                  b_norms.numel() == b.size(0),
              "x [T, C], a [Ra, C], ids [M, T], b [Rb, C], b_ids [T], a_norms [Ra], b_norms [Rb]");
  auto y = at::empty_like(x);
  auto dots = at::empty({ids.size(0), ids.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ensemble_forward", [&] {
    ensemble_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(),
                                      b.data_ptr<scalar_t>(), b_ids.data_ptr<int64_t>(), a_norms.data_ptr<scalar_t>(),
                                      b_norms.data_ptr<scalar_t>(), static_cast<scalar_t>(coef),
                                      static_cast<scalar_t>(eps), ids.size(0), ids.size(1), x.size(1),
                                      y.data_ptr<scalar_t>(), dots.data_ptr<scalar_t>());
  });
  return {y, dots};
}

// out [R, C] with R = offsets.numel() - 1 = self.size(0); the alpha term is left out without alpha.
// Rows are visited in order (a permutation of 0..R-1, say rows that read the same rows of p and q
// next to each other, so that those stay in cache), or 0..R-1.
at::Tensor segment_rows(const at::Tensor& offsets, const std::optional<at::Tensor>& order,
                        const std::optional<at::Tensor>& alpha,
                        const std::optional<at::Tensor>& p_ids, const std::optional<at::Tensor>& p,
                        const at::Tensor& beta, const at::Tensor& q_ids, const at::Tensor& q, const at::Tensor& gamma,
                        const at::Tensor& self) {
  any2point::check_values(self, {&beta, &q, &gamma, &self});
  any2point::check_indices({&offsets, &q_ids});
  const int64_t rows = offsets.numel() - 1, entries = beta.numel();
  TORCH_CHECK(rows == self.size(0) && gamma.numel() == rows && q_ids.numel() == entries && self.dim() == 2 &&
                  q.dim() == 2 && q.size(1) == self.size(1), "offsets [R + 1], gamma [R], self [R, C], q [Rq, C]");
  TORCH_CHECK(offsets[rows].item<int64_t>() == entries, "offsets must end at the number of entries");
  TORCH_CHECK(alpha.has_value() == p_ids.has_value() && alpha.has_value() == p.has_value(),
              "alpha, p_ids and p go together");
  if (order) {
    any2point::check_indices({&*order});
    TORCH_CHECK(order->numel() == rows, "order: one entry per row");
  }
  if (alpha) {
    any2point::check_values(self, {&*alpha, &*p});
    any2point::check_indices({&*p_ids});
    TORCH_CHECK(alpha->numel() == entries && p_ids->numel() == entries && p->dim() == 2 && p->size(1) == self.size(1),
                "alpha and p_ids: one per entry; p [Rp, C]");
  }
  auto out = at::empty_like(self);
  AT_DISPATCH_FLOATING_TYPES(self.scalar_type(), "segment_rows", [&] {
    segment_rows_kernel<scalar_t>(offsets.data_ptr<int64_t>(), order ? order->data_ptr<int64_t>() : nullptr, rows,
                                  alpha ? alpha->data_ptr<scalar_t>() : nullptr,
                                  p_ids ? p_ids->data_ptr<int64_t>() : nullptr, p ? p->data_ptr<scalar_t>() : nullptr,
                                  beta.data_ptr<scalar_t>(), q_ids.data_ptr<int64_t>(), q.data_ptr<scalar_t>(),
                                  gamma.data_ptr<scalar_t>(), self.data_ptr<scalar_t>(), self.size(1),
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(any2point_native, m) {
  m.def("row_dots(Tensor a, Tensor ids, Tensor b) -> Tensor");
  m.def("ensemble_forward(Tensor x, Tensor a, Tensor ids, Tensor b, Tensor b_ids, Tensor a_norms, Tensor b_norms, "
        "float coef, float eps) -> (Tensor, Tensor)");
  m.def("segment_rows(Tensor offsets, Tensor? order, Tensor? alpha, Tensor? p_ids, Tensor? p, Tensor beta, "
        "Tensor q_ids, Tensor q, Tensor gamma, Tensor self) -> Tensor");
}

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) {
  m.impl("row_dots", &row_dots);
  m.impl("ensemble_forward", &ensemble_forward);
  m.impl("segment_rows", &segment_rows);
}
