// Helpers shared by the compiled kernels of any2point_fast.torch_ops.native.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace any2point {

// Calls body(order[i]) for every i < n, each thread claiming the next `run` of them when it is free.
template <typename Body>
inline void for_each_claimed(const int64_t* order, int64_t n, int64_t run, Body body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(run); i < n; i = next.fetch_add(run))
      for (int64_t j = i; j < std::min(n, i + run); ++j) body(order[j]);
  });
}

// Calls body(b) for every bucket b < num_buckets, the longest first, each thread taking the next
// bucket when it is free (bucket lengths vary by orders of magnitude).
template <typename Body>
inline void for_each_bucket(const int64_t* lengths, int64_t num_buckets, Body body) {
  std::vector<int64_t> order(num_buckets);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  for_each_claimed(order.data(), num_buckets, 1, body);
}

// e^x for float32, vectorizable: Cody-Waite reduction and a degree-6 polynomial (relative error
// under 2e-7 where it is used, x ≤ 0); below -87.3 it returns 0.
inline float exp_approx(float x) {
  x = std::max(x, -87.3f);
  x = std::min(x, 88.0f);
  const float shifted = std::fma(x, 1.44269504088896341f, 12582912.0f);  // 1.5·2^23: rounds to an integer
  const float n = shifted - 12582912.0f;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.0f);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

// Scratch buffers come from ATen's allocator, so that memory profiles see them (bucket_attention's
// small per-thread buffers excepted: see its thread_buffer).
template <typename T>
at::Tensor scratch(int64_t size) {
  return at::empty({size}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// SIMD registers of T as GCC/Clang vector types, which the compiler maps to what the CPU has.
template <typename T>
struct Simd {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename Simd<T>::type;
template <typename T>
constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);

// One value of V (a Vec, or a scalar) at p. Load and store values one at a time, not whole
// arrays of them, so that the compiler keeps them in registers.
template <typename V, typename T>
inline V load_as(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store_as(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The sum of a vector's lanes, first to last.
template <typename T>
inline T lane_sum(const Vec<T>& v) {
  T sum = 0;
  for (int64_t l = 0; l < kLanes<T>; ++l) sum += v[l];
  return sum;
}

// Checks shared by the kernels' entry points.
inline void check_indices(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(), "int64 contiguous 1-D indices");
}

// offsets [n + 1]: from 0 to total, non-decreasing.
inline void check_offsets(const at::Tensor& offsets, int64_t total, const char* what) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t n = offsets.numel() - 1;
  TORCH_CHECK(n >= 0 && o[0] == 0 && o[n] == total && std::is_sorted(o, o + n + 1), what,
              ": non-decreasing from 0 to ", total);
}

inline void check_values(const at::Tensor& like, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == like.scalar_type() && t->device().is_cpu(),
                "contiguous CPU tensors of one floating dtype");
}

}  // namespace any2point
