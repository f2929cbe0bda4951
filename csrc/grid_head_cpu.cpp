// CPU kernel of calexnet_fast::grid_head_epilogue: the folded grid head after its two matrix products, with
// the exit decision in the same pass (the CPU counterpart of the fused Triton kernel's epilogue).
//
// Semantics (the Python twin calexnet_fast.reference.grid_head_epilogue_reference is the specification):
//   u [N, P, D] projection after the ReLU, s [N, P, K] its products with the (scaled, normalised) prototypes,
//   x [N, C, h, w] the working map (P = h * w pixels, row-major; any strides).
//   sim[n, p, :] = s[n, p, :] / max(||u[n, p, :]||, eps)
//   The feature vector of sample n: for each window (r0, r1, c0, c1) of s_windows (over sim), then of
//   x_windows (over x), the max then the mean of the part's vectors over the window's pixels, or the pixel's
//   vector once for a window of one pixel; logits = cls_weight @ features + cls_bias. Then, in float32 from
//   the logits: pred = argmax (first maximum, NaN wins), conf = max softmax probability,
//   exit = conf >= thresholds[pred] (a NaN confidence never exits).
#include "grid_head_cpu.h"

#include <cmath>
#include <type_traits>
#include <vector>

// Vector width is chosen at load time where the compiler can clone a function per x86-64 level (GCC >= 11,
// which knows the x86-64-v3/v4 levels); elsewhere one build for the compiler's target.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__)
#define CALEX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CALEX_CLONES
#endif

namespace calexnet_fast {
namespace {

template <typename T>
struct Epilogue {
  const T* u;
  int64_t u_n, u_p, u_d;
  const T* s;
  int64_t s_n, s_p, s_k;
  const T* x;
  int64_t x_n, x_c, x_h, x_w;
  int64_t pixels, dim, n_prototypes, channels, width, n_classes;
  const int64_t* s_windows;
  int64_t s_count;
  const int64_t* x_windows;
  int64_t x_count;
  const T* weight;  // [n_classes, features]
  int64_t features;
  const T* bias;
  const float* thresholds;
  T eps;
  T* logits;
  bool* exit;
  int64_t* pred;
  float* conf;
};

// Sixteen independent partial sums, so that the compiler vectorises without reordering a single sum.
template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  }
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out[c] = bias[c] + W[c] . f for the n_rows rows of W [n_rows, len]: four rows at a time, so that every load
// of f feeds four independent sums.
template <typename T>
inline __attribute__((always_inline)) void matvec(const T* f, const T* W, int64_t n_rows, int64_t len, const T* bias,
                                                  T* out) {
  constexpr int kLanes = 16;
  int64_t c = 0;
  for (; c + 4 <= n_rows; c += 4) {
    const T* w0 = W + c * len;
    const T *w1 = w0 + len, *w2 = w1 + len, *w3 = w2 + len;
    T p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const T v = f[i + l];
        p0[l] += v * w0[i + l];
        p1[l] += v * w1[i + l];
        p2[l] += v * w2[i + l];
        p3[l] += v * w3[i + l];
      }
    }
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int l = 0; l < kLanes; ++l) {
      s0 += p0[l];
      s1 += p1[l];
      s2 += p2[l];
      s3 += p3[l];
    }
    for (; i < len; ++i) {
      s0 += f[i] * w0[i];
      s1 += f[i] * w1[i];
      s2 += f[i] * w2[i];
      s3 += f[i] * w3[i];
    }
    out[c] = bias[c] + s0;
    out[c + 1] = bias[c + 1] + s1;
    out[c + 2] = bias[c + 2] + s2;
    out[c + 3] = bias[c + 3] + s3;
  }
  for (; c < n_rows; ++c) out[c] = bias[c] + dot(f, W + c * len, len);
}

// One part's features written at `f`, from the part's pixel-major map: channel j of pixel (r, q) at
// v[r * row + q * ch + j]. Returns the end of what was written.
template <typename T>
inline __attribute__((always_inline)) T* write_part(const T* v, int64_t ch, int64_t row, const int64_t* windows,
                                                    int64_t count, T* f) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r0 = windows[4 * i], r1 = windows[4 * i + 1], c0 = windows[4 * i + 2], c1 = windows[4 * i + 3];
    const T* first = v + r0 * row + c0 * ch;
    T* vmax = f;
    const bool one_pixel = r1 - r0 == 1 && c1 - c0 == 1;
    T* vmean = f + ch;
    f += one_pixel ? ch : 2 * ch;
    for (int64_t j = 0; j < ch; ++j) vmax[j] = first[j];
    if (one_pixel) continue;
    for (int64_t j = 0; j < ch; ++j) vmean[j] = first[j];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t q = (r == r0 ? c0 + 1 : c0); q < c1; ++q) {
        const T* px = v + r * row + q * ch;
        for (int64_t j = 0; j < ch; ++j) {
          const T a = px[j];
          vmax[j] = (a > vmax[j] || a != a) ? a : vmax[j];
          vmean[j] += a;
        }
      }
    }
    const T area = static_cast<T>((r1 - r0) * (c1 - c0));
    for (int64_t j = 0; j < ch; ++j) vmean[j] /= area;
  }
  return f;
}

