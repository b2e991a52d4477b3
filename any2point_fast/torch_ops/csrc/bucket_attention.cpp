// Softmax attention inside the buckets of sorted items, on the CPU (loaded by any2point_fast.torch_ops.native).
//
// For the buckets the caller lists (sorted positions start[b] .. start[b] + length[b] - 1), each
// head attends among the bucket's items only: no padding, no mask, no N x N tensor. Loops over a
// bucket's keys are contiguous ([head_dim][L] copies of k and v) and vectorise, which is what
// small head dims need (PyTorch's flash kernel is built for head dims of 64 and more). Buckets
// are spread over ATen's threads, the longest first. Rows of qkv are [q | k | v], each
// head-major ([H][d]); every qkv row belongs to exactly one item, so backward writes each
// gradient row once, without atomics.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using any2point::exp_approx;
using any2point::for_each_bucket;

// This thread's scratch of at least size values, reused from bucket to bucket (most buckets hold
// a few items: an allocation per bucket would cost more than its attention).
template <typename T>
T* thread_buffer(int64_t size) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// k and v of one head of a bucket's items as [d][L], from the [q | k | v] rows.
template <typename T>
void gather_keys(const T* qkv, const int64_t* rows, int64_t length, int64_t head, int64_t dim, int64_t width,
                 T* k, T* v) {
  for (int64_t j = 0; j < length; ++j) {
    const T* row = qkv + rows[j] * 3 * width + head * dim;
    for (int64_t e = 0; e < dim; ++e) {
      k[e * length + j] = row[width + e];
      v[e * length + j] = row[2 * width + e];
    }
  }
}

// scores[j] = scale · q · k_j over the bucket's keys k [d][L].
template <typename T>
void scores(const T* q, const T* k, int64_t length, int64_t dim, T scale, T* out) {
  std::fill(out, out + length, T(0));
  for (int64_t e = 0; e < dim; ++e) {
    const T qe = q[e] * scale;
    const T* ke = k + e * length;
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) out[j] += qe * ke[j];
  }
}

template <typename T>
void forward_kernel(const T* qkv, const int64_t* rows, const int64_t* starts, const int64_t* lengths,
                    int64_t num_buckets, int64_t heads, int64_t dim, T scale, T* out, T* lse) {
  const int64_t width = heads * dim;
  for_each_bucket(lengths, num_buckets, [&](int64_t b) {
    const int64_t start = starts[b], length = lengths[b];
    T* k = thread_buffer<T>(3 * dim * length);
    T* v = k + dim * length;
    T* p = v + dim * length;
    for (int64_t h = 0; h < heads; ++h) {
      gather_keys(qkv, rows + start, length, h, dim, width, k, v);
      for (int64_t i = start; i < start + length; ++i) {
        scores(qkv + rows[i] * 3 * width + h * dim, k, length, dim, scale, p);
        T top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < length; ++j) top = std::max(top, p[j]);
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < length; ++j) {
          p[j] = exp_approx(p[j] - top);
          total += p[j];
        }
        T* o = out + i * width + h * dim;
        for (int64_t e = 0; e < dim; ++e) {
          const T* ve = v + e * length;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < length; ++j) acc += p[j] * ve[j];
          o[e] = acc / total;
        }
        lse[i * heads + h] = top + std::log(total);
      }
    }
  });
}

