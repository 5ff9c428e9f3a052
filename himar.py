"""Hi-MAR in one file: Hierarchical Masked Autoregressive image generation with low-resolution token pivots.

Zheng et al., "Hierarchical Masked Autoregressive Models with Low-Resolution Token Pivots", ICML 2025.

Hi-MAR builds on MAR (Li et al. 2024): a bidirectional transformer reveals the continuous tokens of an
image a few at a time in a random order, and a small diffusion model (the "head") samples each revealed
token conditioned on the transformer's output z for its position. Hi-MAR generates in two phases:

    phase 1  the PIVOTS: the tokens of a 2x lower-resolution image (global structure), MLP head;
    phase 2  the DENSE tokens of the full image, conditioned on the pivots, Diffusion Transformer head.

One transformer serves both phases; a "scale vector" tells it which phase it is in.

Read top to bottom:
    1. Config           the model (one dataclass) and the sampling settings, whole and per phase
    2. Tokenizer        pixels <-> dense tokens and pivot tokens
    3. Masks            training mask ratios, pivot dropout, the sampling schedule, tokens fixed by edits or pivots
    4. Diffusion        cosine schedule, q_sample, training loss, DDPM / DDIM on evenly or quadratically spaced steps
    5. Building blocks  attention, the scale-aware block (eq. 2), the DiT block (eq. 3), the residual streams' dtype
    6. Heads            the per-token MLP head and the Diffusion Transformer head, each with its loss and sampler
    7. The model        HiMAR: one training step (both phases), and the two-phase sampling loop (which also edits)
    8. Checkpoints      what a checkpoint holds: the config beside the weights
    9. Checks, presets  each setting's range, and the named configs (tiny, cifar10, imagenet64)

Around this file: data.py reads the data sets, train.py trains (its loop near the top), sample.py generates from the
command line, checkpoints.py writes and reads checkpoint files safely, pictures.py draws (for the notebooks too).

Shapes: B batch, Np pivot tokens, Nd dense tokens (Nd = 4 Np), D values per token (C*p*p),
W transformer width, L sequence length.
"""

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. Config: the sizes, the training choices and the paper's ablation switches (Table 5) in one dataclass,
#    and the sampling settings (the paper's K1, K2, CFG per phase, the heads' samplers) in another
# ----------------------------------------------------------------------------------------------------

PIVOT, DENSE = 0, 1  # the two phases (the paper's two scales); the index feeds the scale vector
SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")  # where a sampler puts its denoising steps (Diffusion.timesteps)


@dataclass
class Sampling:
    """How to generate: the steps of each phase, classifier-free guidance per phase (the reference uses the
    pivot scale >= the dense scale), and each head's reverse diffusion. Diffusion steps are an int, or a
    (first, last) pair annealed over the phase's generation steps (see diffusion_schedule)."""
    pivot_steps: int = 8  # K1: generation steps of phase 1 (the reference: 32; 8 scored better here, REPORT.md)
    dense_steps: int = 1  # K2: generation steps of phase 2
    pivot_cfg: float = 15.0  # guidance scale of phase 1, reached at its end (rising from 1); 15 beat 20 (REPORT.md)
    dense_cfg: float = 3.0  # guidance scale of phase 2
    temperature: float = 1.0  # scales the noise of the DDPM sampler (DDIM has none)
    pivot_diffusion_steps: tuple = (100, 100)  # MLP head: denoising steps at the (first, last) generation step
    dense_diffusion_steps: tuple = (25, 25)  # DiT head: likewise
    pivot_sampler: str = "ddim"  # "ddpm" (ancestral) or "ddim" (deterministic, eta 0); see REPORT.md for the choice
    dense_sampler: str = "ddim"
    # where each head's denoising steps fall in t: "uniform" (evenly) or "quadratic" (denser at low noise). 100
    # quadratic MLP-head steps scored as 200 even ones in 84% of the time; the DiT head's stay even (REPORT.md)
    pivot_spacing: str = "quadratic"
    dense_spacing: str = "uniform"

    def __post_init__(self):
        self.pivot_diffusion_steps = annealed_range(self.pivot_diffusion_steps)
        self.dense_diffusion_steps = annealed_range(self.dense_diffusion_steps)
        check_sampling(self)  # (section 9)

    def phase(self, phase):
        """The settings of one phase (PIVOT or DENSE), as the generation loop reads them."""
        if phase == PIVOT:
            return PhaseSampling(self.pivot_steps, self.pivot_cfg, self.pivot_diffusion_steps, self.pivot_sampler,
                                 self.pivot_spacing, self.temperature)
        return PhaseSampling(self.dense_steps, self.dense_cfg, self.dense_diffusion_steps, self.dense_sampler,
                             self.dense_spacing, self.temperature)


@dataclass(frozen=True)
class PhaseSampling:
    """One phase's sampling settings: what HiMAR.unmask needs to generate the phase."""
    steps: int  # K1 or K2: generation steps
    cfg_scale: float  # classifier-free guidance, reached at the phase's last step
    diffusion_steps: tuple  # the head's denoising steps at the phase's (first, last) generation step
    sampler: str  # "ddpm" or "ddim"
    spacing: str  # "uniform" or "quadratic"
    temperature: float  # scales the noise of the DDPM sampler


def annealed_range(steps):
    """Diffusion steps as a (first, last) pair: an int n means (n, n)."""
    first, last = (steps, steps) if isinstance(steps, int) else steps
    return int(first), int(last)


@dataclass
class Config:
    """The model: token layout, the shared transformer and the two heads (paper Table 1, scaled down), the training
    choices (masks, pivot dropout, loss weights), the ablation switches of Table 5, and its default Sampling. The
    defaults are the cifar10 preset; the named presets (tiny, cifar10, imagenet64) close the file (section 9)."""
    # image and tokens
    image_size: int = 32
    channels: int = 3
    patch_size: int = 2  # a dense token is a p x p pixel patch; a pivot token a p x p patch of the 2x downsample
    num_classes: int = 10
    # the shared transformer
    width: int = 320
    depth: int = 8
    num_heads: int = 5  # attention heads
    mlp_ratio: float = 4.0
    buffer_tokens: int = 4  # prefix tokens that carry the class embedding (the reference: 64)
    dropout: float = 0.0  # attention and projection dropout in the transformer
    class_dropout: float = 0.1  # probability of the null class in training (for classifier-free guidance)
    # phase-1 head: per-token MLP (MAR)
    mlp_head_width: int = 384
    mlp_head_depth: int = 4
    mlp_head_repeats: int = 4  # noise levels drawn per token and step
    # phase-2 head: Diffusion Transformer
    dit_head_width: int = 384
    dit_head_depth: int = 6
    dit_head_num_heads: int = 6
    dit_head_repeats: int = 1  # noise levels drawn per image and step
    # training
    mask_ratio_min: float = 0.7  # truncated normal mask ratio (phase 1, and MAR), mean 1
    mask_ratio_std: float = 0.25
    pivot_dropout_start: float = 1.0  # probability that phase 2 sees no pivots, lowered linearly ...
    pivot_dropout_end: float = 0.1  # (the reference: 0.75 or 0.5 over 800 epochs; a short run needs its pivots)
    pivot_dropout_warmup: float = 0.125  # ... over this fraction of the run (the reference: 100 of 800 epochs)
    dense_full_mask: float = 0.0  # probability that a step trains phase 2 with every dense token hidden (REPORT.md);
    # at 1 the transformer never sees a dense token, and is shown none while generating (HiMAR.shown_mask)
    pivot_loss_weight: float = 2.0
    dense_loss_weight: float = 0.75
    diffusion_steps: int = 1000
    # the paper's ablation switches (Table 5)
    pivots: str = "conditional"  # "none" (MAR), "visual" (low-res tokens) or "conditional" (Hi-MAR)
    dense_head: str = "dit"  # "mlp" or "dit"
    scale_vector: bool = True
    # how this model samples unless told otherwise (for CIFAR-10 from the sweeps in REPORT.md)
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self):
        if isinstance(self.sampling, dict):  # as read back from a checkpoint; those written before the spacing
            # fields existed sampled with evenly spaced steps, which the defaults no longer are
            self.sampling = Sampling(**{"pivot_spacing": "uniform", "dense_spacing": "uniform", **self.sampling})
        check_config(self)  # (section 9)

    def sampling_with(self, sampling=None, **changes):
        """The sampling settings (default: this model's) with `changes` to fields by name, checked against this model:
        what HiMAR.sample and sample.py's flags generate with."""
        settings = replace(sampling or self.sampling, **changes)
        check_sampling_for(settings, self)
        return settings

    @property
    def num_dense(self):  # Nd
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_pivots(self):  # Np = Nd / 4
        return self.num_dense // 4

    @property
    def token_dim(self):  # D
        return self.channels * self.patch_size**2


