// Shared argument checks and row-layout logic of the calexnet_fast batch ops (CPU and CUDA).
//
// Semantics (identical on both devices; the Python reference twins in calexnet_fast/reference.py match them):
//   compact(x, mask) -> (rows, index): rows = x[mask] as a new tensor, index = int64 positions of the
//     true entries in increasing order. Rows keep x's per-row layout when it is contiguous or
//     channels_last (4-D); any other layout is made contiguous first.
//   scatter_rows_(out, src, index): out[index[j]] = src[j]. Every index must lie in [0, out.size(0)),
//     otherwise the op raises before writing anything. With duplicate indices the LAST occurrence wins.
//     src (and index) may share memory with out: they are read as they were before the call. An out whose
//     elements share memory (expanded, overlapping strides) is refused.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace calexnet_fast {

using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// A user-facing error: the message names the argument, what was expected and what was given.
#define CALEX_CHECK(cond, ...)                                              \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::ostringstream calex_oss_;                                        \
      calex_oss_ << __VA_ARGS__;                                            \
      throw std::runtime_error(calex_oss_.str());                           \
    }                                                                       \
  } while (0)

inline std::string shape_str(const Tensor& t) {
  std::ostringstream oss;
  oss << "[";
  for (int64_t d = 0; d < t.dim(); ++d) oss << (d ? ", " : "") << t.size(d);
  oss << "]";
  return oss.str();
}

// Python spelling (torch.float32, ...) so messages read the same as the reference twins'.
inline std::string dtype_str(const Tensor& t) {
  switch (t.scalar_type()) {
    case ScalarType::Bool: return "torch.bool";
    case ScalarType::Byte: return "torch.uint8";
    case ScalarType::Char: return "torch.int8";
    case ScalarType::Short: return "torch.int16";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    default: return std::string("torch.") + torch::headeronly::toString(t.scalar_type());
  }
}

inline std::string device_str(const Tensor& t) {
  std::ostringstream oss;
  if (t.is_cuda()) {
    oss << "cuda:" << static_cast<int>(t.get_device_index());
  } else if (t.is_cpu()) {
    oss << "cpu";
  } else {
    oss << "device type " << static_cast<int>(t.get_device());
  }
  return oss.str();
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cuda() == b.is_cuda() && a.is_cpu() == b.is_cpu() &&
         a.get_device_index() == b.get_device_index();
}

inline void check_compact_args(const Tensor& x, const Tensor& mask) {
  CALEX_CHECK(x.dim() >= 1, "compact: x: expected a tensor with a batch dimension (dim >= 1), got a 0-d tensor");
  CALEX_CHECK(mask.scalar_type() == ScalarType::Bool,
              "compact: mask: expected dtype torch.bool, got " << dtype_str(mask));
  CALEX_CHECK(mask.dim() == 1, "compact: mask: expected a 1-D tensor of shape [" << x.size(0) << "], got shape "
                                                                                  << shape_str(mask));
  CALEX_CHECK(mask.size(0) == x.size(0), "compact: mask: expected length " << x.size(0) << " (x.size(0)), got "
                                                                            << mask.size(0));
  CALEX_CHECK(same_device(x, mask), "compact: mask: expected device " << device_str(x) << " (that of x), got "
                                                                      << device_str(mask));
}

