// Pooling of t = x + Attn · W_oᵀ per segment, plus the bias term, on the CPU (loaded by
// any2point_fast.torch_ops.native).
//
// Forward (max + mean) forms, for every segment (sorted positions starts[s] .. starts[s] +
// lengths[s] - 1, view views[s]), the C-wide features t of its items a block of channels at a
// time in registers and writes the pooled row max t + mean t + bias_factor · b_o; per channel it
// keeps the segment-local index of the item holding the maximum, and per segment whether a
// maximum is tied:
// the [T, C] features of a view never exist. Backward (either pooling), all views in one call,
// cloud by cloud, reads every segment's gradient row once and hands it to the items' token rows
// and attention outputs (the mean's share, and each maximum's to its item) and to W_o's and b_o's
// gradients (a view with a tie takes the caller's recompute route for its maxima). Segments are
// bucket_sort's: each a non-empty group of one view, cloud and bucket. With D = 0 (no attention
// term) the features are the rows themselves: segment_pool.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using any2point::for_each_bucket;
using any2point::load_as;
using any2point::scratch;
using any2point::store_as;
using any2point::Vec;

// Vectors of channels formed together: independent chains of adds over e, which then pipeline.
constexpr int64_t kBlock = 4;

// Channels [first, first + n·lanes) as n values of V: Vec<T> (n ≤ kBlock), or T for the last
// channels, one at a time.
template <typename V, int64_t n>
struct Block {
  using type = V;
  static constexpr int64_t size = n;
};

template <typename T, typename Body>
inline void for_each_block(int64_t channels, Body body) {
  constexpr int64_t lanes = any2point::kLanes<T>;
  int64_t c = 0;
  for (; c + kBlock * lanes <= channels; c += kBlock * lanes) body(c, Block<Vec<T>, kBlock>{});
  for (; c + lanes <= channels; c += lanes) body(c, Block<Vec<T>, 1>{});
  for (; c < channels; ++c) body(c, Block<T, 1>{});
}

template <typename T, typename V>
inline bool any_nonzero(const V& v) {
  T lanes[sizeof(V) / sizeof(T)];
  std::memcpy(lanes, &v, sizeof(V));
  return std::any_of(lanes, lanes + sizeof(V) / sizeof(T), [](T value) { return value != T(0); });
}

// Segments a thread takes at a time, in the caller's visiting order.
constexpr int64_t kVisitRun = 32;

