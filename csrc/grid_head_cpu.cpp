// CPU kernel of calexnet_fast::grid_plan_exit: the folded grid head on its working map, with the exit
// decision, in one pass per sample (the CPU counterpart of the fused Triton kernel grid_head_exit).
//
// Semantics (the Python twin calexnet_fast.reference.grid_plan_exit_reference is the specification):
//   x [N, C, h, w] the working map (P = h * w pixels, row-major; any strides), proj_weight_t [C, D],
//   proj_bias [D], prototypes_t [D, K] (the folded head's, normalised and scaled by gamma);
//   u[n, p, :] = relu(x[n, :, p] @ proj_weight_t + proj_bias), s[n, p, :] = u[n, p, :] @ prototypes_t,
//   sim[n, p, :] = s[n, p, :] / max(||u[n, p, :]||, eps)
//   The feature vector of sample n: for each window (r0, r1, c0, c1) of s_windows (over sim), then of
//   x_windows (over x), the max then the mean of the part's vectors over the window's pixels, or the pixel's
//   vector once for a window of one pixel; logits = cls_weight @ features + cls_bias. Then, in float32 from
//   the logits: pred = argmax (first maximum, NaN wins), conf = max softmax probability,
//   exit = conf >= thresholds[pred] (a NaN confidence never exits).
#include "grid_head_cpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
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
struct Plan {
  const T* x;
  int64_t x_n, x_c, x_h, x_w;
  const T* proj_weight_t;  // [C, D]
  const T* proj_bias;      // [D]
  const T* prototypes_t;   // [D, K]
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

// out[r, :] = bias + A[r, :] @ B for the kRows rows of A (row stride lda) and B [in, kOut], then the ReLU
// (NaN kept) when relu: kRows x kOut accumulators in kBytes-wide vectors (GCC/Clang vector extensions), kept in
// registers across the loop over `in`.
template <typename T, int kBytes, int kOut, int kRows>
inline __attribute__((always_inline)) void product_rows(const T* A, int64_t lda, int64_t in, const T* B,
                                                        const T* bias, bool relu, T* out) {
  typedef T vec __attribute__((vector_size(kBytes)));
  typedef T uvec __attribute__((vector_size(kBytes), aligned(alignof(T))));  // for unaligned loads and stores
  constexpr int kLanes = kBytes / sizeof(T), kVecs = kOut / kLanes;
  vec acc[kRows][kVecs];
  for (int j = 0; j < kVecs; ++j) {
    const vec init = bias ? vec(*reinterpret_cast<const uvec*>(bias + j * kLanes)) : vec{};
    for (int r = 0; r < kRows; ++r) acc[r][j] = init;
  }
  for (int64_t i = 0; i < in; ++i) {
    vec b[kVecs];
    for (int j = 0; j < kVecs; ++j) b[j] = *reinterpret_cast<const uvec*>(B + i * kOut + j * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const T a = A[r * lda + i];
      for (int j = 0; j < kVecs; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kVecs; ++j) {
      vec v = acc[r][j];
      if (relu) v = v < T(0) ? vec{} : v;  // lane-wise; NaN < 0 is false: a NaN stays NaN
      *reinterpret_cast<uvec*>(out + r * kOut + j * kLanes) = v;
    }
  }
}

// Row blocks of 8 accumulator vectors (half of AVX-512's registers, half of AVX2's and SSE's), then single rows.
template <typename T, int kBytes, int kOut>
inline __attribute__((always_inline)) void product_fixed(const T* A, int64_t rows, int64_t in, const T* B,
                                                         const T* bias, bool relu, T* out) {
  constexpr int kBlock = std::max(1, 8 * kBytes / (kOut * static_cast<int>(sizeof(T))));
  int64_t r = 0;
  for (; r + kBlock <= rows; r += kBlock) {
    product_rows<T, kBytes, kOut, kBlock>(A + r * in, in, in, B, bias, relu, out + r * kOut);
  }
  for (; r < rows; ++r) product_rows<T, kBytes, kOut, 1>(A + r * in, in, in, B, bias, relu, out + r * kOut);
}

// out [rows, n_out] = A [rows, in] (contiguous) @ B [in, n_out] (+ bias [n_out]) (then the ReLU, NaN kept);
// register-blocked for n_out = 16, 32 or 64 (the heads' D and K), plain loops otherwise.
template <typename T, int kBytes>
inline __attribute__((always_inline)) void product(const T* A, int64_t rows, int64_t in, const T* B, int64_t n_out,
                                                   const T* bias, bool relu, T* out) {
  if (n_out == 16 && 16 * sizeof(T) >= kBytes) return product_fixed<T, kBytes, 16>(A, rows, in, B, bias, relu, out);
  if (n_out == 32) return product_fixed<T, kBytes, 32>(A, rows, in, B, bias, relu, out);
  if (n_out == 64) return product_fixed<T, kBytes, 64>(A, rows, in, B, bias, relu, out);
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * n_out;
    for (int64_t j = 0; j < n_out; ++j) o[j] = bias ? bias[j] : T(0);
    for (int64_t i = 0; i < in; ++i) {
      const T a = A[r * in + i];
      const T* b = B + i * n_out;
      for (int64_t j = 0; j < n_out; ++j) o[j] += a * b[j];
    }
    if (relu) {
      for (int64_t j = 0; j < n_out; ++j) o[j] = o[j] < T(0) ? T(0) : o[j];
    }
  }
}

// dst[j * ds + i] = src[i * ss + j] for an 8 x 8 block of floats: three rounds of shuffles of 8-wide vectors.
inline __attribute__((always_inline)) void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float uv8 __attribute__((vector_size(32), aligned(4)));
  typedef int32_t i8 __attribute__((vector_size(32)));
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const uv8*>(src + i * ss);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = __builtin_shuffle(r[i], r[i + 1], i8{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], i8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs
    for (int k = 0; k < 2; ++k) {
      u[i + k] = __builtin_shuffle(t[i + k], t[i + 2 + k], i8{0, 1, 8, 9, 4, 5, 12, 13});
      u[i + 2 + k] = __builtin_shuffle(t[i + k], t[i + 2 + k], i8{2, 3, 10, 11, 6, 7, 14, 15});
    }
  }
  constexpr int kColumn[4] = {0, 2, 1, 3};  // the column u[k] holds in its low half (k + 4: the high half)
  for (int k = 0; k < 4; ++k) {
    *reinterpret_cast<uv8*>(dst + kColumn[k] * ds) = __builtin_shuffle(u[k], u[4 + k], i8{0, 1, 2, 3, 8, 9, 10, 11});
    *reinterpret_cast<uv8*>(dst + (kColumn[k] + 4) * ds) =
        __builtin_shuffle(u[k], u[4 + k], i8{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// y [P, C] = x's C planes of P contiguous pixels (plane c at x + c * stride), pixel-major: float maps in 8 x 8
// blocks of shuffles where vectors are at least 32 bytes wide, the rest one element at a time, pixel by pixel.
template <typename T, int kBytes>
inline __attribute__((always_inline)) void pixel_major(const T* x, int64_t stride, int64_t C, int64_t P, T* y) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, float> && kBytes >= 32) {
    for (; c0 + 8 <= C; c0 += 8) {
      int64_t p0 = 0;
      for (; p0 + 8 <= P; p0 += 8) transpose8(x + c0 * stride + p0, stride, y + p0 * C + c0, C);
      for (; p0 < P; ++p0) {
        for (int i = 0; i < 8; ++i) y[p0 * C + c0 + i] = x[(c0 + i) * stride + p0];
      }
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t c = c0; c < C; ++c) y[p * C + c] = x[c * stride + p];
  }
}

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
inline __attribute__((always_inline)) void decide(const Plan<T>& a, int64_t n) {
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

template <typename T, int kBytes>
inline __attribute__((always_inline)) void run_rows(const Plan<T>& a, int64_t begin, int64_t end) {
  const int64_t P = a.pixels, K = a.n_prototypes, C = a.channels, D = a.dim;
  std::vector<T> scratch(static_cast<size_t>(P * (D + K + C) + a.features));
  T* u = scratch.data();  // [P, D]
  T* sim = u + P * D;     // [P, K]
  T* xmap = sim + P * K;  // [P, C]
  T* f = xmap + P * C;    // [features]
  for (int64_t n = begin; n < end; ++n) {
    const T* xn = a.x + n * a.x_n;
    const T* xpix = xn;  // the map pixel-major: x itself when it is channels_last, else a transposed copy
    if (!(a.x_c == 1 && a.x_w == C && a.x_h == a.width * C)) {
      xpix = xmap;
      if (a.x_w == 1 && a.x_h == a.width) {  // contiguous pixels
        pixel_major<T, kBytes>(xn, a.x_c, C, P, xmap);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t p = 0; p < P; ++p) xmap[p * C + c] = xn[c * a.x_c + (p / a.width) * a.x_h + (p % a.width) * a.x_w];
        }
      }
    }
    product<T, kBytes>(xpix, P, C, a.proj_weight_t, D, a.proj_bias, true, u);
    product<T, kBytes>(u, P, D, a.prototypes_t, K, static_cast<const T*>(nullptr), false, sim);
    for (int64_t p = 0; p < P; ++p) {
      const T* up = u + p * D;
      T norm = std::sqrt(dot(up, up, D));
      norm = (norm > a.eps || norm != norm) ? norm : a.eps;  // clamp_min; a NaN norm stays NaN
      T* sp = sim + p * K;
      for (int64_t k = 0; k < K; ++k) sp[k] /= norm;
    }
    T* end_s = write_part(sim, K, a.width * K, a.s_windows, a.s_count, f);
    write_part(xpix, C, a.width * C, a.x_windows, a.x_count, end_s);
    T* logits = a.logits + n * a.n_classes;
    matvec(f, a.weight, a.n_classes, a.features, a.bias, logits);
    decide(a, n);
  }
}

// The vector width of the products and the transpose: the widest the CPU has registers for (its clone of
// run_rows runs: 64 bytes with AVX-512, 32 with AVX2), else 16 (one SSE or NEON register): a vector wider
// than the instructions is emulated, many times slower. CALEXNET_CPU_VECTOR_BYTES=16 or 32 (read when the
// library loads) narrows it, so that the tests run every width's code on any machine.
int vector_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  int widest = __builtin_cpu_supports("avx512f") ? 64 : __builtin_cpu_supports("avx2") ? 32 : 16;
#else
  int widest = 16;
#endif
  const char* env = std::getenv("CALEXNET_CPU_VECTOR_BYTES");
  const int asked = env ? std::atoi(env) : 0;
  return (asked == 16 || asked == 32 || asked == 64) ? std::min(widest, asked) : widest;
}

