r"""Shared diffusion-model machinery: noise levels, denoising score matching, EMA, a compact U-Net,
and samplers (reverse-SDE predictor–corrector, probability-flow ODE).

Conventions (Karras et al. 2022, "EDM", arXiv:2206.00364). Everything is written for the
variance-exploding process x_σ = x_0 + σ ε, ε ~ N(0, I), indexed by the noise level σ. A
variance-preserving (DDPM/VP) process z_t = α_t x_0 + σ_t ε is the same process rescaled,
x_σ = z_t/α_t with σ = σ_t/α_t (EDM §2), so one machinery serves both.

* **Denoiser** D(x; σ) ≈ E[x_0 | x_σ = x], parametrised as D = c_skip x + c_out F(c_in x; c_noise, cond)
  with c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²),
  c_noise = ¼ ln σ (EDM Table 1), σ_d the data standard deviation.
* **Score** by Tweedie's formula: ∇ log p_σ(x) = (D(x; σ) − x)/σ².
* **Loss** (denoising score matching, Vincent 2011; EDM eq. 2 and Table 1):
  E_{σ, x_0, ε} λ(σ) ‖D(x_0 + σ ε; σ) − x_0‖², λ = (σ² + σ_d²)/(σ σ_d)², ln σ ~ N(P_mean, P_std²).
* **Reverse SDE** dx = −d[σ²] ∇ log p_σ(x) + √(d[σ²]/dt) dW̄ (Song et al. 2021, eq. 6 for VE),
  discretised on the noise levels σ_0 > … > σ_{N−1} of Karras et al. (eq. 5, ρ = 7).
* **EMA** of the weights (Polyak averaging), θ̄ ← d θ̄ + (1 − d) θ with d = min(decay, (1 + n)/(10 + n)).

The U-Net is generic (in/out channels, an optional conditioning vector, an optional circular
padding for periodic fields), so conditional emulators reuse it: pass ``cond [B, cond_dim]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SbipipeError

__all__ = [
    "Denoiser",
    "ScoreFn",
    "ScoreModel",
    "UNet",
    "denoiser_score",
    "dsm_loss",
    "ema_update",
    "karras_sigmas",
    "ode_sample",
    "pc_sample",
]

#: A score function ``score(x [B, ...], sigma: float) -> [B, ...]`` (∇ₓ log p_σ(x)).
ScoreFn = Callable[[Tensor, float], Tensor]


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, FiLM by the embedding (scale and shift), GroupNorm–SiLU–conv, residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, pad: str, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=pad)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode=pad)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    r"""Compact U-Net F(x; c_noise, cond) for images ``[B, C_in, H, W] → [B, C_out, H, W]``.

    ``channels`` per resolution level (each level but the last halves H and W with a stride-2
    convolution; H and W must be divisible by 2^(levels − 1)), ``blocks`` residual blocks per level,
    a noise-level embedding (sinusoidal features of c_noise → MLP; Vaswani et al. 2017, as in
    Ho et al. 2020) to which a linear map of the optional conditioning vector ``cond [B, cond_dim]``
    is added; every residual block is modulated by it (FiLM: scale and shift after GroupNorm).
    ``circular=True`` pads every convolution periodically (for fields on a torus); then the
    network is equivariant to circular shifts by multiples of 2^(levels − 1) pixels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        blocks: int = 1,
        cond_dim: int = 0,
        circular: bool = False,
        emb_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not channels or blocks < 1:
            raise SbipipeError(f"UNet needs at least one level and one block, got channels={channels}, blocks={blocks}")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "channels": list(channels),
                       "blocks": blocks, "cond_dim": cond_dim, "circular": circular, "emb_dim": emb_dim,
                       "dropout": dropout}
        pad = "circular" if circular else "zeros"
        self.cond_dim = cond_dim
        self.levels = len(channels)
        self.freq_dim = emb_dim // 2
        self.emb = nn.Sequential(nn.Linear(2 * self.freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond = nn.Linear(cond_dim, emb_dim) if cond_dim else None
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1, padding_mode=pad)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = channels[0]
        for i, ch in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(_ResBlock(c, ch, emb_dim, pad, dropout))
                c = ch
            self.down_blocks.append(level)
            if i < self.levels - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1, padding_mode=pad))
        self.mid = nn.ModuleList([_ResBlock(c, c, emb_dim, pad, dropout), _ResBlock(c, c, emb_dim, pad, dropout)])
        self.up_blocks = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(self.levels)):
            ch = channels[i]
            level = nn.ModuleList()
            for j in range(blocks):  # the first block of a level takes the skip connection
                level.append(_ResBlock(c + ch if j == 0 else c, ch, emb_dim, pad, dropout))
                c = ch
            self.up_blocks.append(level)
            if i > 0:
                self.upsample.append(nn.Conv2d(c, channels[i - 1], 3, padding=1, padding_mode=pad))
                c = channels[i - 1]
        self.head_norm = nn.GroupNorm(_groups(c), c)
        self.head = nn.Conv2d(c, out_channels, 3, padding=1, padding_mode=pad)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _embedding(self, noise: Tensor, cond: Tensor | None, batch: int) -> Tensor:
        noise = noise.reshape(-1).expand(batch) if noise.numel() == 1 else noise.reshape(batch)
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(self.freq_dim, device=noise.device) / self.freq_dim)
        arg = (1000.0 * noise.float())[:, None] * freqs[None]  # c_noise ∈ ~[−2, 1]: scale like a timestep
        emb = self.emb(torch.cat([arg.sin(), arg.cos()], dim=1))
        if self.cond is not None:
            if cond is None:
                raise SbipipeError(f"this UNet is conditional (cond_dim={self.cond_dim}); pass cond [B, {self.cond_dim}]")
            emb = emb + self.cond(cond.reshape(batch, self.cond_dim).to(emb.dtype))
        return emb

    def forward(self, x: Tensor, noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, C_in, H, W]``, ``noise [B]`` (or a scalar): c_noise; ``cond [B, cond_dim]``."""
        div = 2 ** (self.levels - 1)
        if x.shape[-1] % div or x.shape[-2] % div:
            raise SbipipeError(
                f"UNet with {self.levels} levels needs H and W divisible by {div}, got {list(x.shape[-2:])}"
            )
        emb = self._embedding(noise, cond, x.shape[0])
        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.down_blocks):
            for block in level:
                h = block(h, emb)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, emb)
        for k, level in enumerate(self.up_blocks):
            skip = skips.pop()
            for j, block in enumerate(level):
                h = block(torch.cat([h, skip], dim=1) if j == 0 else h, emb)
            if k < self.levels - 1:
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(F.silu(self.head_norm(h)))


# ---------------------------------------------------------------------------------------------
# Preconditioned denoiser, loss, EMA.
# ---------------------------------------------------------------------------------------------


class Denoiser(nn.Module):
    r"""D(x; σ, cond) = c_skip x + c_out F(c_in x; ¼ ln σ, cond) (EDM Table 1) around a network F
    (e.g. :class:`UNet`); ``sigma_data`` = σ_d, the data standard deviation."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.numel() > 1 else sigma.reshape([1] * x.ndim)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = sigma.log().reshape(-1) / 4
        return c_skip * x + c_out * self.net(c_in * x, c_noise, cond)