template <typename T>
inline __attribute__((always_inline)) void decide(const Epilogue<T>& a, int64_t n) {
  const T* z = a.logits + n * a.n_classes;
  int64_t best = 0;
  for (int64_t c = 1; c < a.n_classes; ++c) {
    const float zb = static_cast<float>(z[best]);
    if (zb != zb) break;
    const float zc = static_cast<float>(z[c]);
    if (zc > zb || zc != zc) best = c;
  }
  const float top = static_cast<float>(z[best]);
  float total = 0.0f;
  for (int64_t c = 0; c < a.n_classes; ++c) total += std::exp(static_cast<float>(z[c]) - top);
  const float conf = 1.0f / total;
  a.pred[n] = best;
  a.conf[n] = conf;
  a.exit[n] = conf >= a.thresholds[best];  // false for a NaN confidence
}

template <typename T>
inline __attribute__((always_inline)) void run_rows(const Epilogue<T>& a, int64_t begin, int64_t end) {
  const int64_t P = a.pixels, K = a.n_prototypes, C = a.channels;
  std::vector<T> scratch(static_cast<size_t>(P * (K + C) + a.features));
  T* sim = scratch.data();  // [P, K]
  T* xmap = sim + P * K;    // [P, C]
  T* f = xmap + P * C;      // [features]
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t p = 0; p < P; ++p) {
      const T* up = a.u + n * a.u_n + p * a.u_p;
      T norm2 = 0;
      if (a.u_d == 1) {
        norm2 = dot(up, up, a.dim);
      } else {
        for (int64_t d = 0; d < a.dim; ++d) norm2 += up[d * a.u_d] * up[d * a.u_d];
      }
      T norm = std::sqrt(norm2);
      norm = (norm > a.eps || norm != norm) ? norm : a.eps;  // clamp_min; a NaN norm stays NaN
      const T* sp = a.s + n * a.s_n + p * a.s_p;
      T* out = sim + p * K;
      if (a.s_k == 1) {
        for (int64_t k = 0; k < K; ++k) out[k] = sp[k] / norm;
      } else {
        for (int64_t k = 0; k < K; ++k) out[k] = sp[k * a.s_k] / norm;
      }
    }
    const T* xn = a.x + n * a.x_n;
    const T* xpix = xn;  // the map pixel-major: x itself when it is channels_last, else a transposed copy
    if (!(a.x_c == 1 && a.x_w == C && a.x_h == a.width * C)) {
      xpix = xmap;
      if (a.x_w == 1 && a.x_h == a.width) {  // contiguous pixels
        for (int64_t c = 0; c < C; ++c) {
          const T* plane = xn + c * a.x_c;
          for (int64_t p = 0; p < P; ++p) xmap[p * C + c] = plane[p];
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t p = 0; p < P; ++p) xmap[p * C + c] = xn[c * a.x_c + (p / a.width) * a.x_h + (p % a.width) * a.x_w];
        }
      }
    }
    T* end_s = write_part(sim, K, a.width * K, a.s_windows, a.s_count, f);
    write_part(xpix, C, a.width * C, a.x_windows, a.x_count, end_s);
    T* logits = a.logits + n * a.n_classes;
    matvec(f, a.weight, a.n_classes, a.features, a.bias, logits);
    decide(a, n);
  }
}

CALEX_CLONES void run_rows_f32(const Epilogue<float>& a, int64_t begin, int64_t end) { run_rows(a, begin, end); }
CALEX_CLONES void run_rows_f64(const Epilogue<double>& a, int64_t begin, int64_t end) { run_rows(a, begin, end); }

