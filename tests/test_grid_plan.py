"""The folded grid head's eager plans (calexnet_fast.heads.grid_plan) against their twin, grid_head_reference."""

import pytest
import torch

from calexnet_fast.heads import FoldedGridPrototypeHead, GridPrototypeHead
from calexnet_fast.heads.grid_plan import GridHeadPlan, grid_head_plan, single_pixel_cells
from calexnet_fast.reference import grid_head_reference


def _folded(c: int, n_classes: int = 7, grid: int = 2, feature_grid: int = 4, max_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    sizes = dict(grid=grid, feature_grid=feature_grid, max_size=max_size)
    head = GridPrototypeHead(c, n_classes, dim=12, n_prototypes=5, **sizes)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
    return head.eval().fold()


def _reference(folded: FoldedGridPrototypeHead, f: torch.Tensor) -> torch.Tensor:
    return grid_head_reference(f, *folded.operands(), folded.grid, folded.feature_grid, folded.max_size)


def test_single_pixel_cells_follow_adaptive_pooling():
    assert single_pixel_cells(4, 4).tolist() == [0, 1, 2, 3]  # the grid is the map
    assert single_pixel_cells(2, 4).tolist() == [0, 0, 1, 1]  # a larger grid repeats pixels
    assert single_pixel_cells(1, 3).tolist() == [0, 0, 0]
    assert single_pixel_cells(3, 4) is None  # windows [0,1) [0,2) [1,3) [2,3): two are two pixels wide
    assert single_pixel_cells(8, 4) is None  # real pooling
    for size in range(1, 9):
        for cells in range(1, 9):
            pixels = single_pixel_cells(size, cells)
            t = torch.arange(float(size)).view(1, 1, size, 1)
            pooled = torch.nn.functional.adaptive_max_pool2d(t, (cells, 1)).view(-1)
            if pixels is not None:  # a gather: max and mean both pick the pixel
                assert pooled.tolist() == pixels.double().tolist()
                avg = torch.nn.functional.adaptive_avg_pool2d(t, (cells, 1)).view(-1)
                assert avg.tolist() == pixels.double().tolist()


@pytest.mark.parametrize(
    "c,h,w,grid,fgrid,size",
    [
        (6, 8, 8, 2, 4, 8),  # real pooling everywhere
        (6, 4, 4, 2, 4, 8),  # the feature grid is the map: folded
        (6, 2, 2, 2, 4, 8),  # both grids only repeat pixels: folded
        (6, 1, 1, 2, 4, 8),
        (6, 2, 3, 2, 4, 8),  # folded rows, pooled columns (3 on 4 cells is not a gather)
        (5, 7, 9, 3, 2, 5),  # sizes the grids do not divide, a working map smaller than the input
        (5, 32, 32, 2, 4, 8),  # the working map pools first
        (3, 1, 5, 1, 1, 8),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_plan_equals_twin_in_float64(c, h, w, grid, fgrid, size, layout):
    folded = _folded(c, grid=grid, feature_grid=fgrid, max_size=size).double()
    f = torch.randn(4, c, h, w, dtype=torch.float64)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        f = torch.randn(4, c, h, 2 * w, dtype=torch.float64)[..., ::2]
    expect = _reference(folded, f)
    got = folded(f)
    assert got.dtype == torch.float64 and got.shape == (4, 7)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plan_within_twice_the_twins_error(dtype):
    folded = _folded(16)
    for h in (8, 4, 2):
        f = torch.randn(32, 16, h, h)
        exact = _reference(folded.double(), f.double())
        twin = _reference(folded.to(dtype), f.to(dtype)).double()
        got = folded.to(dtype)(f.to(dtype))
        assert got.dtype == dtype
        twin_err = (twin - exact).abs().max().item()
        got_err = (got.double() - exact).abs().max().item()
        assert got_err <= 2 * twin_err + 1e-6, (h, got_err, twin_err)


def test_plan_on_each_device(device):
    """On CUDA the cascade runs the fused kernel; the folded head's own forward (the plan) must work there too."""
    folded = _folded(16).to(device)
    for h in (8, 4, 2):
        f = torch.randn(6, 16, h, h, device=device)
        torch.testing.assert_close(folded(f), _reference(folded, f), rtol=1e-4, atol=1e-4)
        cl = f.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(folded(cl), _reference(folded, cl), rtol=1e-4, atol=1e-4)


def test_empty_batch_and_one_row():
    folded = _folded(6)
    for h in (8, 2):
        assert folded(torch.randn(0, 6, h, h)).shape == (0, 7)
        one = torch.randn(1, 6, h, h)
        torch.testing.assert_close(folded(one), _reference(folded, one), rtol=1e-5, atol=1e-5)


def test_plans_are_cached_per_geometry_and_rebuilt_when_a_buffer_changes():
    folded = _folded(6)
    f = torch.randn(3, 6, 4, 4)
    plan = grid_head_plan(folded, f)
    assert isinstance(plan, GridHeadPlan)
    assert grid_head_plan(folded, torch.randn(9, 6, 4, 4)) is plan  # the batch size is not part of the geometry
    assert grid_head_plan(folded, f.contiguous(memory_format=torch.channels_last)) is plan
    assert grid_head_plan(folded, torch.randn(3, 6, 2, 2)) is not plan
    assert grid_head_plan(folded, f.double()) is not plan
    before = folded(f)
    with torch.no_grad():
        folded.cls_weight.mul_(2.0)  # in place: the plan must see it
        folded.cls_bias.mul_(2.0)
    torch.testing.assert_close(folded(f), 2 * before, rtol=1e-5, atol=1e-5)
    assert grid_head_plan(folded, f) is not plan
    folded.proj_bias = torch.zeros_like(folded.proj_bias)  # replaced
    torch.testing.assert_close(folded(f), _reference(folded, f), rtol=1e-5, atol=1e-5)


def test_a_head_folded_under_inference_mode_runs_outside_it():
    head = _folded(6)
    with torch.inference_mode():
        folded = GridPrototypeHead(6, 7, dim=12, n_prototypes=5).eval().fold()
        f = torch.randn(2, 6, 4, 4)
        inside = folded(f)
    torch.testing.assert_close(folded(f), inside, rtol=0, atol=0)
    assert head(f).shape == (2, 7)


def test_torchscript_runs_the_twin():
    folded = _folded(6)
    scripted = torch.jit.script(folded)
    f = torch.randn(3, 6, 2, 2)
    torch.testing.assert_close(scripted(f), _reference(folded, f), rtol=0, atol=0)
    torch.testing.assert_close(scripted(f), folded(f), rtol=1e-5, atol=1e-5)