inline void check_scatter_args(const Tensor& out, const Tensor& src, const Tensor& index) {
  CALEX_CHECK(out.dim() >= 1, "scatter_rows: out: expected a tensor with a batch dimension (dim >= 1), got a 0-d tensor");
  CALEX_CHECK(same_device(out, src), "scatter_rows: src: expected device " << device_str(out)
                                                                           << " (that of out), got " << device_str(src));
  CALEX_CHECK(same_device(out, index), "scatter_rows: index: expected device "
                                           << device_str(out) << " (that of out), got " << device_str(index));
  CALEX_CHECK(index.scalar_type() == ScalarType::Long,
              "scatter_rows: index: expected dtype torch.int64, got " << dtype_str(index));
  CALEX_CHECK(index.dim() == 1, "scatter_rows: index: expected a 1-D tensor, got shape " << shape_str(index));
  CALEX_CHECK(src.scalar_type() == out.scalar_type(),
              "scatter_rows: src: expected dtype " << dtype_str(out) << " (that of out), got " << dtype_str(src));
  bool trailing_ok = src.dim() == out.dim();
  for (int64_t d = 1; trailing_ok && d < out.dim(); ++d) trailing_ok = src.size(d) == out.size(d);
  CALEX_CHECK(trailing_ok, "scatter_rows: out: expected trailing shape matching src "
                               << shape_str(src) << " (all but the first dimension), got out of shape "
                               << shape_str(out));
  CALEX_CHECK(src.size(0) == index.size(0), "scatter_rows: index: expected length " << src.size(0)
                                                                                    << " (src.size(0)), got "
                                                                                    << index.size(0));
}

// Whether every row t[i] is one dense block laid out as `fmt` (the batch stride may be anything).
inline bool rows_dense_as(const Tensor& t, MemoryFormat fmt) {
  const int64_t nd = t.dim();
  std::vector<int64_t> order;  // inner dims from fastest to slowest
  if (fmt == MemoryFormat::ChannelsLast) {
    if (nd != 4) return false;
    order = {1, 3, 2};
  } else {
    for (int64_t d = nd - 1; d >= 1; --d) order.push_back(d);
  }
  int64_t expected = 1;
  for (int64_t d : order) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The per-row layout to keep: contiguous if the rows are contiguous, channels_last if they are
// channels_last (and not also contiguous), otherwise none (the caller makes a contiguous copy).
inline bool row_format(const Tensor& t, MemoryFormat* fmt) {
  if (rows_dense_as(t, MemoryFormat::Contiguous)) {
    *fmt = MemoryFormat::Contiguous;
    return true;
  }
  if (rows_dense_as(t, MemoryFormat::ChannelsLast)) {
    *fmt = MemoryFormat::ChannelsLast;
    return true;
  }
  return false;
}

inline int64_t row_numel(const Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

inline std::vector<int64_t> sizes_with_batch(const Tensor& t, int64_t n) {
  std::vector<int64_t> s(t.dim());
  s[0] = n;
  for (int64_t d = 1; d < t.dim(); ++d) s[d] = t.size(d);
  return s;
}

// STABLE_TORCH_ERROR_CODE_CHECK (with the shim's error message) exists from torch 2.13; the header-only
// TORCH_ERROR_CODE_CHECK in every torch >= 2.10.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define CALEX_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define CALEX_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

// A new CPU tensor of `sizes`, dense in `fmt` (PyTorch's strides for it), allocated by one direct call of the
// C shim's empty_strided. torch::stable::empty looks the operator up by name and calls it boxed: several
// microseconds per tensor, tens of them with the cold caches a branch op meets right after a stage.
inline Tensor empty_cpu(const std::vector<int64_t>& sizes, ScalarType dtype,
                        MemoryFormat fmt = MemoryFormat::Contiguous) {
  const int64_t dim = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> strides(sizes.size());
  std::vector<int64_t> order(sizes.size());  // dimensions from the innermost out
  for (int64_t d = 0; d < dim; ++d) order[d] = dim - 1 - d;
  if (fmt == MemoryFormat::ChannelsLast && dim == 4) order = {1, 3, 2, 0};
  int64_t stride = 1;
  for (int64_t d : order) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  const auto code = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle handle = nullptr;
  CALEX_SHIM_CHECK(aoti_torch_empty_strided(dim, sizes.data(), strides.data(), code, aoti_torch_device_type_cpu(), 0,
                                            &handle));
  return Tensor(handle);
}

// A new [n, *t.shape[1:]] tensor like t, dense rows in `fmt`.
inline Tensor new_rows_like(const Tensor& t, int64_t n, MemoryFormat fmt) {
  auto sizes = sizes_with_batch(t, n);
  return torch::stable::empty(sizes, t.scalar_type(), std::nullopt, t.device(), std::nullopt, fmt);
}

inline std::string strides_str(const Tensor& t) {
  std::ostringstream oss;
  oss << "[";
  for (int64_t d = 0; d < t.dim(); ++d) oss << (d ? ", " : "") << t.stride(d);
  oss << "]";
  return oss.str();
}

// Whether two elements of t may share memory (an expanded or otherwise overlapping view). Sufficient test
// for "they do not": over the dims of size > 1 sorted by stride, each stride exceeds the largest offset the
// smaller-stride dims reach. calexnet_fast.reference.elements_may_share_memory is the same test.
inline bool elements_may_share_memory(const Tensor& t) {
  if (t.numel() == 0) return false;  // no element, nothing to share
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // largest element offset reached by the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += stride * (size - 1);
  }
  return false;
}

// Whether the memory a and b may touch intersects (their [first, last] byte ranges overlap).
inline bool may_overlap(const Tensor& a, const Tensor& b) {
  auto range = [](const Tensor& t, uintptr_t* lo, uintptr_t* hi) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 0) return false;
      last += (t.size(d) - 1) * t.stride(d);
    }
    *lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    *hi = *lo + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size())) - 1;
    return true;
  };
  uintptr_t alo, ahi, blo, bhi;
  if (!range(a, &alo, &ahi) || !range(b, &blo, &bhi)) return false;
  return alo <= bhi && blo <= ahi;
}

