"""Sharded aggregation on a local Ray instance: every column plan, several shard counts.

``run_rule`` with ``num_shards > 1`` cuts the columns at multiples of the rule's chunk width, puts
each range into the object store as row segments and runs the rule's ``columns`` step as one Ray
task per range. The result must be the in-process one bitwise, for shard counts that do and do
not divide the chunk count, and with more shards than CPUs (tasks queue).
"""

from __future__ import annotations

import pytest
import torch

from ray_fedit.aggregators import aggregate, base
from ray_fedit.config import AggregatorConfig
from ray_fedit.federation.sharded import run_rule

N = 11
WIDTH = base.column_chunk_width(N)  # columns per chunk of median, trimmed mean and Bulyan
D = 7 * WIDTH + 4_999  # 8 chunks, the last one short; 7 shards of whole chunks do not divide it

CASES = [("median", {}), ("trimmed_mean", {"trim": 2}), ("bulyan", {"f": 2}),
         ("residual", {"shard_size": 3000})]


@pytest.fixture(scope="module")
def round_inputs():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(N, D, generator=gen)
    u[-2:] *= 5.0
    u[:, :50] = torch.randint(-1, 2, (N, 50), generator=gen).float()  # tie-heavy columns
    return u, torch.randint(1, 9, (N,), generator=gen).float()


@pytest.mark.parametrize("name,params", CASES)
def test_shards_equal_the_in_process_result(ray_session, round_inputs, name, params):
    u, sizes = round_inputs
    ref = aggregate(name, u, sizes, **params)
    for shards in (1, 2, 3, 7):
        cfg = AggregatorConfig(name=name, num_shards=shards)
        res = run_rule(cfg, name, u, sizes, **params)
        assert torch.equal(res.aggregate, ref.aggregate), shards
        assert torch.equal(res.client_weights, ref.client_weights), shards
        assert {k: v for k, v in res.info.items() if k != "shards"} == ref.info
        chunks = -(-D // (params["shard_size"] if name == "residual" else WIDTH))
        assert res.info.get("shards", 1) == min(shards, chunks)  # 1: in process


def test_fractional_cpus_and_bad_inputs(ray_session, round_inputs):
    """Half a CPU per shard runs (one thread); a NaN is reported before any task is started."""
    u, sizes = round_inputs
    cfg = AggregatorConfig(name="median", num_shards=4, cpus_per_shard=0.5)
    assert torch.equal(run_rule(cfg, "median", u, sizes).aggregate,
                       aggregate("median", u, sizes).aggregate)
    bad = u.clone()
    bad[3, 5] = float("nan")
    from ray_fedit.errors import AggregationError

    with pytest.raises(AggregationError, match=r"row\(s\) \[3\]"):
        run_rule(cfg, "median", bad, sizes)
