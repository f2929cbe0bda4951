// CUDA kernels of the calexnet_fast batch ops (schemas are defined by the CPU library, loaded first).
//
// compact: survivors are selected on the device (cub::DeviceSelect::Flagged over a counting iterator),
// the survivor count is the single device-to-host read, then one vectorised gather copies the rows.
// scatter_rows_: one pass validates the indices and elects the last occurrence of each target row
// (atomicMax), the validation flag is the single device-to-host read, then one vectorised copy.
// Everything runs on the current CUDA stream; scratch comes from torch's caching allocator.
#include "ops_common.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cub/device/device_select.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <cuda_runtime.h>

#include <climits>
#include <tuple>

namespace calexnet_fast {
namespace {

#define CALEX_CUDA_CHECK(expr)                                                                  \
  do {                                                                                          \
    cudaError_t calex_err_ = (expr);                                                            \
    CALEX_CHECK(calex_err_ == cudaSuccess, "calexnet_fast CUDA error: " << cudaGetErrorString(calex_err_) \
                                                                         << " (" #expr ")");    \
  } while (0)

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  CALEX_SHIM_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

Tensor scratch_bytes(const Tensor& like, int64_t bytes) {
  return torch::stable::empty({std::max<int64_t>(bytes, 1)}, ScalarType::Byte, std::nullopt, like.device());
}

// dst row r (dense, row_vecs vectors) <- src row src_rows[r]; dst row dst_rows[r] when dst_rows is given.
// Rows r with winner[dst row] != r (when winner is given) are skipped. dst and src are plain pointers, not
// __restrict__: the callers never pass overlapping ones, and a read through the read-only (non-coherent)
// cache would be wrong if they ever did.
template <typename V>
__global__ void copy_rows_kernel(V* dst, const V* src,
                                 const int64_t* __restrict__ dst_rows, const int64_t* __restrict__ src_rows,
                                 const int64_t* __restrict__ winner, int64_t n, int64_t row_vecs,
                                 int64_t dst_stride_vecs, int64_t src_stride_vecs) {
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const int64_t d = dst_rows ? dst_rows[r] : r;
    if (winner != nullptr && winner[d] != r) continue;  // a later duplicate owns this row
    const int64_t s = src_rows ? src_rows[r] : r;
    const V* sp = src + s * src_stride_vecs;
    V* dp = dst + d * dst_stride_vecs;
    for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < row_vecs; c += gridDim.x * blockDim.x) {
      dp[c] = sp[c];
    }
  }
}

template <typename V>
void launch_copy_rows(char* dst, const char* src, const int64_t* dst_rows, const int64_t* src_rows,
                      const int64_t* winner, int64_t n, int64_t row_bytes, int64_t dst_stride_bytes,
                      int64_t src_stride_bytes, cudaStream_t stream) {
  const int64_t vs = sizeof(V);
  const int64_t row_vecs = row_bytes / vs;
  const int threads = 256;
  const int64_t blocks_x = std::min<int64_t>((row_vecs + threads - 1) / threads, 64);
  const int64_t blocks_y = std::min<int64_t>(n, 65535);
  dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks_x, 1)), static_cast<unsigned>(blocks_y));
  copy_rows_kernel<V><<<grid, threads, 0, stream>>>(reinterpret_cast<V*>(dst), reinterpret_cast<const V*>(src),
                                                    dst_rows, src_rows, winner, n, row_vecs,
                                                    dst_stride_bytes / vs, src_stride_bytes / vs);
  CALEX_CUDA_CHECK(cudaGetLastError());
}

// Widest vector (16, 8, 4, 2 or 1 bytes) that divides every row size, stride and base address.
void copy_rows(char* dst, const char* src, const int64_t* dst_rows, const int64_t* src_rows,
               const int64_t* winner, int64_t n, int64_t row_bytes, int64_t dst_stride_bytes,
               int64_t src_stride_bytes, cudaStream_t stream) {
  if (n == 0 || row_bytes == 0) return;
  const uint64_t bits = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(dst_stride_bytes) |
                        static_cast<uint64_t>(src_stride_bytes) | reinterpret_cast<uintptr_t>(dst) |
                        reinterpret_cast<uintptr_t>(src);
  if (bits % 16 == 0) {
    launch_copy_rows<uint4>(dst, src, dst_rows, src_rows, winner, n, row_bytes, dst_stride_bytes, src_stride_bytes, stream);
  } else if (bits % 8 == 0) {
    launch_copy_rows<uint2>(dst, src, dst_rows, src_rows, winner, n, row_bytes, dst_stride_bytes, src_stride_bytes, stream);
  } else if (bits % 4 == 0) {
    launch_copy_rows<uint32_t>(dst, src, dst_rows, src_rows, winner, n, row_bytes, dst_stride_bytes, src_stride_bytes, stream);
  } else if (bits % 2 == 0) {
    launch_copy_rows<uint16_t>(dst, src, dst_rows, src_rows, winner, n, row_bytes, dst_stride_bytes, src_stride_bytes, stream);
  } else {
    launch_copy_rows<uint8_t>(dst, src, dst_rows, src_rows, winner, n, row_bytes, dst_stride_bytes, src_stride_bytes, stream);
  }
}

