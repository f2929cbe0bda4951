// The CPU kernel of calexnet_fast::grid_head_epilogue (semantics: grid_head_cpu.cpp).
#pragma once

#include <tuple>

#include "ops_common.h"

namespace calexnet_fast {

std::tuple<Tensor, Tensor, Tensor, Tensor> grid_head_epilogue_cpu(Tensor u, Tensor s, Tensor x, Tensor s_windows,
                                                                  Tensor x_windows, Tensor cls_weight, Tensor cls_bias,
                                                                  Tensor thresholds, double eps);

}  // namespace calexnet_fast
