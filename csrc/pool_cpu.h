// The CPU kernel of calexnet_fast::max_pool2d (semantics: pool_cpu.cpp).
#pragma once

#include "ops_common.h"

namespace calexnet_fast {

Tensor max_pool2d_cpu(Tensor x, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                      int64_t padding_h, int64_t padding_w);

}  // namespace calexnet_fast
