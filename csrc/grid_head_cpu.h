// The CPU kernel of calexnet_fast::grid_plan_exit (semantics: grid_head_cpu.cpp).
#pragma once

#include <tuple>

#include "ops_common.h"

namespace calexnet_fast {

std::tuple<Tensor, Tensor, Tensor, Tensor> grid_plan_exit_cpu(Tensor x, Tensor proj_weight_t, Tensor proj_bias,
                                                              Tensor prototypes_t, Tensor s_windows, Tensor x_windows,
                                                              Tensor cls_weight, Tensor cls_bias, Tensor thresholds,
                                                              double eps);

}  // namespace calexnet_fast
