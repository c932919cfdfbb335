"""Distorted inputs for contrast branches: diffusion-noised image, blank image, no image.

All distortions act on the processor's *normalised* pixels, as the official VCD code does.
"""

from __future__ import annotations

from typing import Any

import torch

from veridical.adapters import Inputs, ModelAdapter
from veridical.errors import MethodSpecError

CONTRAST_KINDS: tuple[str, ...] = ("noise", "blank", "no_image")
DIFFUSION_STEPS = 1000


def diffusion_alpha_bar(noise_step: int) -> float:
    """Cumulative signal fraction of VCD's forward-diffusion schedule at ``noise_step`` (0..999).

    VCD uses a sigmoid beta schedule from 1e-5 to 5e-3 over 1000 steps; ``x_t = sqrt(abar_t) * x
    + sqrt(1 - abar_t) * eps``. At step 500 this is about ``0.863 x + 0.505 eps``.
    """
    if not 0 <= noise_step < DIFFUSION_STEPS:
        raise MethodSpecError(f"noise_step must be in [0, {DIFFUSION_STEPS - 1}], got {noise_step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, dim=0)[noise_step])


def add_diffusion_noise(
    pixels: torch.Tensor, noise_step: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``pixels`` after ``noise_step`` steps of VCD's forward diffusion (Gaussian noise)."""
    abar = diffusion_alpha_bar(noise_step)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32, device="cpu")
    noisy = abar**0.5 * pixels.float() + (1 - abar) ** 0.5 * eps.to(pixels.device)
    return noisy.to(pixels.dtype)


def contrast_inputs(
    adapter: ModelAdapter, inputs: Inputs, kind: str, noise_step: int = 500, seed: int | None = None
) -> dict[str, Any]:
    """Inputs of the contrast branch for ``kind``.

    - ``"noise"``: the image with VCD's diffusion noise (``seed`` makes it reproducible; ``None``
      draws from torch's global generator like the official code),
    - ``"blank"``: the mean image, i.e. zeros after normalisation,
    - ``"no_image"``: the prompt with the image placeholder tokens removed.
    """
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return adapter.map_pixels(inputs, lambda x: add_diffusion_noise(x, noise_step, generator))
    if kind == "blank":
        return adapter.map_pixels(inputs, torch.zeros_like)
    if kind == "no_image":
        return adapter.without_image(inputs)
    raise MethodSpecError(f"unknown contrast {kind!r}; choose one of {', '.join(CONTRAST_KINDS)}")
