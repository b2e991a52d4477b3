// Softmax attention inside the buckets of sorted items, on the CPU (loaded by any2point_fast.torch_ops.native).
//
// For the buckets the caller lists (sorted positions start[b] .. start[b] + length[b] - 1), each
// head attends among the bucket's items only: no padding, no mask, no N x N tensor. Short buckets
// of one length go a SIMD vector of buckets at a time (a bucket per lane); longer ones one at a
// time, spread over ATen's threads, the longest first, with loops over a bucket's keys that are
// contiguous ([head_dim][L] copies of k and v) and vectorise, which is what small head dims need
// (PyTorch's flash kernel is built for head dims of 64 and more). Rows of qkv are [q | k | v], each
// head-major ([H][d]); every qkv row belongs to exactly one item, so backward writes each
// gradient row once, without atomics.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using any2point::exp_approx;
using any2point::for_each_bucket;

// This thread's scratch of at least size values, reused from bucket to bucket (most buckets hold
// a few items: an allocation per bucket would cost more than its attention). A std::vector kept
// per thread, which memory profiles do not see (up to 16 · (8 · width + heads) values per lane
// of short buckets, (4 · dim + 2) · L for a long bucket of L items).
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

// Short buckets (at most kShortMax items, rows at most kShortMaxWidth wide) of one length go
// kLanes at a time, a bucket per SIMD lane: every step is then one vector operation over those
// buckets, where per-bucket loops over a few keys would cost more in overhead than in work (the
// recipes' buckets mostly hold a few items). Longer ones go one at a time, vectorised over keys.
constexpr int64_t kShortMax = 16;
constexpr int64_t kShortMaxWidth = 64;

// The buckets by route: tasks (first index into shorts, count ≤ lanes) of short buckets of one
// length, and the other buckets with their lengths.
struct Routes {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  std::vector<int64_t> shorts, longs, long_lengths;
};

inline Routes split_buckets(const int64_t* lengths, int64_t num_buckets, int64_t width, int64_t lanes) {
  Routes routes;
  std::vector<std::vector<int64_t>> by_length(kShortMax + 1);
  const int64_t short_max = width <= kShortMaxWidth ? kShortMax : 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    if (lengths[b] <= short_max) {
      by_length[lengths[b]].push_back(b);
    } else {
      routes.longs.push_back(b);
      routes.long_lengths.push_back(lengths[b]);
    }
  }
  for (const auto& same : by_length) {
    for (int64_t i = 0; i < static_cast<int64_t>(same.size()); i += lanes) {
      routes.tasks.emplace_back(static_cast<int64_t>(routes.shorts.size()) + i,
                                std::min<int64_t>(lanes, static_cast<int64_t>(same.size()) - i));
    }
    routes.shorts.insert(routes.shorts.end(), same.begin(), same.end());
  }
  return routes;
}

// e^x lane by lane (the loop vectorises).
template <typename T>
inline any2point::Vec<T> exp_lanes(any2point::Vec<T> x) {
  constexpr int64_t lanes = any2point::kLanes<T>;
  T values[lanes];
  std::memcpy(values, &x, sizeof(x));
#pragma omp simd
  for (int64_t l = 0; l < lanes; ++l) values[l] = exp_approx(values[l]);
  std::memcpy(&x, values, sizeof(x));
  return x;
}

// One task's buckets as lanes: lane l is bucket buckets[min(l, count − 1)] (lanes past count
// repeat the last bucket and are never written back). Copies `values` values from row
// address(bucket, i) of every item i into [L][values][lanes].
template <typename T, typename Address>
void gather_lanes(const int64_t* buckets, int64_t count, int64_t length, int64_t values, Address address, T* to) {
  constexpr int64_t lanes = any2point::kLanes<T>;
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t b = buckets[std::min(l, count - 1)];
    for (int64_t i = 0; i < length; ++i) {
      const T* from = address(b, i);
      for (int64_t c = 0; c < values; ++c) to[(i * values + c) * lanes + l] = from[c];
    }
  }
}

