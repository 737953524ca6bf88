"""DC's layer-wise gradient distance on hand-made gradients (closed forms)."""
import math

import pytest
import torch

from splatdd_dc import dc_loops, layer_distance, match_loss

EPS_TOL = 1e-5   # the distance adds 1e-6 to the norm product, as the DC code does


def test_identical_rows_give_zero():
    g = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 2.0]])
    assert layer_distance(g, g.clone()).item() == pytest.approx(0.0, abs=EPS_TOL)


def test_opposite_rows_give_two_per_row():
    g = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 2.0], [0.0, 0.0, 7.0]])
    assert layer_distance(g, -g).item() == pytest.approx(2.0 * 3, abs=EPS_TOL)


def test_orthogonal_rows_give_one_per_row():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[0.0, 5.0], [2.0, 0.0]])
    assert layer_distance(a, b).item() == pytest.approx(2.0, abs=EPS_TOL)


def test_rowwise_not_global_cosine_and_scale_invariant():
    # Row 0 identical, row 1 opposite: 0 + 2. A global cosine would give something else.
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[6.0, 8.0], [-10.0, -10.0]])
    assert layer_distance(a, b).item() == pytest.approx(2.0, abs=EPS_TOL)
    # Known angle: 60 degrees -> 1 - 0.5.
    c = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.5, math.sqrt(3) / 2]])
    assert layer_distance(c, d).item() == pytest.approx(0.5, abs=EPS_TOL)


def test_conv_kernel_reshaped_by_output_channel():
    # (out=2, in=1, 2, 2): output channel 0 identical, channel 1 opposite -> 0 + 2.
    a = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[1] = -b[1]
    assert layer_distance(a, b).item() == pytest.approx(2.0, abs=EPS_TOL)
    # Flattened per row: the distance equals the 2-D one on reshape(2, -1).
    c = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    assert layer_distance(a, c).item() == pytest.approx(
        layer_distance(a.reshape(2, -1), c.reshape(2, -1)).item(), abs=1e-6)


def test_bias_and_norm_gradients_ignored():
    w = torch.tensor([[1.0, 2.0]])
    bias_real, bias_syn = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 5.0])
    total = match_loss([w, bias_real], [-w, bias_syn])
    assert total.item() == pytest.approx(2.0, abs=EPS_TOL)
    assert layer_distance(bias_real, bias_syn).item() == 0.0


def test_gradient_flows_to_synthetic_side_only_through_weights():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], requires_grad=True)
    bias = torch.tensor([1.0, 1.0], requires_grad=True)
    match_loss([a, torch.ones(2)], [b, bias]).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert bias.grad is None or bias.grad.abs().sum() == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        layer_distance(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (50, (50, 10)),
                                       (20, (20, 25)), (5, (5, 50)), (100, (50, 5))])
def test_loops_by_ipc(ipc, loops):
    assert dc_loops(ipc) == loops
