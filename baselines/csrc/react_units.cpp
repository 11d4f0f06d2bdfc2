// Fused CPU kernels for ReActNet's RSign and RPReLU (baselines/layers.py): one pass forward, one pass backward
// with the per-channel gradient reductions in the same pass. Layout: contiguous (N, C, *) with per-channel
// parameters of C elements. Per-element arithmetic follows the eager code operation by operation (build with
// -ffp-contract=off), so values are bit-identical. Each per-channel reduction sums, per (n, c) plane, runs of
// kFlush elements in kLanes interleaved sums of the element type, adds those into double, then sums the planes'
// doubles over n in order: a fixed order, so deterministic for any thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kFlush = 256;
constexpr int64_t kGrainElements = 1 << 15;

struct Planes {
  int64_t n, c, size;  // batch, channels, elements per (n, c) plane
};

Planes planes_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "react_units: expected (N, C, *), got ", x.dim(), " dims");
  int64_t size = 1;
  for (int64_t d = 2; d < x.dim(); ++d) size *= x.size(d);
  return {x.size(0), x.size(1), size};
}

at::Tensor channel_param(const at::Tensor& p, const at::Tensor& x, const char* name) {
  TORCH_CHECK(p.numel() == x.size(1), "react_units: ", name, " has ", p.numel(), " elements for ", x.size(1),
              " channels");
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), "react_units: ", name, " dtype differs from the input's");
  return p.contiguous().view({-1});
}

// Runs body(plane, channel, offset) over all planes, in parallel chunks of about kGrainElements elements.
template <typename Body>
void for_each_plane(const Planes& g, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, g.size));
  at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(p, p % g.c, p * g.size);
  });
}

// Sums per-plane partials (N*C doubles) over n, in order, into a (C,) tensor of x's dtype.
at::Tensor channel_sums(const at::Tensor& partial, const Planes& g, const at::Tensor& like) {
  auto total = at::zeros({g.c}, partial.options());
  const double* part = partial.data_ptr<double>();
  double* tot = total.data_ptr<double>();
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c) tot[c] += part[n * g.c + c];
  return total.to(like.scalar_type());
}

// Sums K per-element values over a plane: f(j, acc, l) handles element j and adds its values to acc[k][l].
// kLanes interleaved sums in the element type (so the loop vectorizes), added into double every kFlush elements.
template <int K, typename T, typename F>
void reduce_plane(int64_t size, double* out, const F& f) {
  double total[K] = {};
  for (int64_t j = 0; j < size;) {
    const int64_t stop = std::min(size, j + kFlush);
    T acc[K][kLanes] = {};
    for (; j + kLanes <= stop; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) f(j + l, acc, l);
    for (; j < stop; ++j) f(j, acc, 0);
    for (int k = 0; k < K; ++k)
      for (int64_t l = 0; l < kLanes; ++l) total[k] += acc[k][l];
  }
  std::copy(total, total + K, out);
}

at::Tensor rsign_forward(const at::Tensor& input, const at::Tensor& bias_in) {
  const auto x = input.contiguous();
  const auto bias = channel_param(bias_in, x, "bias");
  const Planes g = planes_of(x);
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rsign_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_plane(g, [&](int64_t, int64_t c, int64_t off) {
      const scalar_t threshold = -bp[c];  // x >= -b, as the eager torch.ge(x, bias.neg())
      for (int64_t j = off; j < off + g.size; ++j) op[j] = xp[j] >= threshold ? scalar_t(1) : scalar_t(-1);
    });
  });
  return out;
}

// grad_x = grad * max(0, 2 - 2|x + b|) (ApproxSign at x + b); grad_b = grad_x summed over all dims but 1.
std::vector<at::Tensor> rsign_backward(const at::Tensor& grad_in, const at::Tensor& input,
                                       const at::Tensor& bias_in) {
  const auto x = input.contiguous();
  const auto grad = grad_in.contiguous();
  const auto bias = channel_param(bias_in, x, "bias");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "rsign_backward: grad mismatch");
  const Planes g = planes_of(x);
  auto grad_x = at::empty(x.sizes(), x.options());
  auto partial = at::empty({g.n * g.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rsign_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    double* part = partial.data_ptr<double>();
    for_each_plane(g, [&](int64_t p, int64_t c, int64_t off) {
      const scalar_t b = bp[c];
      const scalar_t* xi = xp + off;
      const scalar_t* gi = gp + off;
      scalar_t* gxi = gxp + off;
      reduce_plane<1, scalar_t>(g.size, part + p, [&](int64_t j, scalar_t (*acc)[kLanes], int64_t l) {
        scalar_t v = scalar_t(2) - scalar_t(2) * std::abs(xi[j] + b);  // 2|u| is exact
        v = v < scalar_t(0) ? scalar_t(0) : v;  // clamp(min=0), NaN kept
        const scalar_t r = v * gi[j];
        gxi[j] = r;
        acc[0][l] += r;
      });
    });
  });
  return {grad_x, channel_sums(partial, g, x)};
}