// scatter_rows_ writes every element of `out` once at most: an `out` whose elements share memory is refused
// (the reference twin refuses it too), before the indices are checked.
inline void check_scatter_out(const Tensor& out) {
  CALEX_CHECK(!elements_may_share_memory(out),
              "scatter_rows_: out: expected a tensor whose elements do not share memory, got shape "
                  << shape_str(out) << " with strides " << strides_str(out)
                  << " (an expanded or overlapping view); write into out.clone() instead");
}

// `t` itself, or a copy of it when it may overlap `out`: what scatter_rows_ reads must not change while it
// writes `out` (a src that overlaps out would otherwise be read after some of its rows were overwritten).
inline Tensor unaliased(const Tensor& t, const Tensor& out) {
  return may_overlap(out, t) ? torch::stable::clone(t) : t;
}

// Where scatter_rows_ writes: `out` itself when its rows are dense in memory, else a dense (contiguous) copy
// of it that the caller copies back into `out` (*copy_back is set). `*src` is made dense in the same layout,
// so that both sides' rows are single blocks of the same byte order.
inline Tensor dense_row_target(const Tensor& out, Tensor* src, bool* copy_back) {
  MemoryFormat fmt;
  const bool out_dense = row_format(out, &fmt);
  Tensor target = out_dense ? out : torch::stable::contiguous(out);
  if (!out_dense) fmt = MemoryFormat::Contiguous;
  if (!rows_dense_as(*src, fmt)) *src = torch::stable::contiguous(*src, fmt);
  *copy_back = !out_dense;
  return target;
}

// The functional scatter_rows of a device: its in-place scatter_rows_ (`InPlace`) applied to a copy of `out`.
template <void (*InPlace)(Tensor, Tensor, Tensor)>
Tensor scatter_rows_copy(Tensor out, Tensor src, Tensor index) {
  check_scatter_args(out, src, index);
  Tensor result = torch::stable::clone(out);
  InPlace(result, src, index);
  return result;
}

inline std::string out_of_range_msg(int64_t j, int64_t v, int64_t rows) {
  std::ostringstream oss;
  oss << "scatter_rows: index: expected every value in [0, " << rows << ") (out.size(0)), got index[" << j
      << "] = " << v;
  return oss.str();
}

}  // namespace calexnet_fast