# ----------------------------------------------------------------------------------------------------
# 2. Tokenizer: pixels in [-1, 1] <-> tokens
# The paper tokenizes the 256px image and its 128px downsample with one frozen VAE. Here a token is a
# p x p patch of pixels, which keeps the structure: pivots are the tokens of the 2x downsampled image.
# ----------------------------------------------------------------------------------------------------


def patchify(images, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], patches in raster order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, p, channels=3):
    """[B, N, C*p*p] -> [B, C, sqrt(N)*p, sqrt(N)*p]; the exact inverse of patchify."""
    B, N, _ = tokens.shape
    side = math.isqrt(N)
    x = tokens.reshape(B, side, side, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, side * p, side * p)


def downsample(images):
    """The low-resolution image that the pivots tokenize: a 2x2 box filter (anti-aliased 2x downsample)."""
    return F.avg_pool2d(images, 2)


def tokenize(images, p):
    """Images [B, C, H, W] -> (pivot tokens [B, Np, D], dense tokens [B, Nd, D])."""
    return patchify(downsample(images), p), patchify(images, p)


# ----------------------------------------------------------------------------------------------------
# 3. Masks: which tokens are hidden in training, how often phase 2 trains without pivots, when each token is
#    revealed in sampling, which tokens an edit gives (known_tokens) or given pivots fix (given_pivot_tokens), and
#    how many denoising steps the head takes at each generation step
# ----------------------------------------------------------------------------------------------------


def random_orders(batch, n, device, generator=None):
    """One random permutation of the n positions per image: [B, n]. Tokens are masked / revealed in this order."""
    return torch.rand(batch, n, device=device, generator=generator).argsort(dim=1)


def mask_by_order(orders, num_masked):
    """Bool [B, n], True at the first `num_masked` positions of each order (those stay hidden); num_masked is one
    count for all images, or one per image [B, 1]. The shape does not depend on num_masked, so a training step
    never waits for the GPU to learn how many tokens it masks."""
    rank = orders.argsort(dim=1)  # rank[b, i]: where position i comes in image b's order
    return rank < num_masked


def truncated_normal_ratio(cfg, device=None):
    """MAR's mask ratio: normal with mean 1 and std 0.25, cut to [mask_ratio_min, 1] (phase 1, and MAR), as a 0-d
    tensor on `device`. The ratio is 1 - std * |n|, n ~ N(0, 1) with |n| <= b; |n| is drawn by inverting its CDF
    over [0, b], in one step on the device, so a compiled training step neither loops nor waits for the GPU."""
    b = (1 - cfg.mask_ratio_min) / cfg.mask_ratio_std if cfg.mask_ratio_std > 0 else math.inf  # the largest |n|
    top = torch.special.ndtr(torch.full((), b, device=device))  # P(n <= b)
    abs_n = torch.special.ndtri(0.5 + torch.rand((), device=device) * (top - 0.5))  # |n|, in [0, b]
    return 1 - cfg.mask_ratio_std * abs_n


def cosine_ratio(device=None):
    """MaskGIT's cosine mask ratio cos(pi/2 * u), u ~ U(0, 1) (phase 2 of Hi-MAR), as a 0-d tensor on `device`."""
    return torch.cos(math.pi / 2 * torch.rand((), device=device))


def dense_ratio(cfg, device=None):
    """Phase 2's training mask ratio, a 0-d tensor: the cosine ratio (the reference's), or 1 with probability
    cfg.dense_full_mask: every dense token hidden, which is where sampling starts phase 2, and with K2 = 1 the only
    map it shows phase 2 (of CIFAR-10's 256 dense tokens, the cosine ratio hides all in 5.6% of steps: r > 255/256)."""
    if cfg.dense_full_mask == 0:  # the reference's (one random draw, as before the option existed)
        return cosine_ratio(device)
    full = torch.rand((), device=device) < cfg.dense_full_mask
    return torch.where(full, 1.0, cosine_ratio(device))


def num_to_mask(ratio, n):
    """ceil(ratio * n), at least one: every training step has something to predict (a 0-d tensor, for a ratio
    drawn above)."""
    return torch.ceil(torch.as_tensor(ratio) * n).clamp(min=1).long()


def pivot_dropout_at(cfg, progress):
    """Probability that phase 2 trains without pivots, at `progress` (0 to 1) through the training run: it starts
    at pivot_dropout_start (early z_s is noise) and falls linearly to pivot_dropout_end over the first
    pivot_dropout_warmup of the run (the reference: 1 -> 0.75 or 0.5 over 100 of 800 epochs)."""
    ramp = min(1.0, progress / cfg.pivot_dropout_warmup) if cfg.pivot_dropout_warmup > 0 else 1.0
    return cfg.pivot_dropout_start + (cfg.pivot_dropout_end - cfg.pivot_dropout_start) * ramp


def reveal_schedule(n, steps):
    """How many of n tokens are still masked after each of `steps` sampling steps (MaskGIT's cosine
    schedule): floor(n * cos(pi/2 * (k+1)/steps)), at least one revealed per step, none left at the end."""
    if not 1 <= steps <= n:
        raise ValueError(f"the number of steps must be between 1 and the number of tokens ({n}), got {steps}")
    masked, schedule = n, []
    for k in range(steps):
        target = math.floor(n * math.cos(math.pi / 2 * (k + 1) / steps))
        masked = max(min(target, masked - 1), steps - k - 1)  # reveal >= 1 now, leave >= 1 for each later step
        schedule.append(masked)
    return schedule


def reveal_counts(unknown, steps):
    """reveal_schedule for images with different numbers of tokens to generate, unknown [B] (in editing, the
    tokens not given): how many of each image's are still masked after each step, [K, B]. K = steps, or fewer
    when no image has that many tokens (none: K = 0). An image with fewer tokens than K reveals one per step,
    then waits for the others."""
    steps = min(steps, int(unknown.max()))
    schedules = [reveal_schedule(u, min(steps, u)) if u else [] for u in unknown.tolist()]
    return torch.tensor([s + [0] * (steps - len(s)) for s in schedules], dtype=torch.long).T.to(unknown.device)