// The number of features the windows give a part of `ch` channels (after checking they lie in the map).
int64_t check_windows(const Tensor& windows, const char* name, int64_t ch, int64_t h, int64_t w) {
  CALEX_CHECK(windows.is_cpu() && windows.scalar_type() == ScalarType::Long && windows.dim() == 2 &&
                  windows.size(1) == 4 && windows.is_contiguous(),
              "grid_head_epilogue: " << name << ": expected a contiguous int64 CPU tensor [W, 4], got "
                                     << dtype_str(windows) << " " << shape_str(windows) << " on "
                                     << device_str(windows));
  const int64_t* win = static_cast<const int64_t*>(windows.data_ptr());
  int64_t features = 0;
  for (int64_t i = 0; i < windows.size(0); ++i) {
    const int64_t r0 = win[4 * i], r1 = win[4 * i + 1], c0 = win[4 * i + 2], c1 = win[4 * i + 3];
    CALEX_CHECK(0 <= r0 && r0 < r1 && r1 <= h && 0 <= c0 && c0 < c1 && c1 <= w,
                "grid_head_epilogue: " << name << "[" << i << "] = (" << r0 << ", " << r1 << ", " << c0 << ", " << c1
                                       << ") lies outside the " << h << "x" << w << " map");
    features += (r1 - r0 == 1 && c1 - c0 == 1) ? ch : 2 * ch;
  }
  return features;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> grid_head_epilogue_cpu(Tensor u, Tensor s, Tensor x, Tensor s_windows,
                                                                  Tensor x_windows, Tensor cls_weight, Tensor cls_bias,
                                                                  Tensor thresholds, double eps) {
  CALEX_CHECK(u.is_cpu() && s.is_cpu() && x.is_cpu() && cls_weight.is_cpu() && cls_bias.is_cpu() && thresholds.is_cpu(),
              "grid_head_epilogue: expected CPU tensors, got u on " << device_str(u));
  const ScalarType dtype = u.scalar_type();
  CALEX_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double,
              "grid_head_epilogue: u: expected torch.float32 or torch.float64, got " << dtype_str(u));
  CALEX_CHECK(u.dim() == 3 && s.dim() == 3 && x.dim() == 4,
              "grid_head_epilogue: expected u [N, P, D], s [N, P, K] and x [N, C, h, w], got "
                  << shape_str(u) << ", " << shape_str(s) << " and " << shape_str(x));
  const int64_t N = u.size(0), P = u.size(1), C = x.size(1), h = x.size(2), w = x.size(3);
  CALEX_CHECK(s.size(0) == N && x.size(0) == N && s.size(1) == P && h * w == P,
              "grid_head_epilogue: u " << shape_str(u) << ", s " << shape_str(s) << " and x " << shape_str(x)
                                       << " disagree (expected the same N, and P = h * w pixels)");
  CALEX_CHECK(s.scalar_type() == dtype && x.scalar_type() == dtype && cls_bias.scalar_type() == dtype,
              "grid_head_epilogue: s, x and cls_bias: expected the dtype of u (" << dtype_str(u) << ")");
  const int64_t n_classes = cls_bias.numel();
  CALEX_CHECK(cls_bias.dim() == 1 && cls_bias.is_contiguous() && n_classes > 0,
              "grid_head_epilogue: cls_bias: expected a contiguous 1-D tensor, got " << shape_str(cls_bias));
  CALEX_CHECK(thresholds.scalar_type() == ScalarType::Float && thresholds.dim() == 1 &&
                  thresholds.numel() == n_classes && thresholds.is_contiguous(),
              "grid_head_epilogue: thresholds: expected a contiguous torch.float32 tensor [" << n_classes << "], got "
                                                                                             << dtype_str(thresholds)
                                                                                             << " "
                                                                                             << shape_str(thresholds));
  const int64_t K = s.size(2);
  const int64_t features = check_windows(s_windows, "s_windows", K, h, w) + check_windows(x_windows, "x_windows", C, h, w);
  CALEX_CHECK(cls_weight.scalar_type() == dtype && cls_weight.dim() == 2 && cls_weight.size(0) == n_classes &&
                  cls_weight.size(1) == features && cls_weight.is_contiguous(),
              "grid_head_epilogue: cls_weight: expected a contiguous tensor [" << n_classes << ", " << features
                                                                               << "] of the dtype of u, got "
                                                                               << dtype_str(cls_weight) << " "
                                                                               << shape_str(cls_weight));

  const auto device = u.device();
  Tensor logits = torch::stable::empty({N, n_classes}, dtype, std::nullopt, device);
  Tensor exit = torch::stable::empty({N}, ScalarType::Bool, std::nullopt, device);
  Tensor pred = torch::stable::empty({N}, ScalarType::Long, std::nullopt, device);
  Tensor conf = torch::stable::empty({N}, ScalarType::Float, std::nullopt, device);
  if (N == 0) return std::make_tuple(logits, exit, pred, conf);

  // Work per sample: the maps read once, the features written once, the classifier's products.
  const int64_t per_row = P * (u.size(2) + K + C) + (n_classes + 1) * features;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(per_row, 1));
  auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Epilogue<T> a{static_cast<const T*>(u.data_ptr()), u.stride(0), u.stride(1), u.stride(2),
                  static_cast<const T*>(s.data_ptr()), s.stride(0), s.stride(1), s.stride(2),
                  static_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                  P, u.size(2), K, C, w, n_classes,
                  static_cast<const int64_t*>(s_windows.data_ptr()), s_windows.size(0),
                  static_cast<const int64_t*>(x_windows.data_ptr()), x_windows.size(0),
                  static_cast<const T*>(cls_weight.data_ptr()), features, static_cast<const T*>(cls_bias.data_ptr()),
                  static_cast<const float*>(thresholds.data_ptr()), static_cast<T>(eps),
                  static_cast<T*>(logits.data_ptr()), static_cast<bool*>(exit.data_ptr()),
                  static_cast<int64_t*>(pred.data_ptr()), static_cast<float*>(conf.data_ptr())};
    return a;
  };
  if (dtype == ScalarType::Float) {
    const Epilogue<float> a = fill(static_cast<float*>(nullptr));
    torch::stable::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { run_rows_f32(a, b, e); });
  } else {
    const Epilogue<double> a = fill(static_cast<double*>(nullptr));
    torch::stable::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { run_rows_f64(a, b, e); });
  }
  return std::make_tuple(logits, exit, pred, conf);
}

}  // namespace calexnet_fast
