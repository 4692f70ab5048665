"""The defense step's maths: the global token mean under gradient averaging, the per-round AdamW
restart, and an adapter init that does not depend on the rank."""

from __future__ import annotations

import subprocess
import sys
import types

import torch

from ray_fedit.defenses.posthoc_math import restart_optimizer, scaled_loss
from tests.conftest import ROOT

BLOCK_RAY_AND_DEEPSPEED = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "deepspeed"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, _Block())
import ray_fedit.defenses.posthoc_math
"""


def test_the_maths_imports_without_ray_or_deepspeed():
    res = subprocess.run([sys.executable, "-c", BLOCK_RAY_AND_DEEPSPEED], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def _averaged_gradient(per_rank_tokens: list[list[float]]) -> float:
    """What DDP / DeepSpeed hand the optimizer: the mean over ranks of each rank's gradient of
    ``scaled_loss`` for the 1-parameter model whose per-token loss is ``w * x``."""
    world = len(per_rank_tokens)
    global_tokens = sum(len(xs) for xs in per_rank_tokens)
    grads = []
    for xs in per_rank_tokens:
        w = torch.tensor(0.5, requires_grad=True)
        summed = (w * torch.tensor(xs)).sum()  # an empty batch sums to 0 and still has a graph
        scaled_loss(summed, world, global_tokens).backward()
        grads.append(float(w.grad))
    return sum(grads) / world


def test_averaged_gradients_are_the_global_token_mean_with_unequal_counts():
    """rank 0: x = 1, 2, 3; rank 1: x = 4. Global mean gradient = (1 + 2 + 3 + 4) / 4 = 2.5.
    Scaled: rank 0 -> 6 * 2 / 4 = 3, rank 1 -> 4 * 2 / 4 = 2, averaged 2.5 (the mean of the
    per-rank means would be (2 + 4) / 2 = 3)."""
    assert _averaged_gradient([[1.0, 2.0, 3.0], [4.0]]) == 2.5


def test_a_rank_without_target_tokens_contributes_a_zero_gradient():
    """rank 0: x = 1, 2, 3; rank 1: no target token. Global mean = 6 / 3 = 2.
    Scaled: rank 0 -> 6 * 2 / 3 = 4, rank 1 -> 0, averaged 2."""
    assert _averaged_gradient([[1.0, 2.0, 3.0], []]) == 2.0


def test_one_rank_is_the_plain_token_mean():
    """world 1: summed * 1 / n is the token mean, bit for bit (7 / 3)."""
    summed = torch.tensor(7.0)
    assert torch.equal(scaled_loss(summed, 1, 3), summed / 3)


def _adamw_steps(opt: torch.optim.Optimizer, w: torch.nn.Parameter, grads: list[float]) -> list[float]:
    out = []
    for g in grads:
        w.grad = torch.tensor([g])
        opt.step()
        out.append(float(w.detach()))
    return out


def test_restart_makes_adamw_behave_as_freshly_built():
    """3 steps, restart at lr 0.05, 2 steps == a fresh AdamW at lr 0.05 from the same weight (bitwise).
    Without the restart the moments of the first 3 steps would change the 2 later updates."""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    _adamw_steps(opt, w, [1.0, -2.0, 3.0])
    start = float(w)
    restart_optimizer(opt, lr=0.05)
    restarted = _adamw_steps(opt, w, [0.5, 4.0])

    fresh_w = torch.nn.Parameter(torch.tensor([start]))
    fresh = _adamw_steps(torch.optim.AdamW([fresh_w], lr=0.05, weight_decay=0.0), fresh_w, [0.5, 4.0])
    assert restarted == fresh
    assert opt.param_groups[0]["lr"] == 0.05


def test_restart_resets_group_step_counters_and_plain_number_state():
    """DeepSpeed's FusedAdam counts steps in the param group, its CPU Adam in an int in the state."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    opt.param_groups[0]["step"] = 7
    opt.state[w] = {"step": 7, "exp_avg": torch.ones(2)}
    moment = opt.state[w]["exp_avg"]
    restart_optimizer(opt, lr=0.5)
    assert opt.param_groups[0]["step"] == 0 and opt.state[w]["step"] == 0
    assert moment.sum() == 0 and opt.state[w]["exp_avg"] is moment  # zeroed in place
    assert opt.param_groups[0]["lr"] == 0.5


def test_deepspeed_wrappers_are_unwrapped_to_their_torch_optimizers():
    """A ZeRO optimizer holds the torch optimizer in ``.optimizer`` (and, with partial offload,
    a second one in ``.backup_optimizer``); a stage-0 fp32 engine holds the torch one itself."""
    from ray_fedit.defenses.posthoc import torch_optimizers

    inner = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    backup = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    zero = types.SimpleNamespace(optimizer=inner, backup_optimizer=backup)
    assert torch_optimizers(zero) == [inner, backup]
    assert torch_optimizers(types.SimpleNamespace(optimizer=inner)) == [inner]
    assert torch_optimizers(inner) == [inner]


def test_lora_init_is_the_same_on_every_rank(tiny_config):
    """Each rank builds the model after seeding torch with its own stream (dropout, ...): the LoRA A
    init must come from the run's seed alone. A different run seed gives a different init."""
    from ray_fedit.defenses.posthoc import build_lora_model
    from ray_fedit.models.lora import adapter_state

    states = []
    for rank_seed in (11, 22):
        torch.manual_seed(rank_seed)
        model, _ = build_lora_model(tiny_config, None, "cpu")
        states.append(adapter_state(model))
    a_keys = [k for k in states[0] if "lora_A" in k]
    assert a_keys and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other, _ = build_lora_model(tiny_config.model_copy(update={"seed": tiny_config.seed + 1}), None, "cpu")
    assert not torch.equal(adapter_state(other)[a_keys[0]], states[0][a_keys[0]])