def known_last(orders, keep):
    """The orders [B, n] with each image's given positions (keep [B, n] True) moved to the end, the others
    still in their random order. Tokens are revealed from the end of the order, so the given ones count as
    revealed first, and mask_by_order(orders, k) with k <= the tokens to generate hides none of them."""
    return orders.gather(1, keep.gather(1, orders).int().argsort(dim=1, stable=True))


def whole_patches(mask, size):
    """Bool [B, H, W] -> [B, (H/size)*(W/size)] in patchify's raster order: True where the whole size x size
    patch is True."""
    B, H, W = mask.shape
    return mask.reshape(B, H // size, size, W // size, size).all(dim=4).all(dim=2).flatten(1)


def known_tokens(cfg, known_images, known_mask, batch, device):
    """The tokens that editing gives (inpainting, outpainting, class swaps): known_images [B, C, H, W] in [-1, 1]
    are kept where known_mask [B, H, W] is True, and the mask must keep or drop whole dense tokens. A dense token
    is known where its p x p patch is kept, a pivot where the whole 2x2 group of dense tokens under it is (its
    low-resolution patch is then the downsample of kept pixels only). The other pixels are never looked at.
    Returns (pivots [B, Np, D], pivot_keep [B, Np], dense [B, Nd, D], dense_keep [B, Nd]), keep True = given;
    with neither argument nothing is given (plain generation)."""
    S, C, p = cfg.image_size, cfg.channels, cfg.patch_size
    if known_images is None and known_mask is None:
        known_images = torch.zeros(batch, C, S, S, device=device)
        known_mask = torch.zeros(batch, S, S, dtype=torch.bool, device=device)
    if known_images is None or known_mask is None:
        raise ValueError("known_images and known_mask go together: give both (or neither, to generate from scratch)")
    known_images, known_mask = torch.as_tensor(known_images, device=device), torch.as_tensor(known_mask, device=device)
    if tuple(known_images.shape) != (batch, C, S, S):
        raise ValueError(f"known_images must be [B, C, H, W] = [{batch}, {C}, {S}, {S}] (one {S}x{S} image per label "
                         f"for this model), got {list(known_images.shape)}")
    if tuple(known_mask.shape) != (batch, S, S) or known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor [B, H, W] = [{batch}, {S}, {S}] (True where pixels are "
                         f"kept), got {known_mask.dtype} {list(known_mask.shape)}")
    partly = ~whole_patches(known_mask, p) & ~whole_patches(~known_mask, p)  # [B, Nd]: neither all kept nor all not
    if partly.any():
        raise ValueError(f"known_mask must be aligned to whole dense tokens: every {p}x{p} pixel patch (patch_size "
                         f"{p}, from the top-left corner) all True or all False; {int(partly.sum())} patches are "
                         "partly kept")
    known_images = torch.where(known_mask[:, None], known_images.float(), 0)  # [B, C, H, W]: the rest unseen
    if not (known_images.isfinite().all() and known_images.abs().max() <= 1):
        raise ValueError("known_images must be pixels in [-1, 1] where kept (8-bit pixels x: x / 127.5 - 1)")
    pivots, dense = tokenize(known_images, p)
    return pivots, whole_patches(known_mask, 2 * p), dense, whole_patches(known_mask, p)


def given_pivot_tokens(cfg, pivots, known_images, batch, device):
    """The tokens of given pivot images [B, C, H/2, W/2] in [-1, 1] (HiMAR.sample(pivots=...)), with a clear error
    for what cannot be used."""
    size = cfg.image_size // 2
    if cfg.pivots == "none":
        raise ValueError("pivots: this model has no pivot phase (pivots='none', MAR)")
    if known_images is not None:
        raise ValueError("give pivots or known_images (editing), not both")
    if not torch.is_tensor(pivots) or tuple(pivots.shape) != (batch, cfg.channels, size, size):
        raise ValueError(f"pivots must be a float tensor [B, C, H/2, W/2] = {[batch, cfg.channels, size, size]}")
    if not torch.isfinite(pivots).all() or pivots.abs().max() > 1:
        raise ValueError("pivots must hold pixel values in [-1, 1]")
    return patchify(pivots.float().to(device), cfg.patch_size)  # [B, Np, D]


def diffusion_schedule(diffusion_steps, steps):
    """The head's denoising steps at each of `steps` generation steps, from diffusion_steps = (first, last),
    linear in between. Annealing them (DiSA, 2025): the more tokens are known, the less the head has to invent,
    and the fewer denoising steps it needs."""
    first, last = annealed_range(diffusion_steps)
    if steps == 1:
        return [first]
    return [round(first + (last - first) * k / (steps - 1)) for k in range(steps)]


# ----------------------------------------------------------------------------------------------------
# 4. Diffusion: the process both heads use (a cosine schedule, noise prediction, DDPM or DDIM sampling on
#    evenly or quadratically spaced steps)
# ----------------------------------------------------------------------------------------------------


class Diffusion(nn.Module):
    """Gaussian diffusion over tokens. x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 0..T-1, with the
    cosine schedule of Nichol & Dhariwal (2021). A head learns eps(x_t | t, z) by MSE; sampling runs the reverse
    process on `steps` evenly spaced timesteps from T-1 down to 0 (respacing, both ends included).
    It has no weights; it is a module so that its table of abar_t moves to the model's device with the model."""

    def __init__(self, num_steps):
        super().__init__()
        self.num_steps = num_steps
        s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alpha_bar = torch.cumprod(1 - betas, 0)  # [T], float64
        # a buffer, not saved in checkpoints: training looks up a batch of timesteps on the model's device
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self.alpha_bar_values = alpha_bar.tolist()  # the same as floats: the sampler's per-step scalars, no GPU sync

    def _abar(self, t, like):
        """abar_t for a batch of timesteps t [M], shaped to broadcast against `like` [M, ...]."""
        abar = self.alpha_bar[t].to(like.dtype)
        return abar.view(-1, *[1] * (like.dim() - 1))

    def q_sample(self, x0, t, noise):
        """x0 [M, ...] noised to the levels t [M]: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, denoiser, x0, z):
        """Noise-prediction loss of `denoiser` on clean tokens x0 [M, L, D] conditioned on z [M, L, Wz]; one noise
        level per row of x0. Returns the loss of every token, [M, L]."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return (denoiser(self.q_sample(x0, t, noise), t, z).float() - noise.float()).pow(2).mean(dim=-1)

    def timesteps(self, steps, spacing="uniform"):
        """`steps` timesteps from T-1 down to 0; the last step denoises from the smallest noise level. "uniform":
        evenly spaced. "quadratic": t_k = (T-1) (k / (steps-1))^2, so most steps fall at low noise, where a token's
        fine detail is decided (DDIM's spacing for CIFAR-10, Song et al. 2021); where two would round to the same t,
        one is kept, so more than about sqrt(2T) steps give fewer distinct ones."""
        if steps == 1:
            return [self.num_steps - 1]
        fractions = [k / (steps - 1) for k in reversed(range(steps))]
        if spacing == "quadratic":
            fractions = [f * f for f in fractions]
        return sorted({round(f * (self.num_steps - 1)) for f in fractions}, reverse=True)

    @torch.no_grad()
    def sample(self, eps_fn, noise, steps, sampler="ddpm", temperature=1.0, generator=None, known=None, keep=None,
               spacing="uniform"):
        """Reverse diffusion from `noise` [M, L, D] in `steps` respaced steps (placed by `spacing`, see timesteps);
        eps_fn(x_t, t) predicts the noise (classifier-free guidance is applied inside it). sampler "ddpm":
        ancestral, its noise scaled by `temperature`; "ddim": deterministic (eta = 0).
        Inpainting by replacement: where keep [M, L] is True, the tokens `known` [M, L, D] are given. Before every
        denoising step they are noised to that step's level (with the starting noise) and written over x, so the
        denoiser sees them at the right noise level and the rest is sampled to agree with them; they come out
        exactly as given."""
        x = noise
        timesteps = self.timesteps(steps, spacing)
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            if known is not None:
                x = torch.where(keep[..., None], self.q_sample(known, t_batch, noise), x)
            abar = self.alpha_bar_values[t]
            abar_prev = self.alpha_bar_values[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            eps = eps_fn(x, t_batch)
            x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)  # tokens are pixels in [-1, 1]
            if sampler == "ddim":  # x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar') eps, eps re-derived from the clamped x0
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
                x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
                continue
            # DDPM: the posterior q(x_{t-1} | x_t, x0) of the respaced step, its mean and variance
            beta = 1 - abar / abar_prev
            x = (math.sqrt(abar_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - abar_prev) * x) / (1 - abar)
            if i + 1 < len(timesteps):
                std = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
                x = x + temperature * std * torch.randn(x.shape, device=x.device, generator=generator)
        return x if known is None else torch.where(keep[..., None], known, x)


# ----------------------------------------------------------------------------------------------------
# 5. Building blocks: attention, the shared transformer's scale-aware block (eq. 2), the DiT head's block (eq. 3),
#    and the dtype of the residual streams they carry (bf16 on a GPU)
# ----------------------------------------------------------------------------------------------------


def sinusoidal(values, dim):
    """Sinusoidal features of scalars (diffusion timesteps or the phase index): [M] -> [M, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def residual_dtype(x):
    """The dtype of the residual streams (the transformer's and the heads'): autocast's bf16 where it is on (on a
    GPU, in train.py and HiMAR.sample), else x's own. Kept in bf16, the memory-bound elementwise work between the
    matrix products (norms, modulations, residual sums) moves half the bytes: 1.06x the training images/s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Attention(nn.Module):
    """Multi-head self-attention over all tokens of a sequence (bidirectional), via PyTorch's fused kernel."""

    def __init__(self, width, num_heads, dropout=0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # [B, L, W]
        B, L, W = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, W // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, L, W/h]
        p = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, L, W)
        return F.dropout(self.proj(x), p, self.training)