// Pooled rows of every segment s (items starts[s] .. starts[s] + lengths[s] - 1, view views[s]),
// a block of channels at a time in registers, the [T, C] features of a view never formed:
// max + mean: max_i t_i + (1/n) Σ_i t_i + bias_factor · b, with t_i = x[tokens[i]] + out[i] W_oᵀ (a
// singleton's row is 2 t + bias_factor · b, an empty segment's bias_factor · b; bias is null
// without a bias: segment_pool). Segments of two or more items (slot ≥ 0) also keep per channel
// the segment-local index of the item holding the maximum, and whether another item ties with it.
// kDim > 0: dim is known at compile time (the recipes' 12), so that the loops over it unroll.
template <typename T, int64_t kDim>
void max_mean_kernel(const T* x, const T* out, const T* wt, const T* bias, const int64_t* tokens,
                     const int64_t* starts, const int64_t* lengths, const int64_t* views, const int64_t* slots,
                     int64_t num_segments, int64_t runtime_dim, int64_t channels, T bias_factor, T* pooled,
                     T* argmax, bool* tied, const int64_t* visit_order) {
  const int64_t dim = kDim > 0 ? kDim : runtime_dim;
  constexpr int64_t line = 64 / sizeof(T);  // values per cache line
  auto visit_segment = [&](int64_t s) {
    const T* w = wt + views[s] * dim * channels;
    const T* bias_row = bias == nullptr ? nullptr : bias + views[s] * channels;
    const int64_t first_item = starts[s], length = lengths[s], slot = slots[s];
    const T inverse = T(1) / T(std::max<int64_t>(length, 1));
    any2point::Vec<T> ties{};  // tie flags summed over the blocks (lane by lane), checked once
    T tail_ties = 0;
    // the items' token rows are scattered: ask for each block's lines one block ahead, and for
    // the first block's now
    for (int64_t i = 0; i < length; ++i)
      for (int64_t c = 0; c < std::min(channels, kBlock * any2point::kLanes<T>); c += line)
        __builtin_prefetch(x + tokens[first_item + i] * channels + c);
    for_each_block<T>(channels, [&](int64_t first, auto block) {
      using V = typename decltype(block)::type;
      constexpr int64_t n = decltype(block)::size, lanes = sizeof(V) / sizeof(T);
      const int64_t ahead = std::min(channels, first + 2 * n * lanes);
      V best[n], arg[n], tie[n], sum[n];
      for (int64_t b = 0; b < n; ++b) {
        best[b] = V{} - T(INFINITY);
        arg[b] = V{};
        tie[b] = V{};
        sum[b] = V{};
      }
      // the features of m consecutive items (m ≤ 2), then their turns at the maxima in order:
      // every vector of W_oᵀ is loaded once for the m items
      auto visit = [&](int64_t i, auto items) {
        constexpr int64_t m = decltype(items)::value;
        V t[m][n];
        const T* o[m];
        for (int64_t j = 0; j < m; ++j) {
          const T* xr = x + tokens[first_item + i + j] * channels;
          for (int64_t c = first + n * lanes; c < ahead; c += line) __builtin_prefetch(xr + c);
          for (int64_t b = 0; b < n; ++b) t[j][b] = load_as<V>(xr + first + b * lanes);
          o[j] = out + (first_item + i + j) * dim;
        }
        for (int64_t e = 0; e < dim; ++e) {
          const T* we = w + e * channels + first;
          for (int64_t b = 0; b < n; ++b) {
            const V wv = load_as<V>(we + b * lanes);
            for (int64_t j = 0; j < m; ++j) t[j][b] += o[j][e] * wv;
          }
        }
        for (int64_t j = 0; j < m; ++j) {
          const V index = V{} + T(i + j);
          for (int64_t b = 0; b < n; ++b) {
            sum[b] += t[j][b];
            const auto above = t[j][b] > best[b];
            tie[b] = above ? V{} : (t[j][b] == best[b] ? V{} + T(1) : tie[b]);
            arg[b] = above ? index : arg[b];
            best[b] = above ? t[j][b] : best[b];
          }
        }
      };
      int64_t i = 0;
      for (; i + 2 <= length; i += 2) visit(i, std::integral_constant<int64_t, 2>{});
      if (i < length) visit(i, std::integral_constant<int64_t, 1>{});
      for (int64_t b = 0; b < n; ++b) {
        V row = length > 0 ? best[b] + sum[b] * inverse : V{};
        if (bias_row != nullptr) row += bias_factor * load_as<V>(bias_row + first + b * lanes);
        store_as(pooled + s * channels + first + b * lanes, row);
      }
      if (slot < 0) return;
      for (int64_t b = 0; b < n; ++b) {
        store_as(argmax + slot * channels + first + b * lanes, arg[b]);
        if constexpr (std::is_same_v<V, T>)
          tail_ties += tie[b];
        else
          ties += tie[b];
      }
    });
    if (slot >= 0) tied[slot] = tail_ties != T(0) || any_nonzero<T>(ties);
  };
  // segments in the caller's order, a run of kVisitRun at a time per thread: the items of one
  // cloud's segments of every view, visited together, read its token rows from memory once
  any2point::for_each_claimed(visit_order, num_segments, kVisitRun, visit_segment);
}

// The items' grad_out rows are summed in this many buffers, by channel: in short segments,
// consecutive channels mostly hit the same item, and one buffer would chain their adds.
constexpr int64_t kOutBuffers = 8;

