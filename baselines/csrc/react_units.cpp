// Fused CPU kernels for ReActNet's RSign and RPReLU (baselines/layers.py): one pass forward, one pass backward
// with the per-channel gradient reductions in the same pass. Layout: contiguous (N, C, *) with per-channel
// parameters of C elements. Per-element arithmetic follows the eager code operation by operation (build with
// -ffp-contract=off), so values are bit-identical; the backward loops are written in 16-byte vectors (GCC/Clang
// vector extensions), the same math on vectors and scalars. Each per-channel reduction sums, per (n, c) plane,
// runs of kFlush elements in interleaved lanes of the element type, adds their pairwise sum into double, then
// sums the planes' doubles over n in order: a fixed order, so deterministic for any thread count.
// RPReLU optionally takes a residual r and computes RPReLU(x + tile(r)) (the block's shortcut sum, without
// materialising it): r is (N, C / tiles, *), repeated `tiles` times along channels, as Residual's eager sum.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace {

constexpr int64_t kFlush = 256;
constexpr int64_t kGrainElements = 1 << 15;

struct Planes {
  int64_t n, c, size;  // batch, channels, elements per (n, c) plane

  int64_t offset(int64_t n_, int64_t c_) const { return (n_ * c + c_) * size; }
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

// Runs body(n, c, offset) over all planes in memory order, in parallel chunks of ~kGrainElements. The indices
// are stepped, not divided out per plane: a 64-bit division costs as much as a 4x4 plane's work.
template <typename Body>
void for_each_plane(const Planes& g, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, g.size));
  at::parallel_for(0, g.n * g.c, grain, [&](int64_t begin, int64_t end) {
    int64_t n = begin / g.c, c = begin % g.c;
    for (int64_t p = begin; p < end; ++p) {
      body(n, c, p * g.size);
      if (++c == g.c) {
        c = 0;
        ++n;
      }
    }
  });
}

// 16-byte vectors of T (GCC/Clang vector extensions: SSE on x86-64, NEON on ARM), and loads, stores and
// broadcasts that do the same on plain scalars, so per-element math is written once for both.
template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(16)));
  static constexpr int64_t kWidth = 16 / sizeof(T);
};

