// CPU kernel of calexnet_fast::max_pool2d: max pooling of a contiguous (NCHW) map, the stem pool of the
// frozen stages' inference form (calexnet_fast.backbones.InferenceMaxPool2d).
//
// Semantics (the twin calexnet_fast.reference.max_pool2d_reference is the specification): torch's
// max_pool2d(x, (kernel_h, kernel_w), (stride_h, stride_w), (padding_h, padding_w)) with dilation 1 and floor
// mode: output size (H + 2 padding - kernel) / stride + 1 per side, windows clipped to the map (padding never
// wins), a NaN in a window propagates. PyTorch's own NCHW CPU kernel for this takes ~5 ms on the stem map of
// ResNet-18 at 32x32, batch 64 (2 threads); pooling in channels_last, ~0.9 ms with the two layout copies.
// Here each output row is the max over the window's input rows, then over each window's columns of that row
// max (padded with -inf), both in 16-byte vectors without branches, in one pass over the map.
#include "pool_cpu.h"

#include <limits>
#include <type_traits>
#include <vector>

namespace calexnet_fast {
namespace {

// As torch: the later value when it is larger or NaN (a NaN, once taken, stays). For one value, and lane by
// lane for 16-byte vectors (GCC/Clang vector extensions: compares and a select, no branches).
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename V>
inline V nan_max_lanes(V a, V b) {
  return ((b > a) | (b != b)) ? b : a;
}

template <typename T>
struct Lanes {
  static constexpr int kLanes = 16 / sizeof(T);
  typedef T vec __attribute__((vector_size(16)));
  typedef T uvec __attribute__((vector_size(16), aligned(alignof(T))));  // for unaligned loads and stores
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index_t;
  typedef index_t ivec __attribute__((vector_size(16)));

  static vec load(const T* p) { return *reinterpret_cast<const uvec*>(p); }
  static void store(T* p, vec v) { *reinterpret_cast<uvec*>(p) = v; }
  // The even elements of p[0, 2 * kLanes): p[0], p[2], ...
  static vec even(const T* p) {
    ivec mask;
    for (int i = 0; i < kLanes; ++i) mask[i] = 2 * i;
    return __builtin_shuffle(load(p), load(p + kLanes), mask);
  }
};

// out[ox] = max over the kw taps of row[ox * stride + t] (the row padded with -inf, and readable 2 * kLanes
// elements past its last tap): vectors of outputs for strides 1 and 2, one output at a time otherwise.
template <typename T>
inline void column_taps(const T* row, int64_t OW, int64_t kw, int64_t stride, T* out) {
  using L = Lanes<T>;
  int64_t ox = 0;
  if (stride <= 2) {
    for (; ox + L::kLanes <= OW; ox += L::kLanes) {
      const T* base = row + ox * stride;
      typename L::vec m = stride == 1 ? L::load(base) : L::even(base);
      for (int64_t t = 1; t < kw; ++t) m = nan_max_lanes(m, stride == 1 ? L::load(base + t) : L::even(base + t));
      L::store(out + ox, m);
    }
  }
  for (; ox < OW; ++ox) {
    T m = row[ox * stride];
    for (int64_t t = 1; t < kw; ++t) m = nan_max(m, row[ox * stride + t]);
    out[ox] = m;
  }
}

template <typename T>
void pool_planes(const T* x, T* y, int64_t begin, int64_t end, int64_t H, int64_t W, int64_t OH, int64_t OW,
                 int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  using L = Lanes<T>;
  // One input row's max over a window's rows, padded with -inf on both sides: padding never wins a max.
  std::vector<T> padded(static_cast<size_t>(W + 2 * pw + kw + 2 * L::kLanes), -std::numeric_limits<T>::infinity());
  T* rm = padded.data() + pw;
  for (int64_t plane = begin; plane < end; ++plane) {
    const T* xp = x + plane * H * W;
    T* yp = y + plane * OH * OW;
    for (int64_t oy = 0; oy < OH; ++oy) {
      const int64_t r0 = std::max<int64_t>(0, oy * sh - ph), r1 = std::min<int64_t>(H, oy * sh - ph + kh);
      int64_t c = 0;
      for (; c + L::kLanes <= W; c += L::kLanes) {
        typename L::vec m = L::load(xp + r0 * W + c);
        for (int64_t r = r0 + 1; r < r1; ++r) m = nan_max_lanes(m, L::load(xp + r * W + c));
        L::store(rm + c, m);
      }
      for (; c < W; ++c) {
        T m = xp[r0 * W + c];
        for (int64_t r = r0 + 1; r < r1; ++r) m = nan_max(m, xp[r * W + c]);
        rm[c] = m;
      }
      column_taps(padded.data(), OW, kw, sw, yp + oy * OW);
    }
  }
}

}  // namespace

Tensor max_pool2d_cpu(Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  CALEX_CHECK(x.is_cpu() && x.dim() == 4 && x.is_contiguous(),
              "max_pool2d: x: expected a contiguous 4-D CPU tensor [N, C, H, W], got " << shape_str(x) << " on "
                                                                                      << device_str(x));
  const ScalarType dtype = x.scalar_type();
  CALEX_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double,
              "max_pool2d: x: expected torch.float32 or torch.float64, got " << dtype_str(x));
  CALEX_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1,
              "max_pool2d: expected kernel and stride >= 1, got kernel (" << kh << ", " << kw << "), stride (" << sh
                                                                          << ", " << sw << ")");
  CALEX_CHECK(0 <= ph && 2 * ph <= kh && 0 <= pw && 2 * pw <= kw,
              "max_pool2d: padding (" << ph << ", " << pw << ") should be at most half of the kernel (" << kh << ", "
                                      << kw << ")");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H + 2 * ph - kh) / sh + 1, OW = (W + 2 * pw - kw) / sw + 1;
  CALEX_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw,
              "max_pool2d: the " << H << "x" << W << " map (padded by " << ph << ", " << pw
                                 << ") is smaller than the kernel (" << kh << ", " << kw << ")");
  Tensor y = empty_cpu({N, C, OH, OW}, dtype);
  const int64_t planes = N * C;
  if (planes == 0 || OH * OW == 0) return y;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(H * W, 1));
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* in = static_cast<const T*>(x.data_ptr());
    T* out = static_cast<T*>(y.data_ptr());
    torch::stable::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
      pool_planes(in, out, b, e, H, W, OH, OW, kh, kw, sh, sw, ph, pw);
    });
  };
  if (dtype == ScalarType::Float) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<double*>(nullptr));
  }
  return y;
}

}  // namespace calexnet_fast
