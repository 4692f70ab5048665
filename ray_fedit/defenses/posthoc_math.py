"""The maths of one post-hoc defense step, without Ray or DeepSpeed.

Global token mean under data parallelism. Rank ``r`` of ``W`` holds ``n_r`` target tokens with
summed cross-entropy ``s_r``; the loss of the step is ``sum_r s_r / N`` with ``N = sum_r n_r``
(one large batch, as in FedIT's local steps). DDP and DeepSpeed average gradients over ranks, so
each rank back-propagates ``s_r * W / N``: ``mean_r grad(s_r * W / N) = grad(sum_r s_r) / N``. A
rank with ``n_r = 0`` back-propagates ``0 * W / N`` and contributes a zero gradient, but it still
runs backward: the averaging is a collective that every rank must join.

AdamW restart. The paper runs the defense as rounds of one-client FL, building a fresh AdamW every
round. DeepSpeed builds its optimizer once and keeps references to its state tensors (partitions,
offload buffers), so a round restarts the optimizer in place instead: zero moments and step
counts are exactly the state a fresh Adam starts from.
"""

from __future__ import annotations

import torch


def scaled_loss(loss_sum: torch.Tensor, world_size: int, global_tokens: int) -> torch.Tensor:
    """A rank's loss whose rank-averaged gradient is the gradient of the global token mean.

    Args:
        loss_sum: this rank's cross-entropy summed over its target tokens (0 if it has none).
        world_size: ranks that average their gradients.
        global_tokens: target tokens over all ranks (> 0).

    Returns:
        ``loss_sum * world_size / global_tokens``; with one rank, ``loss_sum / global_tokens``.
    """
    return loss_sum * world_size / global_tokens


def restart_optimizer(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Put an Adam-family optimizer back in its freshly built state, in place, at learning rate ``lr``.

    Every state tensor (moments, tensor step counts) is zeroed, number entries (DeepSpeed CPU
    Adam's step) and group step counters (DeepSpeed FusedAdam) are set to 0; the tensors stay the
    same objects.
    """
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif isinstance(value, int | float):
                state[key] = type(value)(0)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "step" in group:
            group["step"] = 0
