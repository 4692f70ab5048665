"""The coordinate-wise rules' device step on CUDA against the CPU kernels.

``run_on_device`` runs ``prepare``/``finish`` on the CPU and the per-coordinate step in plain torch
on the device (``ColumnPlan.device_columns``); ``run_rule`` with ``aggregator.device=cuda`` goes
there. Stated tolerance: the device sums in another order than the CPU kernels (and torch's CUDA
sort and division round alike, so only the sums differ), so aggregates agree to 1e-5 relative
(and 1e-5 absolute for values near 0) and client weights to 1e-6; with integer-valued updates
(tie classes across every window edge) the same holds. The residual's clipping decisions are
discrete: a clipped fraction differing by a few entries in 10^5 is accepted.

Needs only torch (no Ray). ``RAY_FEDIT_GPU_TEST_DEVICE=cpu`` runs the same checks on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from ray_fedit.aggregators import aggregate
from ray_fedit.aggregators.base import run_on_device
from ray_fedit.config import AggregatorConfig
from ray_fedit.federation.sharded import run_rule

CASES = [("median", {}), ("trimmed_mean", {"trim": 3}), ("bulyan", {"f": 3}),
         ("residual", {})]


def _round(ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n, d = 17, 20_011
    u = torch.randint(-3, 4, (n, d), generator=gen).float() if ties else torch.randn(
        n, d, generator=gen)
    u[-3:] *= 5.0
    return u, torch.randint(1, 9, (n,), generator=gen).float()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("name,params", CASES)
def test_device_step_matches_cpu(device, name, params, ties):
    u, sizes = _round(ties)
    cpu = aggregate(name, u, sizes, **params)
    dev = run_on_device(name, u, sizes, device, **params)
    assert dev.aggregate.device.type == "cpu" and dev.client_weights.device.type == "cpu"
    torch.testing.assert_close(dev.aggregate, cpu.aggregate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dev.client_weights, cpu.client_weights, rtol=1e-5, atol=1e-6)
    if name == "residual":
        assert dev.info["clipped_fraction"] == pytest.approx(cpu.info["clipped_fraction"],
                                                             abs=5e-5)


def test_run_rule_places_the_rule_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("run_rule resolves device=cuda only where CUDA is available")
    u, sizes = _round(False)
    res = run_rule(AggregatorConfig(name="median", device="cuda"), "median", u, sizes)
    assert res.info["device"] == "cuda"
    torch.testing.assert_close(res.aggregate, aggregate("median", u, sizes).aggregate,
                               rtol=1e-5, atol=1e-5)