class FeedForward(nn.Module):
    """Two-layer MLP applied to every token on its own."""

    def __init__(self, width, ratio=4.0, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(width, int(width * ratio))
        self.fc2 = nn.Linear(int(width * ratio), width)

    def forward(self, x):
        x = F.gelu(self.fc1(x), approximate="tanh")
        return F.dropout(self.fc2(x), self.dropout, self.training)


class ScaleAwareBlock(nn.Module):
    """A block of the shared transformer, modulated by the phase's scale vector v (paper eq. 2):

        (alpha1, beta1, gamma1, alpha2, beta2, gamma2) = a * v + b        (a, b learned per block)
        y   = x + gamma1 * Attn(alpha1 * LN(x) + beta1)
        out = y + gamma2 * FFN(alpha2 * LN(y) + beta2)

    a = 0 and b = (1, 0, 1, 1, 0, 1) at the start: the block begins as a plain pre-LN block."""

    def __init__(self, width, num_heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.ffn = FeedForward(width, mlp_ratio, dropout)
        one, zero = torch.ones(width), torch.zeros(width)
        self.a = nn.Parameter(torch.zeros(6 * width))
        self.b = nn.Parameter(torch.cat([one, zero, one, one, zero, one]))

    def forward(self, x, v):  # x [B, L, W], v [6W]
        alpha1, beta1, gamma1, alpha2, beta2, gamma2 = (self.a * v + self.b).to(x.dtype).chunk(6)
        x = x + gamma1 * self.attn(alpha1 * self.norm1(x) + beta1)
        return x + gamma2 * self.ffn(alpha2 * self.norm2(x) + beta2)


class AdaLN(nn.Module):
    """A residual sublayer with per-token adaptive LayerNorm, DiT's adaLN-Zero (the sublayers of eq. 3):

        x + gate(c_i) * layer(LN(x) * (1 + scale(c_i)) + shift(c_i))

    Each token i is modulated by its own condition c_i. The modulation starts at zero (gate 0), so every
    sublayer starts as the identity."""

    def __init__(self, width, layer):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.layer = layer
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, c):  # x, c: [B, L, width]
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.layer(self.norm(x) * (1 + scale) + shift)


class DiTBlock(nn.Module):
    """A block of the Diffusion Transformer head (paper eq. 3): self-attention across all dense tokens, then an
    MLP, each an adaLN-Zero sublayer modulated per token by c_i = t_emb + proj(z_l_i)."""

    def __init__(self, width, num_heads, mlp_ratio):
        super().__init__()
        self.attn = AdaLN(width, Attention(width, num_heads))
        self.ffn = AdaLN(width, FeedForward(width, mlp_ratio))

    def forward(self, x, c):  # x, c: [B, Nd, width]
        return self.ffn(self.attn(x, c), c)


# ----------------------------------------------------------------------------------------------------
# 6. Heads: small diffusion models that sample tokens given the transformer's output z; each owns its
#    training loss and its sampler
# ----------------------------------------------------------------------------------------------------


class Denoising(NamedTuple):
    """How a head runs its reverse diffusion at one generation step (Diffusion.sample)."""
    steps: int  # denoising steps (respaced from the T of training)
    sampler: str  # "ddpm" or "ddim"
    spacing: str  # "uniform" or "quadratic" (Diffusion.timesteps)
    temperature: float  # scales the noise of the DDPM sampler


def masked_mean(loss, mask):
    """The mean of loss [...] over the True positions of mask [...]."""
    weight = mask.float()
    return (loss * weight).sum() / weight.sum()


class DiffusionHead(nn.Module):
    """What both heads share (MAR's diffusion head): a denoiser eps(x_t | t, z) over a map of tokens x [B, L, D],
    each token conditioned on c_i = time_embedding(t) + proj(z_i), a stack of blocks, and a final adaLN layer.
    The subclasses choose the blocks, and own the training loss and the sampler."""

    def __init__(self, token_dim, z_dim, width, blocks, diffusion):
        super().__init__()
        self.diffusion = diffusion  # the process (no weights; one Diffusion shared by the heads)
        self.input = nn.Linear(token_dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.condition = nn.Linear(z_dim, width)
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, token_dim)

    def embed(self, x):  # [B, L, D] -> [B, L, width]
        return self.input(x)

    def forward(self, x, t, z):  # x [B, L, D], t [B], z [B, L, Wz]
        dtype = residual_dtype(x)  # bf16 under autocast (a GPU)
        c = (self.time(sinusoidal(t, self.input.out_features))[:, None] + self.condition(z)).to(dtype)  # [B, L, width]
        h = self.embed(x).to(dtype)  # [B, L, width]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=-1)
        return self.output(self.out_norm(h) * (1 + scale) + shift)  # [B, L, D]

    def denoise(self, z, z_null, cfg_scale, denoising, generator, known=None, keep=None, length=None):
        """Sample a map of tokens [B, L, D] by reverse diffusion (Diffusion.sample), conditioned per token on
        z [B, L, W] (or [B, 1, W], one condition for all `length` tokens). With z_null (the same positions under the
        null class), classifier-free guidance on the noise: eps = eps_null + cfg_scale * (eps_cond - eps_null);
        cfg_scale is a number, or one per map [B, 1, 1]."""

        def eps_fn(x, t):
            if z_null is None:
                return self(x, t, z)
            eps_cond, eps_null = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z_null])).chunk(2)
            return eps_null + cfg_scale * (eps_cond - eps_null)

        shape = (z.shape[0], length or z.shape[1], self.output.out_features)
        noise = torch.randn(shape, device=z.device, generator=generator)
        return self.diffusion.sample(eps_fn, noise, denoising.steps, denoising.sampler, denoising.temperature,
                                     generator, known, keep, denoising.spacing)