// Segment s's share of grad_x, item by item (each row read and written once, in order): the
// linear part's weight · g, and, with a maximum (a non-null), g at the channels whose maximum
// the item holds, a SIMD vector of channels at a time; added to the rows (kAdd), or written.
template <typename T, bool kAdd>
inline void add_to_rows(const T* g, T weight, const T* a, const int64_t* tokens, int64_t start, int64_t length,
                        int64_t channels, T* grad_x) {
  using V = any2point::Vec<T>;
  constexpr int64_t lanes = any2point::kLanes<T>;
  const int64_t full = channels / lanes * lanes;
  for (int64_t i = 0; i < length; ++i) {
    T* row = grad_x + tokens[start + i] * channels;
    const V index = V{} + T(i);
    for (int64_t c = 0; c < full; c += lanes) {
      const V gv = load_as<V>(g + c);
      V value = weight * gv;
      if (a != nullptr) value += load_as<V>(a + c) == index ? gv : V{};
      store_as(row + c, kAdd ? load_as<V>(row + c) + value : value);
    }
    for (int64_t c = full; c < channels; ++c)
      row[c] = (kAdd ? row[c] : T(0)) + weight * g[c] + (a != nullptr && a[c] == T(i) ? g[c] : T(0));
  }
}

// Segment s's linear part: lin_grad = g W_o ([D], from wt = W_oᵀ [D, C]), and g ⊗ linear[s] added to
// gwt ([D + 1, C]: W_o's and the bias column's gradient, transposed), a SIMD vector of channels at a
// time: g is read once for both, and the D dot products are independent chains.
template <typename T, int64_t kDim>
inline void linear_part(const T* g, const T* wt, const T* lin, int64_t runtime_dim, int64_t channels, T* lin_grad,
                        T* gwt) {
  using V = any2point::Vec<T>;
  constexpr int64_t lanes = any2point::kLanes<T>;
  const int64_t dim = kDim > 0 ? kDim : runtime_dim, full = channels / lanes * lanes;
  if constexpr (kDim > 0) {
    V acc[kDim];
    for (int64_t e = 0; e < kDim; ++e) acc[e] = V{};
    for (int64_t c = 0; c < full; c += lanes) {
      const V gv = load_as<V>(g + c);
      for (int64_t e = 0; e < kDim; ++e) acc[e] += gv * load_as<V>(wt + e * channels + c);
      for (int64_t e = 0; e <= kDim; ++e) {
        T* to = gwt + e * channels + c;
        store_as(to, load_as<V>(to) + lin[e] * gv);
      }
    }
    for (int64_t e = 0; e < kDim; ++e) {
      T total = any2point::lane_sum<T>(acc[e]);
      for (int64_t c = full; c < channels; ++c) total += g[c] * wt[e * channels + c];
      lin_grad[e] = total;
    }
    for (int64_t e = 0; e <= kDim; ++e)
      for (int64_t c = full; c < channels; ++c) gwt[e * channels + c] += lin[e] * g[c];
    return;
  }
  for (int64_t e = 0; e < dim; ++e) {
    const T* row = wt + e * channels;
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < channels; ++c) total += g[c] * row[c];
    lin_grad[e] = total;
  }
  for (int64_t e = 0; e <= dim; ++e) {
    T* row = gwt + e * channels;
    const T factor = lin[e];
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) row[c] += factor * g[c];
  }
}

