"""Gaussian noise: attackers send (or add) isotropic Gaussian noise.

A standard Byzantine baseline, e.g. Blanchard et al., "Machine Learning with Adversaries",
NeurIPS 2017, and Li et al., "RSA", AAAI 2019. ``mode="replace"`` sends ``N(0, sigma^2 I)``;
``mode="add"`` sends ``Delta_i + N(0, sigma^2 I)``. ``sigma`` is in the units of the deltas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ray_fedit.attacks.update.base import check_inputs, with_rows
from ray_fedit.errors import ConfigError
from ray_fedit.registry import ATTACKS

MODES = ("replace", "add")


@ATTACKS.register("gaussian_noise", kind="update")
def gaussian_noise(
    deltas: Tensor,
    malicious_mask: Tensor,
    *,
    generator: torch.Generator,
    sigma: float = 1.0,
    mode: str = "replace",
) -> Tensor:
    """Return a copy of ``deltas`` whose malicious rows are (or get added) Gaussian noise.

    Args:
        deltas: ``(n, d)`` client deltas.
        malicious_mask: ``(n,)`` bool, True for attackers.
        generator: CPU generator the noise is drawn from (rows in client order).
        sigma: noise standard deviation.
        mode: ``"replace"`` or ``"add"``.

    Raises:
        ConfigError: unknown ``mode`` or negative ``sigma``.
    """
    check_inputs("gaussian_noise", deltas, malicious_mask)
    if mode not in MODES:
        raise ConfigError(f"gaussian_noise: mode={mode!r} must be one of {MODES}")
    if not sigma >= 0:
        raise ConfigError(f"gaussian_noise: sigma={sigma} must be >= 0")
    k = int(malicious_mask.sum())
    noise = torch.randn((k, deltas.shape[1]), generator=generator, dtype=torch.float32) * sigma
    rows = noise if mode == "replace" else deltas[malicious_mask] + noise
    return with_rows(deltas, malicious_mask, rows)