const int kVectorBytes = vector_bytes();

template <typename T>
inline __attribute__((always_inline)) void run_rows_any(const Plan<T>& a, int64_t begin, int64_t end) {
  if (kVectorBytes == 64) {
    run_rows<T, 64>(a, begin, end);
  } else if (kVectorBytes == 32) {
    run_rows<T, 32>(a, begin, end);
  } else {
    run_rows<T, 16>(a, begin, end);
  }
}

CALEX_CLONES void run_rows_f32(const Plan<float>& a, int64_t begin, int64_t end) { run_rows_any(a, begin, end); }
CALEX_CLONES void run_rows_f64(const Plan<double>& a, int64_t begin, int64_t end) { run_rows_any(a, begin, end); }

// The number of features the windows give a part of `ch` channels (after checking they lie in the map).
int64_t check_windows(const Tensor& windows, const char* name, int64_t ch, int64_t h, int64_t w) {
  CALEX_CHECK(windows.is_cpu() && windows.scalar_type() == ScalarType::Long && windows.dim() == 2 &&
                  windows.size(1) == 4 && windows.is_contiguous(),
              "grid_plan_exit: " << name << ": expected a contiguous int64 CPU tensor [W, 4], got "
                                     << dtype_str(windows) << " " << shape_str(windows) << " on "
                                     << device_str(windows));
  const int64_t* win = static_cast<const int64_t*>(windows.data_ptr());
  int64_t features = 0;
  for (int64_t i = 0; i < windows.size(0); ++i) {
    const int64_t r0 = win[4 * i], r1 = win[4 * i + 1], c0 = win[4 * i + 2], c1 = win[4 * i + 3];
    CALEX_CHECK(0 <= r0 && r0 < r1 && r1 <= h && 0 <= c0 && c0 < c1 && c1 <= w,
                "grid_plan_exit: " << name << "[" << i << "] = (" << r0 << ", " << r1 << ", " << c0 << ", " << c1
                                       << ") lies outside the " << h << "x" << w << " map");
    features += (r1 - r0 == 1 && c1 - c0 == 1) ? ch : 2 * ch;
  }
  return features;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> grid_plan_exit_cpu(Tensor x, Tensor proj_weight_t, Tensor proj_bias,
                                                              Tensor prototypes_t, Tensor s_windows, Tensor x_windows,
                                                              Tensor cls_weight, Tensor cls_bias, Tensor thresholds,
                                                              double eps) {
  CALEX_CHECK(x.is_cpu() && proj_weight_t.is_cpu() && proj_bias.is_cpu() && prototypes_t.is_cpu() &&
                  cls_weight.is_cpu() && cls_bias.is_cpu() && thresholds.is_cpu(),
              "grid_plan_exit: expected CPU tensors, got x on " << device_str(x));
  const ScalarType dtype = x.scalar_type();
  CALEX_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double,
              "grid_plan_exit: x: expected torch.float32 or torch.float64, got " << dtype_str(x));
  CALEX_CHECK(x.dim() == 4, "grid_plan_exit: x: expected a working map [N, C, h, w], got " << shape_str(x));
  const int64_t N = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3), P = h * w;
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&proj_weight_t, "proj_weight_t"},
                                {&proj_bias, "proj_bias"}, {&prototypes_t, "prototypes_t"},
                                {&cls_weight, "cls_weight"}, {&cls_bias, "cls_bias"}}) {
    CALEX_CHECK(t->scalar_type() == dtype && t->is_contiguous(),
                "grid_plan_exit: " << name << ": expected a contiguous tensor of x's dtype (" << dtype_str(x)
                                   << "), got " << dtype_str(*t) << (t->is_contiguous() ? "" : " (not contiguous)"));
  }
  CALEX_CHECK(proj_weight_t.dim() == 2 && proj_weight_t.size(0) == C && proj_weight_t.size(1) > 0,
              "grid_plan_exit: proj_weight_t: expected [" << C << ", D] (x has " << C << " channels), got "
                                                          << shape_str(proj_weight_t));
  const int64_t D = proj_weight_t.size(1);
  CALEX_CHECK(proj_bias.dim() == 1 && proj_bias.size(0) == D,
              "grid_plan_exit: proj_bias: expected [" << D << "], got " << shape_str(proj_bias));
  CALEX_CHECK(prototypes_t.dim() == 2 && prototypes_t.size(0) == D && prototypes_t.size(1) > 0,
              "grid_plan_exit: prototypes_t: expected [" << D << ", K], got " << shape_str(prototypes_t));
  const int64_t K = prototypes_t.size(1);
  const int64_t n_classes = cls_bias.numel();
  CALEX_CHECK(cls_bias.dim() == 1 && n_classes > 0,
              "grid_plan_exit: cls_bias: expected a 1-D tensor [n_classes], got " << shape_str(cls_bias));
  CALEX_CHECK(thresholds.scalar_type() == ScalarType::Float && thresholds.dim() == 1 &&
                  thresholds.numel() == n_classes && thresholds.is_contiguous(),
              "grid_plan_exit: thresholds: expected a contiguous torch.float32 tensor [" << n_classes << "], got "
                                                                                         << dtype_str(thresholds) << " "
                                                                                         << shape_str(thresholds));
  const int64_t features = check_windows(s_windows, "s_windows", K, h, w) + check_windows(x_windows, "x_windows", C, h, w);
  CALEX_CHECK(cls_weight.dim() == 2 && cls_weight.size(0) == n_classes && cls_weight.size(1) == features,
              "grid_plan_exit: cls_weight: expected [" << n_classes << ", " << features << "] (the windows give "
                                                       << features << " features), got " << shape_str(cls_weight));

  Tensor logits = empty_cpu({N, n_classes}, dtype);
  Tensor exit = empty_cpu({N}, ScalarType::Bool);
  Tensor pred = empty_cpu({N}, ScalarType::Long);
  Tensor conf = empty_cpu({N}, ScalarType::Float);
  if (N == 0) return std::make_tuple(logits, exit, pred, conf);

  // Work per sample: the two products, the maps read once, the classifier's products.
  const int64_t per_row = P * (C * D + D * K + D + K + C) + (n_classes + 1) * features;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(per_row, 1));
  auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Plan<T> a{static_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
              static_cast<const T*>(proj_weight_t.data_ptr()), static_cast<const T*>(proj_bias.data_ptr()),
              static_cast<const T*>(prototypes_t.data_ptr()),
              P, D, K, C, w, n_classes,
              static_cast<const int64_t*>(s_windows.data_ptr()), s_windows.size(0),
              static_cast<const int64_t*>(x_windows.data_ptr()), x_windows.size(0),
              static_cast<const T*>(cls_weight.data_ptr()), features, static_cast<const T*>(cls_bias.data_ptr()),
              static_cast<const float*>(thresholds.data_ptr()), static_cast<T>(eps),
              static_cast<T*>(logits.data_ptr()), static_cast<bool*>(exit.data_ptr()),
              static_cast<int64_t*>(pred.data_ptr()), static_cast<float*>(conf.data_ptr())};
    return a;
  };
  if (dtype == ScalarType::Float) {
    const Plan<float> a = fill(static_cast<float*>(nullptr));
    torch::stable::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { run_rows_f32(a, b, e); });
  } else {
    const Plan<double> a = fill(static_cast<double*>(nullptr));
    torch::stable::parallel_for(0, N, grain, [&](int64_t b, int64_t e) { run_rows_f64(a, b, e); });
  }
  return std::make_tuple(logits, exit, pred, conf);
}

}  // namespace calexnet_fast