std::tuple<Tensor, Tensor> compact_cuda(Tensor x, Tensor mask) {
  check_compact_args(x, mask);
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  cudaStream_t stream = current_stream(x);
  MemoryFormat fmt;
  if (!row_format(x, &fmt)) {
    x = torch::stable::contiguous(x);
    fmt = MemoryFormat::Contiguous;
  }
  mask = torch::stable::contiguous(mask);
  const int64_t batch = x.size(0);
  CALEX_CHECK(batch < INT_MAX, "compact: x: expected fewer than " << INT_MAX << " rows, got " << batch);

  Tensor index_full = torch::stable::empty({batch}, ScalarType::Long, std::nullopt, x.device());
  int64_t n = 0;
  if (batch > 0) {
    const bool* flags = static_cast<const bool*>(mask.data_ptr());
    int64_t* idx = static_cast<int64_t*>(index_full.data_ptr());
    thrust::counting_iterator<int64_t> positions(0);
    size_t temp_bytes = 0;
    CALEX_CUDA_CHECK(cub::DeviceSelect::Flagged(nullptr, temp_bytes, positions, flags, idx,
                                                static_cast<int64_t*>(nullptr), static_cast<int>(batch), stream));
    Tensor scratch = scratch_bytes(x, static_cast<int64_t>(temp_bytes) + 16);
    char* base = static_cast<char*>(scratch.data_ptr());
    int64_t* d_count = reinterpret_cast<int64_t*>(base);
    CALEX_CUDA_CHECK(cub::DeviceSelect::Flagged(base + 16, temp_bytes, positions, flags, idx, d_count,
                                                static_cast<int>(batch), stream));
    // The one device-to-host read of compact: the number of survivors sizes the outputs.
    CALEX_CUDA_CHECK(cudaMemcpyAsync(&n, d_count, sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
    CALEX_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  Tensor index = torch::stable::narrow(index_full, 0, 0, n);
  Tensor rows = new_rows_like(x, n, fmt);
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const int64_t row_bytes = row_numel(x) * esize;
  copy_rows(static_cast<char*>(rows.data_ptr()), static_cast<const char*>(x.data_ptr()), nullptr,
            static_cast<const int64_t*>(index.data_ptr()), nullptr, n, row_bytes, row_bytes,
            x.stride(0) * esize, stream);
  return std::make_tuple(rows, index);
}

constexpr long long kNoError = LLONG_MAX;

__global__ void elect_rows_kernel(const int64_t* __restrict__ index, int64_t n, int64_t rows,
                                  long long* __restrict__ winner, long long* __restrict__ first_bad) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = index[j];
    if (v < 0 || v >= rows) {
      atomicMin(first_bad, static_cast<long long>(j));
    } else {
      atomicMax(winner + v, static_cast<long long>(j));
    }
  }
}

__global__ void fill_kernel(long long* __restrict__ p, int64_t n, long long value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = value;
  }
}

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 4096)));
}

void scatter_rows__cuda(Tensor out, Tensor src, Tensor index) {
  check_scatter_args(out, src, index);
  check_scatter_out(out);
  const int64_t n = index.size(0);
  if (n == 0) return;
  torch::stable::accelerator::DeviceGuard guard(out.get_device_index());
  cudaStream_t stream = current_stream(out);
  // The copy kernel reads index and src while it writes out: read copies where they may overlap it.
  index = unaliased(torch::stable::contiguous(index), out);
  src = unaliased(src, out);
  const int64_t rows = out.size(0);

  // winner[v] = last j with index[j] == v; first_bad = first position with an out-of-range value.
  Tensor scratch = scratch_bytes(out, (rows + 1) * static_cast<int64_t>(sizeof(long long)));
  long long* first_bad = static_cast<long long*>(scratch.data_ptr());
  long long* winner = first_bad + 1;
  fill_kernel<<<1, 1, 0, stream>>>(first_bad, 1, kNoError);
  if (rows > 0) fill_kernel<<<blocks_for(rows, 256), 256, 0, stream>>>(winner, rows, -1);
  const int64_t* idx = static_cast<const int64_t*>(index.data_ptr());
  elect_rows_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(idx, n, rows, winner, first_bad);
  CALEX_CUDA_CHECK(cudaGetLastError());
  long long bad = kNoError;
  // The one device-to-host read of scatter_rows_: nothing is written unless every index is valid.
  CALEX_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad, sizeof(long long), cudaMemcpyDeviceToHost, stream));
  CALEX_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (bad != kNoError) {
    int64_t value = 0;
    CALEX_CUDA_CHECK(cudaMemcpyAsync(&value, idx + bad, sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
    CALEX_CUDA_CHECK(cudaStreamSynchronize(stream));
    CALEX_CHECK(false, out_of_range_msg(bad, value, rows));
  }

  bool copy_back = false;
  Tensor target = dense_row_target(out, &src, &copy_back);
  const int64_t esize = static_cast<int64_t>(out.element_size());
  const int64_t row_bytes = row_numel(out) * esize;
  copy_rows(static_cast<char*>(target.data_ptr()), static_cast<const char*>(src.data_ptr()), idx, nullptr,
            reinterpret_cast<const int64_t*>(winner), n, row_bytes, target.stride(0) * esize,
            src.stride(0) * esize, stream);
  if (copy_back) torch::stable::copy_(out, target);
}

}  // namespace
}  // namespace calexnet_fast

STABLE_TORCH_LIBRARY_IMPL(calexnet_fast, CUDA, m) {
  m.impl("compact", TORCH_BOX(&calexnet_fast::compact_cuda));
  m.impl("scatter_rows_", TORCH_BOX(&calexnet_fast::scatter_rows__cuda));
  m.impl("scatter_rows", TORCH_BOX(&calexnet_fast::scatter_rows_copy<&calexnet_fast::scatter_rows__cuda>));
}