def dsm_loss(
    denoiser: Callable[..., Tensor],
    x0: Tensor,
    cond: Tensor | None = None,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Denoising score matching (EDM eq. 2, Table 1): mean over the batch and pixels of
    λ(σ) (D(x_0 + σ ε; σ) − x_0)², ln σ ~ N(``p_mean``, ``p_std``²), λ = (σ² + σ_d²)/(σ σ_d)².
    ``generator`` None draws from the global RNG (seeded by :func:`sbipipe.training.fit`)."""
    b = x0.shape[0]
    shape = (b,) + (1,) * (x0.ndim - 1)
    n = torch.randn(b, generator=generator, device=x0.device if generator is None else generator.device)
    sigma = (p_mean + p_std * n.to(x0.device)).exp().to(x0.dtype)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else generator.device)
    eps = eps.to(device=x0.device, dtype=x0.dtype)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    denoised = denoiser(x0 + sigma.reshape(shape) * eps, sigma, cond)
    return (weight.reshape(shape) * (denoised - x0) ** 2).mean()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """θ_target ← decay θ_target + (1 − decay) θ_source, parameter by parameter (buffers copied)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


class ScoreModel(nn.Module):
    r"""A :class:`Denoiser` trained by :func:`dsm_loss` with an EMA copy of its weights, in the form
    the one training loop (:func:`sbipipe.training.fit`) takes: ``loss(x0[, cond]) -> scalar``.

    In training mode each ``loss`` call first moves the EMA towards the current weights (the ones
    the previous optimiser step produced), so the EMA advances once per step, with the warm-up
    d = min(decay, (1 + n)/(10 + n)). In evaluation mode the loss is computed with the EMA weights
    and fixed noise (seed 0), so the validation loss, and early stopping, judge the weights that
    are kept, without sampling noise between epochs. The EMA's parameters do not require grad, so
    the optimiser leaves them alone; they live in the state dict (checkpoints, best weights)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, ema_decay: float = 0.999,
                 p_mean: float = -1.2, p_std: float = 1.2):
        super().__init__()
        self.denoiser = Denoiser(net, sigma_data)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.ema_decay = float(ema_decay)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def loss(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        sd = self.denoiser.sigma_data
        if self.training:
            n = int(self.ema_steps)
            ema_update(self.ema, self.denoiser, min(self.ema_decay, (1 + n) / (10 + n)))
            self.ema_steps += 1
            return dsm_loss(self.denoiser, x0, cond, sd, self.p_mean, self.p_std)
        gen = torch.Generator(device=x0.device).manual_seed(0)
        return dsm_loss(self.ema, x0, cond, sd, self.p_mean, self.p_std, generator=gen)


# ---------------------------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    r"""N noise levels σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, decreasing
    from σ_max to σ_min (Karras et al. 2022, eq. 5), float64 ``[n]``."""
    if n < 2 or not 0 < sigma_min < sigma_max:
        raise SbipipeError(f"need n ≥ 2 and 0 < sigma_min < sigma_max, got n={n}, [{sigma_min}, {sigma_max}]")
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def denoiser_score(denoiser: Callable[..., Tensor], cond: Tensor | None = None) -> ScoreFn:
    """Tweedie: ∇ log p_σ(x) = (D(x; σ) − x)/σ², evaluated without gradients."""

    def score(x: Tensor, sigma: float) -> Tensor:
        with torch.no_grad():
            return (denoiser(x, sigma, cond) - x) / sigma**2

    return score


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)


def pc_sample(
    score: ScoreFn,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    corrector_steps: int = 1,
    snr: float = 0.16,
    final_corrector_steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    r"""Predictor–corrector sampling of the reverse VE SDE (Song et al. 2021, Algorithms 2 and 4).

    ``x`` is the start at level σ_0 = ``sigmas[0]`` (e.g. mean + σ_0 ε); ``sigmas`` decrease.
    For each level i: ``corrector_steps`` Langevin steps at σ_i,
    x ← x + η g + √(2η) z with g = score(x, σ_i), η = 2 (snr ⟨‖z‖⟩/⟨‖g‖⟩)², ⟨·⟩ the mean over
    the batch (the signal-to-noise rule of Song et al.'s reference code), then the reverse-diffusion
    predictor to σ_{i+1}, x ← x + (σ_i² − σ_{i+1}²) g + √(σ_i² − σ_{i+1}²) z. After the last level
    ``final_corrector_steps`` (default: ``corrector_steps``) Langevin steps at σ_{N−1}. Returns x at
    σ_{N−1} (not denoised). The score may be any function, e.g. a prior score plus a likelihood
    score (posterior sampling)."""
    sig = [float(s) for s in sigmas]
    final = corrector_steps if final_corrector_steps is None else final_corrector_steps
    total = len(sig)

    def correct(x: Tensor, s: float, k: int) -> Tensor:
        for _ in range(k):
            g = score(x, s)
            z = _randn_like(x, generator)
            ratio = z.flatten(1).norm(dim=1).mean() / g.flatten(1).norm(dim=1).mean().clamp_min(1e-30)
            eta = float(2 * (snr * ratio) ** 2)
            x = x + eta * g + math.sqrt(2 * eta) * z
        return x

    for i, s in enumerate(sig):
        if i < total - 1:
            x = correct(x, s, corrector_steps)
            h = s * s - sig[i + 1] ** 2
            x = x + h * score(x, s) + math.sqrt(h) * _randn_like(x, generator)
        else:
            x = correct(x, s, final)
        if progress is not None:
            progress(i + 1, total)
    return x


def ode_sample(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    cond: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    r"""Deterministic sampling of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ with Heun's
    second-order method (Karras et al. 2022, Algorithm 1), from ``x`` at ``sigmas[0]`` to σ = 0
    (the last step is an Euler step). Draw ``x = sigmas[0] · ε`` for unconditional samples."""
    sig = [float(s) for s in sigmas] + [0.0]
    with torch.no_grad():
        for i in range(len(sig) - 1):
            s, s_next = sig[i], sig[i + 1]
            d = (x - denoiser(x, s, cond)) / s
            x_next = x + (s_next - s) * d
            if s_next > 0:
                d2 = (x_next - denoiser(x_next, s_next, cond)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d2)
            x = x_next
            if progress is not None:
                progress(i + 1, len(sig) - 1)
    return x