class MLPHead(DiffusionHead):
    """MAR's per-token diffusion head (Hi-MAR's phase 1, and MAR's only head): residual adaLN MLP blocks, so each
    token is denoised on its own, given its z_i."""

    def __init__(self, token_dim, z_dim, width, depth, repeats, diffusion):
        blocks = [AdaLN(width, FeedForward(width, 1.0)) for _ in range(depth)]
        super().__init__(token_dim, z_dim, width, blocks, diffusion)
        self.repeats = repeats  # noise levels per token and training step

    def loss(self, tokens, z, mask):
        """Training loss on tokens [B, N, D] given z [B, N, W]: each token on its own at `repeats` noise levels,
        averaged over the masked tokens (the head runs on all of them: fixed shapes, no wait for the GPU)."""
        r = self.repeats
        x0 = tokens.flatten(0, 1).repeat(r, 1)[:, None]  # [r*B*N, 1, D]: each token is its own "map"
        loss = self.diffusion.loss(self, x0, z.flatten(0, 1).repeat(r, 1)[:, None])[:, 0]  # [r*B*N]
        return masked_mean(loss, mask.flatten().repeat(r))

    def sample(self, tokens, mask, reveal, z, z_null, cfg_scale, denoising, generator):
        """One generation step: the tokens revealed now (reveal [B, n], not necessarily as many in every image) are
        sampled, each from its own z_i and at its image's guidance scale (a number, or one per image [B, 1, 1]); the
        others [B, n, D] are returned unchanged."""
        B, n = reveal.shape
        one_each = lambda x: None if x is None else x[reveal][:, None]  # [K, 1, ...]: each revealed token is a map
        scale = one_each(torch.as_tensor(cfg_scale, device=z.device).expand(B, n, 1))  # [K, 1, 1]
        sampled = self.denoise(one_each(z), one_each(z_null), scale, denoising, generator)
        tokens = tokens.clone()
        tokens[reveal] = sampled.flatten(0, 1).to(tokens.dtype)
        return tokens


class DiTHead(DiffusionHead):
    """The Diffusion Transformer head (Hi-MAR's phase 2, eq. 3): DiT blocks over the whole dense map, so its tokens
    are denoised jointly, each seeing the others; learned positions tell attention where each token is."""

    def __init__(self, token_dim, z_dim, width, depth, num_heads, mlp_ratio, num_tokens, repeats, diffusion):
        blocks = [DiTBlock(width, num_heads, mlp_ratio) for _ in range(depth)]
        super().__init__(token_dim, z_dim, width, blocks, diffusion)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.repeats = repeats  # noise levels per image and training step

    def embed(self, x):
        return self.input(x) + self.pos

    def loss(self, tokens, z, mask):
        """Training loss: the whole map noised to one level per image, `repeats` times. Only the MASKED tokens count
        (the visible ones are given to the transformer: copying them teaches nothing), and, as the reference, their
        errors are averaged over the WHOLE map: an image counts by its masked fraction r, so a step that hides most
        tokens (as the first sampling step does) weighs more than one that hides a few."""
        r = self.repeats
        loss = self.diffusion.loss(self, tokens.repeat(r, 1, 1), z.repeat(r, 1, 1))  # [r*B, N]
        return (loss * mask.repeat(r, 1)).mean()

    def sample(self, tokens, mask, reveal, z, z_null, cfg_scale, denoising, generator):
        """One generation step: denoise the whole map, keeping the tokens revealed so far (~mask) by replacement at
        every denoising step; every still-masked position takes the new sample (those in `reveal` for good).
        cfg_scale: a number, or one per image [B, 1, 1]."""
        sampled = self.denoise(z, z_null, cfg_scale, denoising, generator, known=tokens, keep=~mask)
        return torch.where(mask[..., None], sampled.to(tokens.dtype), tokens)


# ----------------------------------------------------------------------------------------------------
# 7. The model (Fig. 2): the shared transformer, one training step over both phases, two-phase sampling
# ----------------------------------------------------------------------------------------------------


def twice(x):
    """x stacked on itself along the batch, for the two branches of classifier-free guidance (None stays None)."""
    return None if x is None else torch.cat([x, x])