// The gradient through the pooled rows of every view, pooled = weight · Σ t + max t (where the
// segment has a maximum) with t = x + out W_oᵀ + the bias term (segment s: items starts[s] ..
// starts[s] + lengths[s] - 1, view views[s]), given grad, the rows' gradients [S, C], and linear
// [S, D + 1], the forward's weight · Σ out with the bias factor last (W_o is w [M, C, D] and wt
// [M, D, C]):
//   grad_x[token]  = Σ over its items of weight · g + g at the channels whose maximum the item holds;
//   grad_out[item] = weight · g W_o + Σ over those channels of g[c] W_o[c];
//   grad_w [M, C, D + 1] = Σ_s g ⊗ linear[s] + Σ over the maxima of g[c] out[item] (W_o's, then b_o's).
// Every segment's row g is read once for all three. The segments of two or more items, in
// segment order, have rows in argmax [K, C]; those of a view v have maxima where has_max[v].
// Segments go in visit_order, cut into runs at run_offsets: no token has items in two runs (runs
// of whole clouds), and in a run a token's first item is of view 0, which writes its grad_x row
// (no zero fill) and the other views add to it; a run's rows then stay in cache across views.
// Each run sums its part of grad_w in its own buffers, added in run order: the result does not
// depend on which thread took which run. Without an attention term (dim 0: segment_pool) only
// grad_x remains.
// kDim > 0: dim is known at compile time (the recipes' 12), so that the loops over it unroll.
template <typename T, int64_t kDim>
void backward_kernel(const T* grad, const T* weights, const T* linear, const T* argmax, const int64_t* slots,
                     const T* out, const T* w, const T* wt, const int64_t* tokens, const int64_t* starts,
                     const int64_t* lengths, const int64_t* views, const int64_t* visit_order,
                     const int64_t* run_offsets, int64_t runs, int64_t num_views, int64_t runtime_dim,
                     int64_t channels, T* grad_x, T* grad_out, T* grad_w) {
  const int64_t dim = kDim > 0 ? kDim : runtime_dim, width = dim + 1;
  std::vector<int64_t> run_sizes(runs);
  for (int64_t r = 0; r < runs; ++r) run_sizes[r] = run_offsets[r + 1] - run_offsets[r];
  // per run and view: the maxima's share of W_o's gradient [C, D], and the linear part's [D + 1, C]
  const int64_t per_view = channels * dim + width * channels, per_run = num_views * per_view;
  auto partial = scratch<T>(runs * per_run).zero_();
  T* partials = partial.template data_ptr<T>();
  for_each_bucket(run_sizes.data(), runs, [&](int64_t r) {
    if (run_sizes[r] == 0) return;
    int64_t longest = 0;
    for (int64_t j = run_offsets[r]; j < run_offsets[r + 1]; ++j) longest = std::max(longest, lengths[visit_order[j]]);
    const auto buffer = scratch<T>(kOutBuffers * longest * dim + dim);
    T* lin_grad = buffer.template data_ptr<T>();
    T* local = lin_grad + dim;
    for (int64_t j = run_offsets[r]; j < run_offsets[r + 1]; ++j) {
      const int64_t s = visit_order[j], v = views[s], length = lengths[s], start = starts[s], slot = slots[s];
      T* gw = partials + r * per_run + v * per_view;
      T* gwt = gw + channels * dim;
      const T* wv = w + v * channels * dim;
      const T* g = grad + s * channels;
      const T* a = slot >= 0 ? argmax + slot * channels : nullptr;
      const T weight = weights[s];
      (v > 0 ? add_to_rows<T, true> : add_to_rows<T, false>)(g, weight, a, tokens, start, length, channels, grad_x);
      if (dim == 0) continue;
      linear_part<T, kDim>(g, wt + v * dim * channels, linear + s * width, dim, channels, lin_grad, gwt);
      if (a == nullptr) {
        for (int64_t i = 0; i < length; ++i)
          for (int64_t e = 0; e < dim; ++e) grad_out[(start + i) * dim + e] = weight * lin_grad[e];
        continue;
      }
      std::fill(local, local + kOutBuffers * length * dim, T(0));
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = static_cast<int64_t>(a[c]);
        const T gc = g[c];
        T* go = local + ((c % kOutBuffers) * length + i) * dim;
        const T* wc = wv + c * dim;
        const T* o = out + (start + i) * dim;
        T* gwc = gw + c * dim;
#pragma omp simd
        for (int64_t e = 0; e < dim; ++e) {
          go[e] += gc * wc[e];
          gwc[e] += gc * o[e];
        }
      }
      for (int64_t i = 0; i < length; ++i) {
        T* go = grad_out + (start + i) * dim;
        for (int64_t e = 0; e < dim; ++e) {
          T value = weight * lin_grad[e];
          for (int64_t q = 0; q < kOutBuffers; ++q) value += local[(q * length + i) * dim + e];
          go[e] = value;
        }
      }
    }
  });
  // the runs' partials, summed in run order for every element (channels in parallel)
  at::parallel_for(0, num_views * channels, 64, [&](int64_t begin, int64_t end) {
    for (int64_t vc = begin; vc < end; ++vc) {
      const int64_t v = vc / channels, c = vc % channels;
      T* to = grad_w + vc * width;
      for (int64_t r = 0; r < runs; ++r) {
        const T* gw = partials + r * per_run + v * per_view;
        const T* gwt = gw + channels * dim;
        for (int64_t e = 0; e < dim; ++e) to[e] += gw[c * dim + e] + gwt[e * channels + c];
        to[dim] += gwt[dim * channels + c];
      }
    }
  });
}