template <typename X, typename T>
X load(const T* p) {
  X v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename X, typename T>
void store(T* p, const X& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename X, typename T>
X splat(T s) {
  if constexpr (std::is_same_v<X, T>) {
    return s;
  } else {
    return X{} + s;
  }
}

// |v| by clearing the sign bit, exactly as std::abs (NaN and -0.0 included), for scalars and vectors.
template <typename X>
X magnitude(const X& v) {
  if constexpr (std::is_floating_point_v<X>) {
    return std::abs(v);
  } else {
    using Bits = decltype(v < v);  // the integer vector of the same shape
    const X negative_zero = -X{};  // only the sign bits set
    Bits bits, sign;
    std::memcpy(&bits, &v, sizeof v);
    std::memcpy(&sign, &negative_zero, sizeof v);
    bits &= ~sign;
    X out;
    std::memcpy(&out, &bits, sizeof v);
    return out;
  }
}

// Sums K per-element values over a plane: step(j, vals) computes the K values of the elements from j, one
// vector's worth when vals points to vectors, one element when it points to scalars (the tail). Each sum runs in
// two vectors of interleaved lanes (8 float / 4 double lanes: few enough registers for K = 3), flushed pairwise
// into double with the tail every kFlush elements. out[k * stride] = the sums.
template <int K, typename T, typename Step>
void reduce_plane(int64_t size, double* out, int64_t stride, const Step& step) {
  using V = typename Simd<T>::vec;
  constexpr int64_t W = Simd<T>::kWidth;
  double total[K] = {};
  for (int64_t j = 0; j < size;) {
    const int64_t stop = std::min(size, j + kFlush);
    V acc[K][2] = {};
    T tail[K] = {};
    for (; j + 2 * W <= stop; j += 2 * W) {
      V a[K], b[K];
      step(j, a);
      step(j + W, b);
      for (int k = 0; k < K; ++k) {
        acc[k][0] += a[k];
        acc[k][1] += b[k];
      }
    }
    for (; j < stop; ++j) {
      T v[K];
      step(j, v);
      for (int k = 0; k < K; ++k) tail[k] += v[k];
    }
    for (int k = 0; k < K; ++k) {
      const V v = acc[k][0] + acc[k][1];
      T h = v[0] + v[1];
      if constexpr (W == 4) h = (v[0] + v[2]) + (v[1] + v[3]);
      total[k] += h + tail[k];
    }
  }
  for (int k = 0; k < K; ++k) out[k * stride] = total[k];
}

// Sums per-plane partials (K, N*C doubles) over n, in order, into K (C,) tensors of x's dtype.
std::vector<at::Tensor> channel_sums(const at::Tensor& partial, const Planes& g, const at::Tensor& like) {
  const int64_t K = partial.size(0);
  auto total = at::zeros({K, g.c}, partial.options());
  const double* part = partial.data_ptr<double>();
  double* tot = total.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t c = 0; c < g.c; ++c) tot[k * g.c + c] += part[(k * g.n + n) * g.c + c];
  auto cast = total.to(like.scalar_type());
  std::vector<at::Tensor> out;
  for (int64_t k = 0; k < K; ++k) out.push_back(cast[k]);
  return out;
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
  auto partial = at::empty({1, g.n * g.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rsign_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    double* part = partial.data_ptr<double>();
    for_each_plane(g, [&](int64_t n, int64_t c, int64_t off) {
      const scalar_t b = bp[c];
      const scalar_t *xi = xp + off, *gi = gp + off;
      scalar_t* gxi = gxp + off;
      reduce_plane<1, scalar_t>(g.size, part + n * g.c + c, 0, [&](int64_t j, auto* sums) {
        using X = std::remove_pointer_t<decltype(sums)>;  // a vector or one scalar_t
        const X two = splat<X>(scalar_t(2)), zero = splat<X>(scalar_t(0));
        X v = two - two * magnitude(load<X>(xi + j) + splat<X>(b));  // 2|u| is exact
        v = v < zero ? zero : v;  // clamp(min=0), NaN kept
        const X r = v * load<X>(gi + j);
        store(gxi + j, r);
        sums[0] = r;
      });
    });
  });
  return {grad_x, channel_sums(partial, g, x)[0]};
}

// The residual of RPReLU(x + tile(r)): r's channel for x's channel c is c % (C / tiles).
struct Residual {
  at::Tensor r;  // contiguous, or undefined when there is none
  int64_t tiles = 1, c = 0;  // r's channels

  Residual(const c10::optional<at::Tensor>& residual, int64_t tiles_in, const at::Tensor& x) : tiles(tiles_in) {
    if (!residual.has_value() || !residual->defined()) return;
    TORCH_CHECK(tiles >= 1 && x.size(1) % tiles == 0, "react_units: ", x.size(1), " channels are not ", tiles,
                " tiles");
    r = residual->contiguous();
    c = x.size(1) / tiles;
    auto want = x.sizes().vec();
    want[1] = c;
    TORCH_CHECK(r.sizes() == at::IntArrayRef(want) && r.scalar_type() == x.scalar_type(),
                "react_units: residual ", r.sizes(), " does not tile ", tiles, " times to ", x.sizes());
  }
  bool defined() const { return r.defined(); }
  // Offset of r's plane for x's plane (n, c_) (x has g.c channels).
  int64_t offset(int64_t n, int64_t c_, const Planes& g) const { return (n * c + c_ % c) * g.size; }
};

// t = x + b_in, or (x + r) + b_in with a residual: the eager order, the block's sum first, then the shift; for
// the element at j (X a scalar) or the vector from j. The residual's presence is a compile-time flag, so no loop
// tests it per element.
template <bool kResidual, typename X, typename T>
X shifted(const T* x, const T* r, int64_t j, T bi) {
  X u = load<X>(x + j);
  if constexpr (kResidual) u = u + load<X>(r + j);
  return u + splat<X>(bi);
}

// Calls body(std::bool_constant<has>{}), so the body is compiled once with and once without a residual.
template <typename Body>
void with_residual_flag(bool has, const Body& body) {
  if (has) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// out = (t if t > 0 else slope * t) + b_out, t = x (+ tile(residual)) + b_in.
at::Tensor rprelu_forward(const at::Tensor& input, const at::Tensor& bias_in, const at::Tensor& slope_in,
                          const at::Tensor& bias_out_in, const c10::optional<at::Tensor>& residual,
                          int64_t tiles) {
  const auto x = input.contiguous();
  const auto b_in = channel_param(bias_in, x, "bias_in");
  const auto slope = channel_param(slope_in, x, "slope");
  const auto b_out = channel_param(bias_out_in, x, "bias_out");
  const Planes g = planes_of(x);
  const Residual res(residual, tiles, x);
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rprelu_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.r.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t *bip = b_in.data_ptr<scalar_t>(), *wp = slope.data_ptr<scalar_t>(),
                   *bop = b_out.data_ptr<scalar_t>();
    with_residual_flag(rp != nullptr, [&](auto has_residual) {
      for_each_plane(g, [&](int64_t n, int64_t c, int64_t off) {
        const scalar_t bi = bip[c], w = wp[c], bo = bop[c];
        const scalar_t* xi = xp + off;
        const scalar_t* ri = rp ? rp + res.offset(n, c, g) : nullptr;
        scalar_t* o = op + off;
        for (int64_t j = 0; j < g.size; ++j) {
          const scalar_t t = shifted<decltype(has_residual)::value, scalar_t>(xi, ri, j, bi);
          const scalar_t y = t > scalar_t(0) ? t : w * t;
          o[j] = y + bo;
        }
      });
    });
  });
  return out;
}