// out = (t if t > 0 else slope * t) + b_out, t = x + b_in.
at::Tensor rprelu_forward(const at::Tensor& input, const at::Tensor& bias_in, const at::Tensor& slope_in,
                          const at::Tensor& bias_out_in) {
  const auto x = input.contiguous();
  const auto b_in = channel_param(bias_in, x, "bias_in");
  const auto slope = channel_param(slope_in, x, "slope");
  const auto b_out = channel_param(bias_out_in, x, "bias_out");
  const Planes g = planes_of(x);
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rprelu_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t *bip = b_in.data_ptr<scalar_t>(), *wp = slope.data_ptr<scalar_t>(),
                   *bop = b_out.data_ptr<scalar_t>();
    for_each_plane(g, [&](int64_t, int64_t c, int64_t off) {
      const scalar_t bi = bip[c], w = wp[c], bo = bop[c];
      for (int64_t j = off; j < off + g.size; ++j) {
        const scalar_t t = xp[j] + bi;
        const scalar_t y = t > scalar_t(0) ? t : w * t;
        op[j] = y + bo;
      }
    });
  });
  return out;
}

// As the eager backward: pos = grad where t > 0 else 0 (threshold_backward), neg = grad - pos,
// grad_t = pos + slope * neg; sums of grad_t (b_in), neg * t (slope) and grad (b_out) per channel.
std::vector<at::Tensor> rprelu_backward(const at::Tensor& grad_in, const at::Tensor& input,
                                        const at::Tensor& bias_in, const at::Tensor& slope_in) {
  const auto x = input.contiguous();
  const auto grad = grad_in.contiguous();
  const auto b_in = channel_param(bias_in, x, "bias_in");
  const auto slope = channel_param(slope_in, x, "slope");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "rprelu_backward: grad mismatch");
  const Planes g = planes_of(x);
  auto grad_x = at::empty(x.sizes(), x.options());
  auto partial = at::empty({3, g.n * g.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rprelu_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t *bip = b_in.data_ptr<scalar_t>(), *wp = slope.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    double* part = partial.data_ptr<double>();
    const int64_t stride = g.n * g.c;
    for_each_plane(g, [&](int64_t p, int64_t c, int64_t off) {
      const scalar_t bi = bip[c], w = wp[c];
      const scalar_t* xi = xp + off;
      const scalar_t* gi = gp + off;
      scalar_t* gxi = gxp + off;
      double sums[3];
      reduce_plane<3, scalar_t>(g.size, sums, [&](int64_t j, scalar_t (*acc)[kLanes], int64_t l) {
        const scalar_t t = xi[j] + bi;
        const scalar_t gr = gi[j];
        const scalar_t pos = t <= scalar_t(0) ? scalar_t(0) : gr;
        const scalar_t neg = gr - pos;
        const scalar_t gt = pos + w * neg;
        gxi[j] = gt;
        acc[0][l] += gt;
        acc[1][l] += neg * t;
        acc[2][l] += gr;
      });
      for (int k = 0; k < 3; ++k) part[k * stride + p] = sums[k];
    });
  });
  return {grad_x, channel_sums(partial[0], g, x), channel_sums(partial[1], g, x), channel_sums(partial[2], g, x)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rsign_forward", &rsign_forward, "RSign forward: +1 where x >= -b else -1");
  m.def("rsign_backward", &rsign_backward, "RSign backward: (grad_x, grad_b)");
  m.def("rprelu_forward", &rprelu_forward, "RPReLU forward");
  m.def("rprelu_backward", &rprelu_backward, "RPReLU backward: (grad_x, grad_b_in, grad_slope, grad_b_out)");
}