// Recomputes the probabilities from the log-sum-exps; dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)).
template <typename T>
void backward_kernel(const T* grad_out, const T* qkv, const T* out, const T* lse, const int64_t* rows,
                     const int64_t* starts, const int64_t* lengths, int64_t num_buckets, int64_t heads,
                     int64_t dim, T scale, T* grad_qkv) {
  const int64_t width = heads * dim;
  for_each_bucket(lengths, num_buckets, [&](int64_t b) {
    const int64_t start = starts[b], length = lengths[b];
    T* k = thread_buffer<T>(4 * dim * length + 2 * length);
    T* v = k + dim * length;
    T* dk = v + dim * length;
    T* dv = dk + dim * length;
    T* p = dv + dim * length;
    T* ds = p + length;
    for (int64_t h = 0; h < heads; ++h) {
      gather_keys(qkv, rows + start, length, h, dim, width, k, v);
      std::fill(dk, dk + 2 * dim * length, T(0));
      for (int64_t i = start; i < start + length; ++i) {
        const T* q = qkv + rows[i] * 3 * width + h * dim;
        const T* go = grad_out + i * width + h * dim;
        const T* o = out + i * width + h * dim;
        T delta = 0;
        for (int64_t e = 0; e < dim; ++e) delta += go[e] * o[e];
        scores(q, k, length, dim, scale, p);
        scores(go, v, length, dim, T(1), ds);
        const T m = lse[i * heads + h];
#pragma omp simd
        for (int64_t j = 0; j < length; ++j) {
          p[j] = exp_approx(p[j] - m);
          ds[j] = p[j] * (ds[j] - delta) * scale;
        }
        T* gq = grad_qkv + rows[i] * 3 * width + h * dim;
        for (int64_t e = 0; e < dim; ++e) {
          const T* ke = k + e * length;
          T* dke = dk + e * length;
          T* dve = dv + e * length;
          const T qe = q[e], ge = go[e];
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < length; ++j) {
            acc += ds[j] * ke[j];
            dke[j] += ds[j] * qe;
            dve[j] += p[j] * ge;
          }
          gq[e] = acc;
        }
      }
      for (int64_t j = 0; j < length; ++j) {
        T* row = grad_qkv + rows[start + j] * 3 * width + h * dim;
        for (int64_t e = 0; e < dim; ++e) {
          row[width + e] = dk[e * length + j];
          row[2 * width + e] = dv[e * length + j];
        }
      }
    }
  });
}

void check_buckets(const at::Tensor& qkv, const at::Tensor& rows, const at::Tensor& starts,
                   const at::Tensor& lengths, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && heads > 0 && qkv.size(1) % (3 * heads) == 0,
              "qkv must be [R, 3 * heads * head_dim]");
  any2point::check_indices({&rows, &starts, &lengths});
  TORCH_CHECK(starts.numel() == lengths.numel(), "one start per length");
}

// out [T, D], lse [T, H]: written at the listed buckets' positions only.
void bucket_attention(const at::Tensor& qkv, const at::Tensor& rows, const at::Tensor& starts,
                      const at::Tensor& lengths, int64_t heads, double scale, at::Tensor out, at::Tensor lse) {
  check_buckets(qkv, rows, starts, lengths, heads);
  any2point::check_values(qkv, {&qkv, &out, &lse});
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "bucket_attention", [&] {
    forward_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                             lengths.data_ptr<int64_t>(), starts.numel(), heads, qkv.size(1) / 3 / heads,
                             static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
}

// grad_qkv [R, 3D]: the rows of the listed buckets' items are overwritten.
void bucket_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                               const at::Tensor& lse, const at::Tensor& rows, const at::Tensor& starts,
                               const at::Tensor& lengths, int64_t heads, double scale, at::Tensor grad_qkv) {
  check_buckets(qkv, rows, starts, lengths, heads);
  any2point::check_values(qkv, {&qkv, &grad_out, &out, &lse, &grad_qkv});
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "bucket_attention_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                              lengths.data_ptr<int64_t>(), starts.numel(), heads, qkv.size(1) / 3 / heads,
                              static_cast<scalar_t>(scale), grad_qkv.data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY(any2point_native, m) {
  m.def("bucket_attention(Tensor qkv, Tensor rows, Tensor starts, Tensor lengths, int heads, float scale, "
        "Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def("bucket_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor rows, "
        "Tensor starts, Tensor lengths, int heads, float scale, Tensor(a!) grad_qkv) -> ()");
}

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) {
  m.impl("bucket_attention", &bucket_attention);
  m.impl("bucket_attention_backward", &bucket_attention_backward);
}