// The row of argmax [K, C] of every segment of two or more items, in segment order (K of them), or
// -1; where uses is given, also -1 for the segments of the views v without uses[v] (their rows still
// count). Also checks that item indices are exact in float32.
struct MaxSlots {
  std::vector<int64_t> slots;
  int64_t count = 0;
};

inline MaxSlots max_slots(const int64_t* lengths, int64_t num_segments, const int64_t* views = nullptr,
                          const bool* uses = nullptr) {
  MaxSlots result{std::vector<int64_t>(num_segments, -1)};
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(lengths[s] < (int64_t(1) << 24),
                "a segment of 2^24 items or more: its item indices are not exact in float32");
    if (lengths[s] < 2) continue;
    if (uses == nullptr || uses[views[s]]) result.slots[s] = result.count;
    ++result.count;
  }
  return result;
}

// (pooled [S, C], argmax [K, C] (the segment-local index of the item holding every maximum, in
// x's dtype), tied [K] (bool)) of the S segments under max + mean; the K segments of two or more
// items, in segment order, have maxima. wt is [M, D, C], W_oᵀ of every view; bias [M, C] or empty;
// visit_order [S] a permutation of the segments, the order to visit them in (a cloud's segments of
// every view together: its token rows then stay in cache).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bucket_pool(const at::Tensor& x, const at::Tensor& out,
                                                           const at::Tensor& wt, const at::Tensor& bias,
                                                           const at::Tensor& tokens, const at::Tensor& starts,
                                                           const at::Tensor& lengths, const at::Tensor& views,
                                                           double bias_factor, const at::Tensor& visit_order) {
  any2point::check_values(x, {&x, &out, &wt, &bias});
  any2point::check_indices({&tokens, &starts, &lengths, &views, &visit_order});
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && wt.dim() == 3 && wt.size(1) == out.size(1) && wt.size(2) == x.size(1),
              "x [R, C], out [T, D], wt [M, D, C]");
  const int64_t num_segments = starts.numel(), channels = x.size(1), dim = out.size(1);
  TORCH_CHECK(lengths.numel() == num_segments && views.numel() == num_segments && visit_order.numel() == num_segments,
              "one start, length, view and place in the visiting order per segment");
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 2 && bias.size(0) == wt.size(0) && bias.size(1) == channels),
              "bias [M, C] or empty");
  const MaxSlots maxima = max_slots(lengths.data_ptr<int64_t>(), num_segments);
  const int64_t num_max = maxima.count;
  auto pooled = at::empty({num_segments, channels}, x.options());
  auto argmax = at::empty({num_max, channels}, x.options());
  auto tied = at::empty({num_max}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bucket_pool", [&] {
    const auto kernel = dim == 12 ? max_mean_kernel<scalar_t, 12> : max_mean_kernel<scalar_t, 0>;
    kernel(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(),
           bias.numel() == 0 ? nullptr : bias.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(),
           starts.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), views.data_ptr<int64_t>(), maxima.slots.data(),
           num_segments, dim, channels, static_cast<scalar_t>(bias_factor), pooled.data_ptr<scalar_t>(),
           argmax.data_ptr<scalar_t>(), tied.data_ptr<bool>(), visit_order.data_ptr<int64_t>());
  });
  return {pooled, argmax, tied};
}

