// CPU kernels of the calexnet_fast batch ops, and the op schemas (this library is always loaded first); the
// grid head's CPU op is in grid_head_cpu.cpp, the inference form's max pool in pool_cpu.cpp.
#include "grid_head_cpu.h"
#include "ops_common.h"
#include "pool_cpu.h"

#include <cstring>
#include <tuple>

namespace calexnet_fast {
namespace {

// Copy `n` rows of `row_bytes` each; source row r starts at src_rows[r] * src_stride_bytes.
void copy_rows(char* dst, const char* src, const int64_t* dst_rows, const int64_t* src_rows, int64_t n,
               int64_t row_bytes, int64_t dst_stride_bytes, int64_t src_stride_bytes) {
  if (n == 0 || row_bytes == 0) return;
  // Chunks of at least 256 KiB: below that, waking a second thread costs more than the copy.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / row_bytes);
  torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t d = dst_rows ? dst_rows[r] : r;
      const int64_t s = src_rows ? src_rows[r] : r;
      std::memcpy(dst + d * dst_stride_bytes, src + s * src_stride_bytes, row_bytes);
    }
  });
}

std::tuple<Tensor, Tensor> compact_cpu(Tensor x, Tensor mask) {
  check_compact_args(x, mask);
  MemoryFormat fmt;
  if (!row_format(x, &fmt)) {
    x = torch::stable::contiguous(x);
    fmt = MemoryFormat::Contiguous;
  }
  const int64_t batch = x.size(0);
  const bool* m = static_cast<const bool*>(mask.data_ptr());
  const int64_t ms = mask.stride(0);
  int64_t n = 0;
  for (int64_t i = 0; i < batch; ++i) n += m[i * ms] ? 1 : 0;

  Tensor index = empty_cpu({n}, ScalarType::Long);
  int64_t* idx = static_cast<int64_t*>(index.data_ptr());
  for (int64_t i = 0, k = 0; i < batch; ++i) {
    if (m[i * ms]) idx[k++] = i;
  }
  Tensor rows = empty_cpu(sizes_with_batch(x, n), x.scalar_type(), fmt);
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const int64_t row_bytes = row_numel(x) * esize;
  copy_rows(static_cast<char*>(rows.data_ptr()), static_cast<const char*>(x.data_ptr()), nullptr, idx, n,
            row_bytes, row_bytes, x.stride(0) * esize);
  return std::make_tuple(rows, index);
}

// Validates every index before anything is written; returns the positions j whose row is written
// (the last occurrence of each target row).
std::vector<int64_t> winning_positions(const Tensor& index, int64_t rows, std::vector<int64_t>* targets) {
  const int64_t n = index.size(0);
  const int64_t* idx = static_cast<const int64_t*>(index.data_ptr());
  const int64_t is = index.stride(0);
  std::vector<int64_t> winner(static_cast<size_t>(rows), -1);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = idx[j * is];
    CALEX_CHECK(v >= 0 && v < rows, out_of_range_msg(j, v, rows));
    winner[v] = j;
  }
  std::vector<int64_t> src_pos;
  src_pos.reserve(n);
  targets->reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = idx[j * is];
    if (winner[v] == j) {
      src_pos.push_back(j);
      targets->push_back(v);
    }
  }
  return src_pos;
}

void scatter_rows__cpu(Tensor out, Tensor src, Tensor index) {
  check_scatter_args(out, src, index);
  check_scatter_out(out);
  std::vector<int64_t> targets;  // read in full before anything is written: index may alias out
  const std::vector<int64_t> src_pos = winning_positions(index, out.size(0), &targets);
  if (src_pos.empty()) return;
  src = unaliased(src, out);

  bool copy_back = false;  // rows that are not dense in memory are written through a dense copy of `out`
  Tensor target = dense_row_target(out, &src, &copy_back);

  const int64_t esize = static_cast<int64_t>(out.element_size());
  const int64_t row_bytes = row_numel(out) * esize;
  copy_rows(static_cast<char*>(target.data_ptr()), static_cast<const char*>(src.data_ptr()), targets.data(),
            src_pos.data(), static_cast<int64_t>(src_pos.size()), row_bytes, target.stride(0) * esize,
            src.stride(0) * esize);
  if (copy_back) torch::stable::copy_(out, target);
}

}  // namespace
}  // namespace calexnet_fast

STABLE_TORCH_LIBRARY(calexnet_fast, m) {
  m.def("compact(Tensor x, Tensor mask) -> (Tensor rows, Tensor index)");
  m.def("scatter_rows_(Tensor(a!) out, Tensor src, Tensor index) -> ()");
  m.def("scatter_rows(Tensor out, Tensor src, Tensor index) -> Tensor");
  m.def(
      "grid_plan_exit(Tensor x, Tensor proj_weight_t, Tensor proj_bias, Tensor prototypes_t, Tensor s_windows, "
      "Tensor x_windows, Tensor cls_weight, Tensor cls_bias, Tensor thresholds, float eps) -> (Tensor logits, "
      "Tensor exit, Tensor pred, Tensor conf)");
  m.def(
      "max_pool2d(Tensor x, int kernel_h, int kernel_w, int stride_h, int stride_w, int padding_h, int padding_w) "
      "-> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(calexnet_fast, CPU, m) {
  m.impl("compact", TORCH_BOX(&calexnet_fast::compact_cpu));
  m.impl("scatter_rows_", TORCH_BOX(&calexnet_fast::scatter_rows__cpu));
  m.impl("scatter_rows", TORCH_BOX(&calexnet_fast::scatter_rows_copy<&calexnet_fast::scatter_rows__cpu>));
  m.impl("grid_plan_exit", TORCH_BOX(&calexnet_fast::grid_plan_exit_cpu));
  m.impl("max_pool2d", TORCH_BOX(&calexnet_fast::max_pool2d_cpu));
}