// Writes lanes 0 .. count − 1 of [L][values][lanes] back to row address(bucket, i) of every item.
template <typename T, typename Address>
void scatter_lanes(const T* from, const int64_t* buckets, int64_t count, int64_t length, int64_t values,
                   Address address) {
  constexpr int64_t lanes = any2point::kLanes<T>;
  for (int64_t l = 0; l < count; ++l)
    for (int64_t i = 0; i < length; ++i) {
      T* to = address(buckets[l], i);
      for (int64_t c = 0; c < values; ++c) to[c] = from[(i * values + c) * lanes + l];
    }
}

template <typename T>
void lanes_forward(const T* qkv, const int64_t* rows, const int64_t* starts, int64_t length, const int64_t* buckets,
                   int64_t count, int64_t heads, int64_t dim, T scale, T* out, T* lse) {
  using V = any2point::Vec<T>;
  using any2point::load_as;
  constexpr int64_t lanes = any2point::kLanes<T>;
  const int64_t width = heads * dim;
  T* x = thread_buffer<T>(length * (4 * width + heads) * lanes);  // [L][q | k | v][lanes], out, lse
  T* o = x + length * 3 * width * lanes;
  T* m = o + length * width * lanes;
  const auto qkv_row = [&](int64_t b, int64_t i) { return qkv + rows[starts[b] + i] * 3 * width; };
  gather_lanes(buckets, count, length, 3 * width, qkv_row, x);
  auto at = [&](int64_t i, int64_t c) { return load_as<V>(x + (i * 3 * width + c) * lanes); };
  V p[kShortMax];
  for (int64_t i = 0; i < length; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      V top = V{} - T(INFINITY);
      for (int64_t j = 0; j < length; ++j) {
        V dot = V{};
        for (int64_t e = h * dim; e < (h + 1) * dim; ++e) dot += at(i, e) * at(j, width + e);
        p[j] = dot * scale;
        top = p[j] > top ? p[j] : top;
      }
      V total = V{};
      for (int64_t j = 0; j < length; ++j) {
        p[j] = exp_lanes<T>(p[j] - top);
        total += p[j];
      }
      for (int64_t e = h * dim; e < (h + 1) * dim; ++e) {
        V acc = V{};
        for (int64_t j = 0; j < length; ++j) acc += p[j] * at(j, 2 * width + e);
        any2point::store_as(o + (i * width + e) * lanes, acc / total);
      }
      T top_lanes[lanes], total_lanes[lanes];
      std::memcpy(top_lanes, &top, sizeof(top));
      std::memcpy(total_lanes, &total, sizeof(total));
      for (int64_t l = 0; l < lanes; ++l) m[(i * heads + h) * lanes + l] = top_lanes[l] + std::log(total_lanes[l]);
    }
  scatter_lanes(o, buckets, count, length, width, [&](int64_t b, int64_t i) { return out + (starts[b] + i) * width; });
  scatter_lanes(m, buckets, count, length, heads, [&](int64_t b, int64_t i) { return lse + (starts[b] + i) * heads; });
}

