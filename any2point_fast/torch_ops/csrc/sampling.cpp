// Farthest point sampling on the CPU (loaded by any2point_fast.torch_ops.native): the whole
// greedy loop of every cloud in one call, a cloud per task.
//   farthest_point_sample(xyz [B, P, 3] float32, S) -> [B, S] int64
// Sample 0 is point 0; sample s is the point with the largest squared distance to samples
// 0..s−1, the lowest index on ties. Distances are formed as (dx² + dy²) + dz² with no fused
// multiply-add, the way the reference forms them, so both pick the same points bit for bit.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using V = any2point::Vec<float>;
constexpr int64_t kLanes = any2point::kLanes<float>;

// One cloud: coordinates as three lane-padded arrays, the running minimum distance of every point
// (−inf on the padding, which is then never the farthest).
__attribute__((optimize("fp-contract=off"))) void sample_cloud(const float* xyz, int64_t points, int64_t samples,
                                                                int64_t* picked) {
  const int64_t padded = (points + kLanes - 1) / kLanes * kLanes;
  std::vector<float> x(padded, 0.f), y(padded, 0.f), z(padded, 0.f);
  std::vector<float> nearest(padded, -std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < points; ++i) {
    x[i] = xyz[3 * i];
    y[i] = xyz[3 * i + 1];
    z[i] = xyz[3 * i + 2];
    nearest[i] = std::numeric_limits<float>::infinity();
  }
  int64_t last = 0;
  picked[0] = 0;
  for (int64_t s = 1; s < samples; ++s) {
    const float cx = x[last], cy = y[last], cz = z[last];
    V farthest = V{} - std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < padded; i += kLanes) {
      const V dx = any2point::load_as<V>(&x[i]) - cx;
      const V dy = any2point::load_as<V>(&y[i]) - cy;
      const V dz = any2point::load_as<V>(&z[i]) - cz;
      const V d = (dx * dx + dy * dy) + dz * dz;
      V m = any2point::load_as<V>(&nearest[i]);
      m = d < m ? d : m;
      any2point::store_as(&nearest[i], m);
      farthest = m > farthest ? m : farthest;
    }
    float best = farthest[0];
    for (int64_t l = 1; l < kLanes; ++l) best = farthest[l] > best ? farthest[l] : best;
    int64_t index = 0;
    while (index + 1 < points && !(nearest[index] == best)) ++index;
    last = index;
    picked[s] = last;
  }
}

at::Tensor farthest_point_sample(const at::Tensor& xyz, int64_t samples) {
  TORCH_CHECK(xyz.dim() == 3 && xyz.size(2) == 3 && xyz.scalar_type() == at::kFloat && xyz.is_contiguous() &&
                  xyz.device().is_cpu(),
              "farthest_point_sample: contiguous float32 [B, P, 3] on the CPU");
  const int64_t batch = xyz.size(0), points = xyz.size(1);
  TORCH_CHECK(0 < samples && samples <= points, "farthest_point_sample: cannot sample ", samples, " of ", points,
              " points");
  at::Tensor picked = at::empty({batch, samples}, xyz.options().dtype(at::kLong));
  const float* in = xyz.data_ptr<float>();
  int64_t* out = picked.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b) sample_cloud(in + b * points * 3, points, samples, out + b * samples);
  });
  return picked;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(any2point_native, m) { m.def("farthest_point_sample(Tensor xyz, int samples) -> Tensor"); }

TORCH_LIBRARY_IMPL(any2point_native, CPU, m) { m.impl("farthest_point_sample", &farthest_point_sample); }