// The gradient through the pooled rows of every view (see backward_kernel): writes grad_x [R, C]
// (every row: each token must have an item in view 0) and grad_out [T, D], and returns that of
// [W_o | b_o] ([M, C, D + 1]; W_o is w [M, C, D], and wt [M, D, C]). argmax [K, C] lists the maxima
// of the segments of two or more items (empty: none), has_max [M] the views whose maxima to use
// (mean, or a tie: none); visit_order [S] and run_offsets [runs + 1] order the segments and cut
// them into runs of whole clouds.
at::Tensor bucket_pool_backward(const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& linear,
                                const at::Tensor& argmax, const at::Tensor& has_max, const at::Tensor& out,
                                const at::Tensor& w, const at::Tensor& wt, const at::Tensor& tokens,
                                const at::Tensor& starts, const at::Tensor& lengths, const at::Tensor& views,
                                const at::Tensor& visit_order, const at::Tensor& run_offsets, at::Tensor grad_x,
                                at::Tensor grad_out) {
  any2point::check_values(grad_x, {&grad, &weights, &linear, &argmax, &out, &w, &wt, &grad_x, &grad_out});
  any2point::check_indices({&tokens, &starts, &lengths, &views, &visit_order, &run_offsets});
  const int64_t num_segments = starts.numel(), channels = grad_x.size(1), dim = out.size(1), num_views = w.size(0);
  TORCH_CHECK(lengths.numel() == num_segments && views.numel() == num_segments && visit_order.numel() == num_segments &&
                  weights.numel() == num_segments && grad.dim() == 2 && grad.size(0) == num_segments &&
                  grad.size(1) == channels && linear.dim() == 2 && linear.size(0) == num_segments &&
                  linear.size(1) == dim + 1 && w.dim() == 3 && w.size(1) == channels && w.size(2) == dim &&
                  wt.dim() == 3 && wt.size(0) == num_views && wt.size(1) == dim && wt.size(2) == channels &&
                  grad_out.sizes() == out.sizes() && run_offsets.numel() >= 1 &&
                  has_max.scalar_type() == at::kBool && has_max.numel() == num_views && has_max.is_contiguous(),
              "grad [S, C], weights [S], linear [S, D + 1], out and grad_out [T, D], w [M, C, D], wt [M, D, C], "
              "has_max [M] bool, one length, view and place in the visiting order per segment");
  any2point::check_offsets(run_offsets, num_segments, "run_offsets");
  const int64_t* length = lengths.data_ptr<int64_t>();
  MaxSlots maxima = max_slots(length, num_segments, views.data_ptr<int64_t>(), has_max.data_ptr<bool>());
  TORCH_CHECK(argmax.numel() == 0 ||
                  (argmax.dim() == 2 && argmax.size(0) == maxima.count && argmax.size(1) == channels),
              "argmax [K, C]: a row per segment of two or more items, or empty");
  if (argmax.numel() == 0) std::fill(maxima.slots.begin(), maxima.slots.end(), -1);  // no maxima at all
  auto grad_w = at::zeros({num_views, channels, dim + 1}, grad_x.options());
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "bucket_pool_backward", [&] {
    const auto kernel = dim == 12 ? backward_kernel<scalar_t, 12> : backward_kernel<scalar_t, 0>;
    kernel(grad.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), linear.data_ptr<scalar_t>(),
           argmax.data_ptr<scalar_t>(), maxima.slots.data(), out.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
           wt.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), length,
           views.data_ptr<int64_t>(), visit_order.data_ptr<int64_t>(), run_offsets.data_ptr<int64_t>(),
           run_offsets.numel() - 1, num_views, dim, channels, grad_x.data_ptr<scalar_t>(),
           grad_out.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>());
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(any2point_native, m) {
  m.def("bucket_pool(Tensor x, Tensor out, Tensor wt, Tensor bias, Tensor tokens, Tensor starts, Tensor lengths, "
        "Tensor views, float bias_factor, Tensor visit_order) -> (Tensor, Tensor, Tensor)");
  m.def("bucket_pool_backward(Tensor grad, Tensor weights, Tensor linear, Tensor argmax, Tensor has_max, Tensor out, "
        "Tensor w, Tensor wt, Tensor tokens, Tensor starts, Tensor lengths, Tensor views, Tensor visit_order, "
        "Tensor run_offsets, Tensor(a!) grad_x, Tensor(b!) grad_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) {
  m.impl("bucket_pool", &bucket_pool);
  m.impl("bucket_pool_backward", &bucket_pool_backward);
}