// As the eager backward: pos = grad where t > 0 else 0 (threshold_backward), neg = grad - pos,
// grad_t = pos + slope * neg; sums of grad_t (b_in), neg * t (slope) and grad (b_out) per channel. With a tiled
// residual (tiles > 1) also grad_r, the sum of grad_t over the tiles in tile order (with tiles = 1, grad_r is
// grad_x itself, and an undefined tensor is returned in its place).
std::vector<at::Tensor> rprelu_backward(const at::Tensor& grad_in, const at::Tensor& input,
                                        const at::Tensor& bias_in, const at::Tensor& slope_in,
                                        const c10::optional<at::Tensor>& residual, int64_t tiles) {
  const auto x = input.contiguous();
  const auto grad = grad_in.contiguous();
  const auto b_in = channel_param(bias_in, x, "bias_in");
  const auto slope = channel_param(slope_in, x, "slope");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "rprelu_backward: grad mismatch");
  const Planes g = planes_of(x);
  const Residual res(residual, tiles, x);
  auto grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_r;
  if (res.defined() && res.tiles > 1) grad_r = at::empty(res.r.sizes(), x.options());
  auto partial = at::empty({3, g.n * g.c}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rprelu_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.r.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t *bip = b_in.data_ptr<scalar_t>(), *wp = slope.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* grp = grad_r.defined() ? grad_r.data_ptr<scalar_t>() : nullptr;
    double* part = partial.data_ptr<double>();
    with_residual_flag(rp != nullptr, [&](auto has_residual) {
      const auto plane = [&](int64_t n, int64_t c) {  // grad_x and the three partial sums of plane (n, c)
        const int64_t p = n * g.c + c, off = p * g.size;
        const scalar_t bi = bip[c], w = wp[c];
        const scalar_t *xi = xp + off, *gi = gp + off;
        const scalar_t* ri = rp ? rp + res.offset(n, c, g) : nullptr;
        scalar_t* gxi = gxp + off;
        reduce_plane<3, scalar_t>(g.size, part + p, g.n * g.c, [&](int64_t j, auto* sums) {
          using X = std::remove_pointer_t<decltype(sums)>;  // a vector or one scalar_t
          const X zero = splat<X>(scalar_t(0));
          const X t = shifted<decltype(has_residual)::value, X>(xi, ri, j, bi);
          const X gr = load<X>(gi + j);
          const X pos = t <= zero ? zero : gr;
          const X neg = gr - pos;
          const X gt = pos + splat<X>(w) * neg;
          store(gxi + j, gt);
          sums[0] = gt;
          sums[1] = neg * t;
          sums[2] = gr;
        });
      };
      if (grp == nullptr) {
        for_each_plane(g, [&](int64_t n, int64_t c, int64_t) { plane(n, c); });
        return;
      }
      // Tiled residual: planes in memory order, parallel over n so that one thread writes each grad_r plane
      // (n, c'): tile 0's grad_t copied, then each later tile's added, in tile order.
      at::parallel_for(0, g.n, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, g.c * g.size)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t c = 0; c < g.c; ++c) {
            plane(n, c);
            const scalar_t* gxi = gxp + g.offset(n, c);
            scalar_t* gri = grp + res.offset(n, c, g);
            if (c < res.c) {
              std::copy(gxi, gxi + g.size, gri);
            } else {
              for (int64_t j = 0; j < g.size; ++j) gri[j] += gxi[j];
            }
          }
        }
      });
    });
  });
  auto sums = channel_sums(partial, g, x);
  return {grad_x, sums[0], sums[1], sums[2], grad_r};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rsign_forward", &rsign_forward, "RSign forward: +1 where x >= -b else -1");
  m.def("rsign_backward", &rsign_backward, "RSign backward: (grad_x, grad_b)");
  m.def("rprelu_forward", &rprelu_forward, "RPReLU forward of x (+ tiled residual)", py::arg("x"),
        py::arg("bias_in"), py::arg("slope"), py::arg("bias_out"), py::arg("residual") = py::none(),
        py::arg("tiles") = 1);
  m.def("rprelu_backward", &rprelu_backward,
        "RPReLU backward: (grad_x, grad_b_in, grad_slope, grad_b_out, grad_residual if tiles > 1)", py::arg("grad"),
        py::arg("x"), py::arg("bias_in"), py::arg("slope"), py::arg("residual") = py::none(), py::arg("tiles") = 1);
}