template <typename T>
void lanes_backward(const T* grad_out, const T* qkv, const T* out, const T* lse, const int64_t* rows,
                    const int64_t* starts, int64_t length, const int64_t* buckets, int64_t count, int64_t heads,
                    int64_t dim, T scale, T* grad_qkv) {
  using V = any2point::Vec<T>;
  using any2point::load_as;
  using any2point::store_as;
  constexpr int64_t lanes = any2point::kLanes<T>;
  const int64_t width = heads * dim;
  // [L][q | k | v], [L][dO], [L][O], [L][lse], then the gradient [L][dq | dk | dv], all [.][lanes]
  T* x = thread_buffer<T>(length * (8 * width + heads) * lanes);
  T* go = x + length * 3 * width * lanes;
  T* o = go + length * width * lanes;
  T* m = o + length * width * lanes;
  T* grad = m + length * heads * lanes;
  const auto qkv_row = [&](int64_t b, int64_t i) { return qkv + rows[starts[b] + i] * 3 * width; };
  gather_lanes(buckets, count, length, 3 * width, qkv_row, x);
  gather_lanes(buckets, count, length, width, [&](int64_t b, int64_t i) { return grad_out + (starts[b] + i) * width; },
               go);
  gather_lanes(buckets, count, length, width, [&](int64_t b, int64_t i) { return out + (starts[b] + i) * width; }, o);
  gather_lanes(buckets, count, length, heads, [&](int64_t b, int64_t i) { return lse + (starts[b] + i) * heads; }, m);
  std::fill(grad, grad + length * 3 * width * lanes, T(0));
  auto at = [&](const T* base, int64_t stride, int64_t i, int64_t c) {
    return load_as<V>(base + (i * stride + c) * lanes);
  };
  auto add = [&](int64_t i, int64_t c, V value) {
    T* to = grad + (i * 3 * width + c) * lanes;
    store_as(to, load_as<V>(to) + value);
  };
  for (int64_t i = 0; i < length; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      V delta = V{};
      for (int64_t e = h * dim; e < (h + 1) * dim; ++e) delta += at(go, width, i, e) * at(o, width, i, e);
      const V lse_i = at(m, heads, i, h);
      for (int64_t j = 0; j < length; ++j) {
        V dot = V{}, dp = V{};
        for (int64_t e = h * dim; e < (h + 1) * dim; ++e) {
          dot += at(x, 3 * width, i, e) * at(x, 3 * width, j, width + e);
          dp += at(go, width, i, e) * at(x, 3 * width, j, 2 * width + e);
        }
        const V prob = exp_lanes<T>(dot * scale - lse_i);
        const V ds = prob * (dp - delta) * scale;
        for (int64_t e = h * dim; e < (h + 1) * dim; ++e) {
          add(i, e, ds * at(x, 3 * width, j, width + e));
          add(j, width + e, ds * at(x, 3 * width, i, e));
          add(j, 2 * width + e, prob * at(go, width, i, e));
        }
      }
    }
  scatter_lanes(grad, buckets, count, length, 3 * width,
                [&](int64_t b, int64_t i) { return grad_qkv + rows[starts[b] + i] * 3 * width; });
}

template <typename T>
void forward_kernel(const T* qkv, const int64_t* rows, const int64_t* starts, const int64_t* lengths,
                    int64_t num_buckets, int64_t heads, int64_t dim, T scale, T* out, T* lse) {
  const int64_t width = heads * dim;
  const Routes routes = split_buckets(lengths, num_buckets, width, any2point::kLanes<T>);
  at::parallel_for(0, static_cast<int64_t>(routes.tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [first, count] = routes.tasks[t];
      const int64_t* buckets = routes.shorts.data() + first;
      lanes_forward(qkv, rows, starts, lengths[buckets[0]], buckets, count, heads, dim, scale, out, lse);
    }
  });
  for_each_bucket(routes.long_lengths.data(), static_cast<int64_t>(routes.longs.size()), [&](int64_t n) {
    const int64_t b = routes.longs[n], start = starts[b], length = lengths[b];
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
  const Routes routes = split_buckets(lengths, num_buckets, width, any2point::kLanes<T>);
  at::parallel_for(0, static_cast<int64_t>(routes.tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [first, count] = routes.tasks[t];
      const int64_t* buckets = routes.shorts.data() + first;
      lanes_backward(grad_out, qkv, out, lse, rows, starts, lengths[buckets[0]], buckets, count, heads, dim, scale,
                     grad_qkv);
    }
  });
  for_each_bucket(routes.long_lengths.data(), static_cast<int64_t>(routes.longs.size()), [&](int64_t n) {
    const int64_t b = routes.longs[n], start = starts[b], length = lengths[b];
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