def init_weights(model):
    """DiT's initialisation, for Hi-MAR (and any model built from these blocks): xavier-uniform linear layers
    with zero bias; adaLN-Zero, where every per-token modulation and each head's output layer start at zero
    (the heads start by predicting zero noise); learned embeddings N(0, 0.02)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    zero = []
    for m in model.modules():
        if isinstance(m, AdaLN):
            zero.append(m.modulation[1])
        if isinstance(m, DiffusionHead):
            zero += [m.out_modulation[1], m.output]
    for layer in zero:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    for name, p in model.named_parameters():  # positions, the mask token, the placeholder, the class embedding
        last = name.split(".")[-1]
        if last.startswith(("pos", "diffusion_pos", "mask_token", "pivot_placeholder")) or name == "class_embed.weight":
            nn.init.normal_(p, std=0.02)


class HiMAR(nn.Module):
    """Hi-MAR (paper Fig. 2): one scale-aware transformer shared by the two phases, an MLP head for the pivots
    and a Diffusion Transformer head for the dense tokens. The sequence the transformer sees:

        phase 1:  [class buffer | pivot tokens (some masked)]
        phase 2:  [class buffer | pivot conditional tokens | dense tokens (some masked)]

    With cfg.pivots = "none" it is MAR: one phase, [class buffer | dense tokens], MLP head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        diffusion = Diffusion(cfg.diffusion_steps)
        # inputs
        self.class_embed = nn.Embedding(cfg.num_classes + 1, W)  # the last class is the null class (CFG)
        self.token_embed = nn.Linear(cfg.token_dim, W)
        self.mask_token = nn.Parameter(torch.zeros(W))
        self.pos_buffer = nn.Parameter(torch.zeros(1, cfg.buffer_tokens, W))
        self.pos_dense = nn.Parameter(torch.zeros(1, cfg.num_dense, W))
        # the shared transformer, told its phase by the scale vector v = MLP(sinusoidal(phase))
        if cfg.scale_vector:  # (without it, ablation: v = 0, the blocks cannot tell the phases apart)
            self.scale_mlp = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, 6 * W))
        self.blocks = nn.ModuleList(
            ScaleAwareBlock(W, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W)
        self.diffusion_pos_dense = nn.Parameter(torch.zeros(1, cfg.num_dense, W))  # added to z before the head (MAR)
        # heads
        if cfg.dense_head == "dit":
            self.dense_head = DiTHead(cfg.token_dim, W, cfg.dit_head_width, cfg.dit_head_depth, cfg.dit_head_num_heads,
                                      cfg.mlp_ratio, cfg.num_dense, cfg.dit_head_repeats, diffusion)
        else:
            self.dense_head = MLPHead(cfg.token_dim, W, cfg.mlp_head_width, cfg.mlp_head_depth, cfg.mlp_head_repeats,
                                      diffusion)
        if cfg.pivots != "none":
            self.pos_pivot = nn.Parameter(torch.zeros(1, cfg.num_pivots, W))
            self.diffusion_pos_pivot = nn.Parameter(torch.zeros(1, cfg.num_pivots, W))
            self.pivot_head = MLPHead(cfg.token_dim, W, cfg.mlp_head_width, cfg.mlp_head_depth, cfg.mlp_head_repeats,
                                      diffusion)
            self.pivot_placeholder = nn.Parameter(torch.zeros(1, cfg.num_pivots, W))  # a pivot with no condition
        if cfg.pivots == "conditional":
            self.pivot_condition = nn.Linear(W, W)  # z_s -> conditional token
        init_weights(self)
        self.register_load_state_dict_pre_hook(vector_mask_token)  # (older checkpoints hold it as [1, 1, W])

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- the shared transformer --------------------------------------------------------------------

    def embed(self, tokens, mask):
        """Token values -> transformer inputs, the mask token where a token is hidden. [B, N, D] -> [B, N, W]"""
        return torch.where(mask[..., None], self.mask_token, self.token_embed(tokens))

    def transformer(self, phase, labels, tokens, mask, pivot_context=None):
        """Run the shared transformer for one phase and return z for that phase's tokens, with the learned
        diffusion position embedding added (as MAR and the reference: z is what the head, and phase 2, read).

        phase PIVOT: tokens/mask are the pivots'; returns z_s [B, Np, W].
        phase DENSE: tokens/mask are the dense tokens'; pivot_context [B, Np, W] are phase 2's pivot tokens
                     (None for MAR); returns z_l [B, Nd, W]."""
        cfg = self.cfg
        parts = [self.class_embed(labels)[:, None] + self.pos_buffer]  # [B, buffer, W]
        if phase == PIVOT:
            parts.append(self.embed(tokens, mask) + self.pos_pivot)
        else:
            if pivot_context is not None:
                parts.append(pivot_context + self.pos_pivot)
            parts.append(self.embed(tokens, mask) + self.pos_dense)
        x = torch.cat(parts, dim=1)  # [B, L, W]
        x = x.to(residual_dtype(x))  # bf16 under autocast (a GPU), as the heads' streams
        if cfg.scale_vector:
            v = self.scale_mlp(sinusoidal(torch.tensor([phase], device=x.device), cfg.width))[0]  # [6W]
        else:
            v = torch.zeros(6 * cfg.width, device=x.device)
        for block in self.blocks:
            x = block(x, v)
        z = self.norm(x)[:, -tokens.shape[1]:]  # this phase's tokens: [B, N, W]
        return z + (self.diffusion_pos_pivot if phase == PIVOT else self.diffusion_pos_dense)

    def pivot_context(self, pivots, z_pivot, predicted, dropped):
        """Phase 2's tokens at the pivot positions, [B, Np, W].
        conditional (Hi-MAR): proj(stop-grad z_s) where the pivot was predicted by phase 1, the learned
                              placeholder where it was visible (its z_s predicted nothing);
        visual (ablation):    the embedded pivot tokens themselves.
        dropped [B] (pivot dropout): the placeholder at every pivot of those images."""
        if self.cfg.pivots == "conditional":
            context = torch.where(predicted[..., None], self.pivot_condition(z_pivot.detach()), self.pivot_placeholder)
        else:
            context = self.token_embed(pivots)
        return torch.where(dropped[:, None, None], self.pivot_placeholder, context)

    # --- training -----------------------------------------------------------------------------------

    def drop_classes(self, labels):
        """Labels [B] with each replaced by the null class with probability class_dropout (for classifier-free
        guidance). Each phase draws its own, as the reference: phase 2 then learns its null-class branch mostly on
        z_s made with the true class, which is what that branch reads at sampling (both branches share phase 1)."""
        dropped = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        return torch.where(dropped, self.cfg.num_classes, labels)

    def forward(self, images, labels, pivot_dropout=0.0):
        """One training step's losses (both phases every step). images [B, C, H, W] in [-1, 1], labels [B].
        Returns (total loss, {"pivot": loss1, "dense": loss2}). pivot_dropout: see pivot_dropout_at(); a number,
        or a 0-d tensor (train.py's, so that one compiled graph serves every value)."""
        cfg = self.cfg
        B, device = images.shape[0], images.device
        pivots, dense = tokenize(images, cfg.patch_size)  # [B, Np, D], [B, Nd, D]

        if cfg.pivots == "none":  # MAR: one phase over the dense tokens
            orders = random_orders(B, cfg.num_dense, device)
            dense_mask = mask_by_order(orders, num_to_mask(truncated_normal_ratio(cfg, device), cfg.num_dense))
            z_dense = self.transformer(DENSE, self.drop_classes(labels), dense, dense_mask)
            loss = self.dense_head.loss(dense, z_dense, dense_mask)
            return loss, {"dense": loss.detach()}

        # Phase 1: pivots. Truncated-normal mask ratio; every dense position is masked, so they are left out.
        orders = random_orders(B, cfg.num_pivots, device)
        pivot_mask = mask_by_order(orders, num_to_mask(truncated_normal_ratio(cfg, device), cfg.num_pivots))  # [B, Np]
        z_pivot = self.transformer(PIVOT, self.drop_classes(labels), pivots, pivot_mask)  # z_s [B, Np, W]
        loss_pivot = self.pivot_head.loss(pivots, z_pivot, pivot_mask)

        # Phase 2: dense tokens, conditioned on the pivots (stop-grad phase-1 outputs). Mask ratio: dense_ratio (the
        # cosine ratio, or the whole map with probability dense_full_mask).
        dropped = torch.rand(B, device=device) < pivot_dropout
        context = self.pivot_context(pivots, z_pivot, pivot_mask, dropped)
        orders = random_orders(B, cfg.num_dense, device)
        dense_mask = mask_by_order(orders, num_to_mask(dense_ratio(cfg, device), cfg.num_dense))  # [B, Nd]
        z_dense = self.transformer(DENSE, self.drop_classes(labels), dense, dense_mask, context)  # z_l [B, Nd, W]
        loss_dense = self.dense_head.loss(dense, z_dense, dense_mask)

        # weights: 2.0 and 0.75, each times the phase's share of all tokens (as the reference code)
        n = cfg.num_pivots + cfg.num_dense
        loss = (cfg.pivot_loss_weight * cfg.num_pivots / n * loss_pivot
                + cfg.dense_loss_weight * cfg.num_dense / n * loss_dense)
        return loss, {"pivot": loss_pivot.detach(), "dense": loss_dense.detach()}

    # --- sampling -----------------------------------------------------------------------------------

    def shown_mask(self, phase, mask):
        """The mask [B, n] under which the transformer sees a phase's tokens while generating: the phase's own
        (True = not yet revealed), except in phase 2 of a model trained only on the fully hidden dense map
        (cfg.dense_full_mask = 1). That transformer never saw a dense token, so it is shown none here either: the
        dense tokens given (editing) or revealed enter phase 2 only through its head, which keeps them by replacement.
        Shown the given half of an image instead, its edits lost their class far more often (REPORT.md)."""
        if phase == DENSE and self.cfg.dense_full_mask == 1:
            return torch.ones_like(mask)
        return mask

    def unmask(self, phase, labels, known, keep, settings, generator, pivot_context=None, forced=None, frames=None):
        """One phase of generation: reveal the phase's tokens in settings.steps steps (a PhaseSampling), in a random
        order, following the cosine schedule. The tokens `known` [B, N, D] where keep [B, N] is True are given (editing;
        see known_tokens): they start revealed, and the schedule covers only the others (in fewer steps if fewer than
        `steps` are left, none if all are given). forced [B, N, D]: the values that the revealed tokens take instead
        of the head's samples (phase 1 with given pivots: the transformer still runs, so each pivot gets its z_s).
        Returns the tokens [B, N, D] and, per position, the transformer output z at the step it was generated
        [B, N, W] (phase 1's z_s, which phase 2 is conditioned on; zero where given)."""
        cfg, B, device = self.cfg, labels.shape[0], labels.device
        n = cfg.num_pivots if phase == PIVOT else cfg.num_dense
        head = self.pivot_head if phase == PIVOT else self.dense_head
        tokens = torch.where(keep[..., None], known, 0)  # [B, n, D]
        mask = ~keep  # True = not yet revealed
        z_revealed = torch.zeros(B, n, cfg.width, device=device)
        orders = known_last(random_orders(B, n, device, generator), keep)
        schedule = reveal_counts(mask.sum(dim=1), settings.steps)  # [K, B]: per image, the masked count after a step
        denoising = [Denoising(steps, settings.sampler, settings.spacing, settings.temperature)  # per generation step
                     for steps in diffusion_schedule(settings.diffusion_steps, len(schedule))]
        guided = settings.cfg_scale != 1.0 and forced is None  # with forced values, no head samples: nothing to guide
        # CFG: a second branch with the null class, sharing the tokens (and pivots) of the first
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        pivot_context = twice(pivot_context) if guided else pivot_context

        for step, num_masked in enumerate(schedule):  # num_masked [B]
            # 1. the transformer looks at everything revealed so far (see shown_mask)
            shown = self.shown_mask(phase, mask)
            seen = (twice(tokens), twice(shown)) if guided else (tokens, shown)
            z = self.transformer(phase, labels, *seen, pivot_context)  # [B (x2 with CFG), n, W]
            z, z_null = z.chunk(2) if guided else (z, None)
            # 2. the positions revealed at this step, and the guidance scale (rising linearly with progress)
            reveal = mask & ~mask_by_order(orders, num_masked[:, None])  # [B, n]
            scale = 1 + (settings.cfg_scale - 1) * (n - num_masked.view(B, 1, 1)) / n  # [B, 1, 1]; given tokens count
            # 3. the head samples them, in agreement with the tokens revealed before (or they take the forced values)
            if forced is None:
                tokens = head.sample(tokens, mask, reveal, z, z_null, scale, denoising[step], generator)
            else:
                tokens = torch.where(reveal[..., None], forced, tokens)
            # 4. the revealed tokens are fixed for good; keep their z
            z_revealed[reveal] = z[reveal].to(z_revealed.dtype)
            mask = mask & ~reveal
            if frames is not None:
                side = math.isqrt(n)
                frames.append({"phase": "pivot" if phase == PIVOT else "dense",
                               "image": unpatchify(tokens, cfg.patch_size, cfg.channels).clamp(-1, 1).cpu(),
                               "mask": mask.view(B, side, side).cpu(), "revealed": reveal.view(B, side, side).cpu()})
        return tokens, z_revealed

    @torch.no_grad()
    def sample(self, labels, sampling=None, seed=None, drop_pivots=False, trajectory=False, known_images=None,
               known_mask=None, pivots=None, **changes):
        """Generate images [B, C, H, W] in [-1, 1] for class labels [B] (the paper's two-phase generation).
        sampling: a Sampling (default: the config's), with `changes` to its fields by name, e.g. dense_steps=4.
        drop_pivots: phase 2 sees only placeholders (to show what the pivots do).
        known_images [B, C, H, W] in [-1, 1], known_mask bool [B, H, W]: zero-shot editing (inpainting,
        outpainting, a class swap). The pixels where known_mask is True are kept exactly, the rest generated
        around them; the mask keeps or drops whole dense tokens (see known_tokens).
        pivots [B, C, H/2, W/2] in [-1, 1]: given pivot images. Phase 1 takes their tokens instead of sampling (its
        transformer still runs along the random order, so each pivot gets the z_s that phase 2 reads), and phase 2
        generates around them: with several seeds, it shows what the pivots decide and what phase 2 adds.
        trajectory=True also returns one frame per step: {"phase", "image" (tokens so far; for the DiT head
        the masked positions hold its latest sample), "mask" (True = not yet revealed), "revealed" (True = revealed
        at this step)}, the masks per token."""
        cfg = self.cfg
        s = cfg.sampling_with(sampling, **changes)
        labels = torch.as_tensor(labels, device=self.mask_token.device).long()
        if labels.dim() != 1 or labels.min() < 0 or labels.max() >= cfg.num_classes:
            raise ValueError(f"labels must be a list of class indices in [0, {cfg.num_classes})")
        device = labels.device
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        frames = [] if trajectory else None
        # the tokens given (editing), True in *_keep; plain generation: none
        known_pivots, pivot_keep, known_dense, dense_keep = known_tokens(cfg, known_images, known_mask, len(labels),
                                                                          device)
        forced = None if pivots is None else given_pivot_tokens(cfg, pivots, known_images, len(labels), device)
        was_training = self.training
        self.eval()

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # bf16 on a GPU
            context = None
            if cfg.pivots != "none":
                # Phase 1: the low-resolution pivots, MLP head; keep each generated pivot's z_s
                pivots, z_pivot = self.unmask(PIVOT, labels, known_pivots, pivot_keep, s.phase(PIVOT), generator,
                                              forced=forced, frames=frames)
                # conditional tokens where phase 1 predicted the pivot, the placeholder where it was given (as in
                # training)
                dropped = torch.full(labels.shape, drop_pivots, device=device)
                context = self.pivot_context(pivots, z_pivot, ~pivot_keep, dropped)
            # Phase 2: the dense tokens around the pivots, DiT head
            dense, _ = self.unmask(DENSE, labels, known_dense, dense_keep, s.phase(DENSE), generator,
                                   pivot_context=context, frames=frames)

        self.train(was_training)
        dense = torch.where(dense_keep[..., None], known_dense, dense)  # the given tokens exactly (the heads keep them)
        images = unpatchify(dense, cfg.patch_size, cfg.channels).clamp(-1, 1)
        return (images, frames) if trajectory else images


# ----------------------------------------------------------------------------------------------------
# 8. Checkpoints: the config travels with the weights, so a file alone rebuilds its model
#    (checkpoints.py writes and reads the files, with clear errors for broken ones)
# ----------------------------------------------------------------------------------------------------


def to_checkpoint(cfg, **state):
    """What a checkpoint holds: the model's Config as plain data, and `state` (weights: model=..., ema=...; a
    training run adds its optimizer, step, ...)."""
    return {"config": asdict(cfg), **state}


def vector_mask_token(module, state_dict, prefix, *args):
    """Checkpoints written before the mask token became a vector [W] (the shipped model's) hold it as [1, 1, W]:
    reshaped as they load."""
    key = prefix + "mask_token"
    if key in state_dict and state_dict[key].dim() == 3:
        state_dict[key] = state_dict[key].reshape(-1)


def from_checkpoint(checkpoint, key="ema"):
    """The model a checkpoint holds, with its `key` weights ("ema" or "model"), in eval mode."""
    model = HiMAR(Config(**checkpoint["config"]))
    model.load_state_dict(checkpoint[key])
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# 9. Checks and presets: each setting in its range (with a sentence that names it), and the named configs
# ----------------------------------------------------------------------------------------------------


def check_config(cfg):
    """A ValueError for the first field of a Config out of its range, or a combination that cannot work (a size of 0
    would divide by zero, a mask ratio above 1 never be drawn); its Sampling checked against it."""
    fraction = lambda v: is_finite(v) and 0 <= v <= 1
    check_fields(cfg, [
        (("image_size", "channels", "patch_size", "num_classes", "width", "depth", "num_heads", "buffer_tokens",
          "mlp_head_width", "mlp_head_depth", "mlp_head_repeats", "dit_head_width", "dit_head_depth",
          "dit_head_num_heads", "dit_head_repeats", "diffusion_steps"), "a whole number >= 1",
         lambda v: is_whole(v) and v >= 1),
        (("mlp_ratio",), "a finite number > 0", lambda v: is_finite(v) and v > 0),
        (("dropout", "mask_ratio_min"), "a number in [0, 1)", lambda v: fraction(v) and v < 1),
        (("class_dropout", "pivot_dropout_start", "pivot_dropout_end", "dense_full_mask"), "a probability, in [0, 1]",
         fraction),
        (("pivot_dropout_warmup",), "a fraction of the run, in [0, 1]", fraction),
        (("mask_ratio_std", "pivot_loss_weight", "dense_loss_weight"), "a finite number >= 0",
         lambda v: is_finite(v) and v >= 0),
        (("scale_vector",), "True or False", lambda v: isinstance(v, bool)),
    ])
    checks = [
        (cfg.pivots in ("none", "visual", "conditional"), "pivots must be 'none', 'visual' or 'conditional'"),
        (cfg.dense_head in ("mlp", "dit"), "dense_head must be 'mlp' or 'dit'"),
        (cfg.pivots != "none" or cfg.dense_head == "mlp", "pivots='none' is MAR: it needs dense_head='mlp'"),
        (cfg.pivots != "none" or cfg.dense_full_mask == 0, "pivots='none' is MAR: it needs dense_full_mask=0"),
        (cfg.image_size % (2 * cfg.patch_size) == 0, "image_size must be divisible by 2 * patch_size"),
        (cfg.width % cfg.num_heads == 0, "width must be divisible by num_heads"),
        (cfg.dit_head_width % cfg.dit_head_num_heads == 0, "dit_head_width must be divisible by dit_head_num_heads"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"Config: {message}")
    check_sampling_for(cfg.sampling, cfg)


def check_sampling(s):
    """A ValueError for the first field of a Sampling out of its range."""
    check_fields(s, [
        (("pivot_steps", "dense_steps"), "at least 1", lambda v: is_whole(v) and v >= 1),
        (("pivot_cfg", "dense_cfg"), "a finite number >= 0", lambda v: is_finite(v) and v >= 0),
        (("temperature",), "a finite number > 0", lambda v: is_finite(v) and v > 0),
        (("pivot_sampler", "dense_sampler"), f"one of the samplers {SAMPLERS}", lambda v: v in SAMPLERS),
        (("pivot_spacing", "dense_spacing"), f"one of the spacings {SPACINGS}", lambda v: v in SPACINGS),
    ])
    if min(s.pivot_diffusion_steps + s.dense_diffusion_steps) < 1:
        raise ValueError("Sampling: diffusion steps must be at least 1")


def check_sampling_for(s, cfg):
    """The limits that depend on the model: at most one generation step per token, at most T denoising steps."""
    for name, n in (("pivot_steps", cfg.num_pivots), ("dense_steps", cfg.num_dense)):
        if getattr(s, name) > n:
            raise ValueError(f"Sampling: {name} must be between 1 and the number of tokens ({n}), "
                             f"got {getattr(s, name)}")
    if max(s.pivot_diffusion_steps + s.dense_diffusion_steps) > cfg.diffusion_steps:
        raise ValueError(f"Sampling: diffusion steps must be between 1 and diffusion_steps ({cfg.diffusion_steps})")


def is_whole(value):
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value):
    """An int or float (not a bool) that is neither inf nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(settings, rules):
    """A ValueError naming the first field of `settings` (a Config or Sampling) that breaks its rule; rules are
    (field names, what each must be, a test of its value)."""
    for names, what, ok in rules:
        for name in names:
            value = getattr(settings, name)
            if not ok(value):
                raise ValueError(f"{type(settings).__name__}: {name} must be {what}, got {value!r}")


PRESETS = {
    # CPU tests: 16 pivots and 64 dense tokens of 4x4 pixels, about 0.3M parameters
    "tiny": Config(patch_size=4, width=64, depth=2, num_heads=2, buffer_tokens=1,
                   mlp_head_width=64, mlp_head_depth=2, dit_head_width=64, dit_head_depth=1, dit_head_num_heads=2,
                   sampling=Sampling(pivot_steps=4, dense_steps=2, pivot_diffusion_steps=10, dense_diffusion_steps=10,
                                     pivot_spacing="uniform")),  # evenly spaced: the tests and notebook 3 assume it
    # CIFAR-10, 32x32: 64 pivots and 256 dense tokens of 2x2 pixels (the paper's 8x8 / 16x16 layout), 31.4M parameters.
    # Phase 2 trains on the fully hidden map, where K2 = 1 sampling starts it (not the reference's; REPORT.md)
    "cifar10": Config(dense_full_mask=1.0),
    # ImageNet 64x64: 64 pivots and 256 dense tokens of 4x4 pixels; its heads and sampling are not yet tuned
    "imagenet64": Config(image_size=64, patch_size=4, num_classes=1000, width=768, depth=16, num_heads=12,
                         mlp_head_width=1024, mlp_head_depth=3, dit_head_width=384, dit_head_depth=3,
                         dit_head_num_heads=6, dit_head_repeats=2,
                         sampling=Sampling(pivot_steps=32, pivot_cfg=3.0, pivot_diffusion_steps=50,
                                           dense_diffusion_steps=50)),
}


def preset(name, **overrides):
    """A named config, optionally with some fields changed: preset("cifar10", depth=8). Sampling settings can be
    changed by name too: preset("tiny", dense_steps=4)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    sampling_names = {f.name for f in fields(Sampling)}
    sampling = replace(overrides.pop("sampling", cfg.sampling),
                       **{k: v for k, v in overrides.items() if k in sampling_names})
    return replace(cfg, sampling=sampling, **{k: v for k, v in overrides.items() if k not in sampling_names})
