"""Hi-MAR in one file: Hierarchical Masked Autoregressive image generation with low-resolution token pivots.

Zheng et al., "Hierarchical Masked Autoregressive Models with Low-Resolution Token Pivots", ICML 2025.

Hi-MAR builds on MAR (Li et al. 2024): a bidirectional transformer reveals the continuous tokens of an
image a few at a time in a random order, and a small diffusion model (the "head") samples each revealed
token conditioned on the transformer's output z for its position. Hi-MAR generates in two phases:

    phase 1  the PIVOTS: the tokens of a 2x lower-resolution image (global structure), MLP head;
    phase 2  the DENSE tokens of the full image, conditioned on the pivots, Diffusion Transformer head.

One transformer serves both phases; a "scale vector" tells it which phase it is in.

Read top to bottom:
    1. Config           one dataclass, named presets
    2. Tokenizer        pixels <-> dense tokens and pivot tokens
    3. Masks            training mask ratios, the sampling schedule
    4. Diffusion        cosine schedule, training loss, reverse sampler (shared by both heads)
    5. Building blocks  attention, the scale-aware block (eq. 2), the adaLN layer (eq. 3)
    6. Heads            the per-token MLP head and the Diffusion Transformer head
    7. The model        HiMAR: one training step (both phases), and the two-phase sampling loop
    8. Checkpoints      save / load with the config inside

Shapes: B batch, Np pivot tokens, Nd dense tokens (Nd = 4 Np), D values per token (C*p*p),
W transformer width, L sequence length.
"""

import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. Config: the sizes, the training choices, the paper's ablation switches (Table 5) and the sampling
#    defaults, in one dataclass
# ----------------------------------------------------------------------------------------------------

PIVOT, DENSE = 0, 1  # the two phases (the paper's two scales); the index feeds the scale vector


@dataclass
class Config:
    # image and tokens
    image_size: int = 32
    channels: int = 3
    patch_size: int = 2  # a dense token is a p x p pixel patch; a pivot token a p x p patch of the 2x downsample
    num_classes: int = 10
    # the shared transformer
    width: int = 320
    depth: int = 8
    heads: int = 5
    mlp_ratio: float = 4.0
    buffer_tokens: int = 4  # prefix tokens that carry the class embedding
    dropout: float = 0.0  # attention and projection dropout in the transformer
    class_dropout: float = 0.1  # probability of the null class in training (for classifier-free guidance)
    # phase-1 head: per-token MLP (MAR)
    mlp_head_width: int = 256
    mlp_head_depth: int = 3
    mlp_head_repeats: int = 4  # noise levels drawn per token and step
    # phase-2 head: Diffusion Transformer
    dit_head_width: int = 256
    dit_head_depth: int = 3
    dit_head_heads: int = 4
    dit_head_repeats: int = 2  # noise levels drawn per image and step
    # training
    mask_ratio_min: float = 0.7  # truncated normal mask ratio (phases trained MAR-style), mean 1
    mask_ratio_std: float = 0.25
    pivot_dropout_start: float = 1.0  # probability that phase 2 sees no pivots, lowered linearly ...
    pivot_dropout_end: float = 0.5
    pivot_dropout_warmup: int = 2000  # ... over this many training steps
    pivot_loss_weight: float = 2.0
    dense_loss_weight: float = 0.75
    diffusion_steps: int = 1000
    # the paper's ablation switches (Table 5)
    pivots: str = "conditional"  # "none" (MAR), "visual" (low-res tokens) or "conditional" (Hi-MAR)
    dense_head: str = "dit"  # "mlp" or "dit"
    scale_vector: bool = True
    # default sampling settings (for CIFAR-10 from the sweep in scripts/cifar10_sampling_sweep.sh; see the README)
    pivot_steps: int = 32
    dense_steps: int = 1
    pivot_cfg: float = 3.0
    dense_cfg: float = 3.0
    temperature: float = 1.0
    pivot_diffusion_steps: tuple = (50, 50)  # the head's denoising steps at the (first, last) generation step;
    dense_diffusion_steps: tuple = (50, 50)  # linear in between (DiSA's annealing); one int: the same at every step

    def __post_init__(self):
        self.pivot_diffusion_steps = annealed_range(self.pivot_diffusion_steps)
        self.dense_diffusion_steps = annealed_range(self.dense_diffusion_steps)
        checks = [
            (self.pivots in ("none", "visual", "conditional"), "pivots must be 'none', 'visual' or 'conditional'"),
            (self.dense_head in ("mlp", "dit"), "dense_head must be 'mlp' or 'dit'"),
            (self.pivots != "none" or self.dense_head == "mlp", "pivots='none' is MAR: it needs dense_head='mlp'"),
            (self.image_size % (2 * self.patch_size) == 0, "image_size must be divisible by 2 * patch_size"),
            (self.width % self.heads == 0, "width must be divisible by heads"),
            (self.dit_head_width % self.dit_head_heads == 0, "dit_head_width must be divisible by dit_head_heads"),
            (all(1 <= n <= self.diffusion_steps for n in self.pivot_diffusion_steps + self.dense_diffusion_steps),
             "pivot_diffusion_steps and dense_diffusion_steps must be between 1 and diffusion_steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Config: {message}")

    @property
    def num_dense(self):  # Nd
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_pivots(self):  # Np = Nd / 4
        return self.num_dense // 4

    @property
    def token_dim(self):  # D
        return self.channels * self.patch_size**2


def annealed_range(steps):
    """Diffusion steps as a (first, last) pair: an int n means (n, n). (See diffusion_schedule in section 3.)"""
    first, last = (steps, steps) if isinstance(steps, int) else steps
    return int(first), int(last)


PRESETS = {
    # CPU tests: 16 pivots and 64 dense tokens of 4x4 pixels, about 0.3M parameters
    "tiny": Config(patch_size=4, width=64, depth=2, heads=2, buffer_tokens=1,
                   mlp_head_width=64, mlp_head_depth=2, dit_head_width=64, dit_head_depth=1, dit_head_heads=2,
                   pivot_dropout_warmup=100, pivot_steps=4, dense_steps=2,
                   pivot_diffusion_steps=10, dense_diffusion_steps=10),
    # CIFAR-10, 32x32: 64 pivots and 256 dense tokens of 2x2 pixels (the paper's 8x8 / 16x16 layout)
    "cifar10": Config(),
    # ImageNet 64x64: 64 pivots and 256 dense tokens of 4x4 pixels
    "imagenet64": Config(image_size=64, patch_size=4, num_classes=1000, width=768, depth=16, heads=12,
                         mlp_head_width=1024, dit_head_width=384, dit_head_heads=6, pivot_dropout_warmup=10000),
}


def preset(name, **overrides):
    """A named config, optionally with some fields changed: preset("cifar10", depth=8)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


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
# 3. Masks: which tokens are hidden in training, when each is revealed in sampling, and how many
#    denoising steps the head takes at each generation step
# ----------------------------------------------------------------------------------------------------


def random_orders(batch, n, device, generator=None):
    """One random permutation of the n positions per image: [B, n]. Tokens are masked / revealed in this order."""
    return torch.rand(batch, n, device=device, generator=generator).argsort(dim=1)


def mask_by_order(orders, num_masked):
    """Bool [B, n], True at the first `num_masked` positions of each order (those stay hidden). The shape does
    not depend on num_masked, so a training step never waits for the GPU to learn how many tokens it masks."""
    rank = orders.argsort(dim=1)  # rank[b, i]: where position i comes in image b's order
    return rank < num_masked


def truncated_normal_ratio(cfg):
    """MAR's mask ratio: normal with mean 1 and std 0.25, cut to [mask_ratio_min, 1] (phase 1, and MAR)."""
    while True:
        r = 1.0 - cfg.mask_ratio_std * abs(torch.randn(()).item())
        if r >= cfg.mask_ratio_min:
            return r


def cosine_ratio():
    """MaskGIT's cosine mask ratio cos(pi/2 * u), u ~ U(0, 1) (phase 2 of Hi-MAR)."""
    return math.cos(math.pi / 2 * torch.rand(()).item())


def num_to_mask(ratio, n):
    """ceil(ratio * n), at least one: every training step has something to predict."""
    return max(1, math.ceil(ratio * n))


def pivot_dropout_at(cfg, step):
    """Probability that phase 2 trains without pivots at a training step: starts at 1 (early z_s is noise)
    and falls linearly to its final value over the warm-up."""
    progress = min(1.0, step / max(1, cfg.pivot_dropout_warmup))
    return cfg.pivot_dropout_start + (cfg.pivot_dropout_end - cfg.pivot_dropout_start) * progress


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


def diffusion_schedule(diffusion_steps, steps):
    """The head's denoising steps at each of `steps` generation steps, from diffusion_steps = (first, last),
    linear in between. Annealing them (DiSA, 2025): the more tokens are known, the less the head has to invent,
    and the fewer denoising steps it needs."""
    first, last = annealed_range(diffusion_steps)
    if steps == 1:
        return [first]
    return [round(first + (last - first) * k / (steps - 1)) for k in range(steps)]


# ----------------------------------------------------------------------------------------------------
# 4. Diffusion: the process both heads use (DDPM with a cosine schedule, noise prediction)
# ----------------------------------------------------------------------------------------------------


class Diffusion:
    """Gaussian diffusion over tokens. x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 0..T-1, with the
    cosine schedule of Nichol & Dhariwal (2021). A head learns eps(x_t | t, z) by MSE; sampling runs the
    DDPM reverse process on `steps` evenly spaced timesteps (respacing)."""

    def __init__(self, num_steps):
        self.num_steps = num_steps
        s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alpha_bar = torch.cumprod(1 - betas, 0)  # [T], float64, on the CPU
        self._alpha_bar_here = self.alpha_bar  # a copy on the device of the last training batch

    def _abar(self, t, like):
        """abar_t for a batch of timesteps t [M], shaped to broadcast against `like` [M, ...]."""
        if self._alpha_bar_here.device != like.device:  # copy the table to the GPU once, not at every step
            self._alpha_bar_here = self.alpha_bar.to(like.device)
        abar = self._alpha_bar_here[t].to(like.dtype)
        return abar.view(-1, *[1] * (like.dim() - 1))

    def loss(self, head, x0, z):
        """Noise-prediction loss of `head` on clean tokens x0 [M, L, D] conditioned on z [M, L, Wz]; one
        noise level per row of x0. Returns the loss of every token, [M, L]."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        abar = self._abar(t, x0)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        return (head(x_t, t, z).float() - noise.float()).pow(2).mean(dim=-1)

    @torch.no_grad()
    def sample(self, eps_fn, shape, steps, temperature=1.0, generator=None, device="cpu"):
        """Reverse diffusion from pure noise with `steps` respaced DDPM steps. eps_fn(x_t, t) predicts the
        noise (classifier-free guidance is applied inside it). The sampler's noise is scaled by `temperature`."""
        T = self.num_steps
        timesteps = [(i + 1) * T // steps - 1 for i in range(steps)]  # evenly spaced, ending at T-1
        x = torch.randn(shape, device=device, generator=generator)
        for i in reversed(range(steps)):
            t = timesteps[i]
            abar = self.alpha_bar[t].item()
            abar_prev = self.alpha_bar[timesteps[i - 1]].item() if i > 0 else 1.0
            beta = 1 - abar / abar_prev  # the respaced step's beta
            eps = eps_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long))
            x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)  # tokens are pixels in [-1, 1]
            # posterior q(x_{t-1} | x_t, x0): mean and variance
            mean = (math.sqrt(abar_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - abar_prev) * x) / (1 - abar)
            if i > 0:
                std = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
                x = mean + temperature * std * torch.randn(shape, device=device, generator=generator)
            else:
                x = mean  # = x0 at the last step
        return x


# ----------------------------------------------------------------------------------------------------
# 5. Building blocks: attention, the shared transformer's scale-aware block (eq. 2), per-token adaLN (eq. 3)
# ----------------------------------------------------------------------------------------------------


def sinusoidal(values, dim):
    """Sinusoidal features of scalars (diffusion timesteps or the phase index): [M] -> [M, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens of a sequence (bidirectional), via PyTorch's fused kernel."""

    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # [B, L, W]
        B, L, W = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, L, W/h]
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

    def __init__(self, width, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.ffn = FeedForward(width, mlp_ratio, dropout)
        one, zero = torch.ones(width), torch.zeros(width)
        self.a = nn.Parameter(torch.zeros(6 * width))
        self.b = nn.Parameter(torch.cat([one, zero, one, one, zero, one]))

    def forward(self, x, v):  # x [B, L, W], v [6W]
        alpha1, beta1, gamma1, alpha2, beta2, gamma2 = (self.a * v + self.b).chunk(6)
        x = x + gamma1 * self.attn(alpha1 * self.norm1(x) + beta1)
        return x + gamma2 * self.ffn(alpha2 * self.norm2(x) + beta2)


class AdaLN(nn.Module):
    """A residual sublayer with per-token adaptive LayerNorm, DiT's adaLN-Zero (paper eq. 3):

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


# ----------------------------------------------------------------------------------------------------
# 6. Heads: small diffusion models that sample tokens given the transformer's output z
# ----------------------------------------------------------------------------------------------------


class DiffusionHead(nn.Module):
    """A denoiser eps(x_t | t, z) over a map of tokens x [B, L, D], conditioned per token on
    c_i = time_embedding(t) + proj(z_i).

    heads = 0: MAR's MLP head (phase 1). Residual adaLN MLPs only, so every token is denoised on its own.
    heads > 0: the Diffusion Transformer head (phase 2, eq. 3). DiT blocks (self-attention + MLP, both with
    per-token adaLN), so the tokens of the whole map are denoised jointly, each seeing the others."""

    def __init__(self, token_dim, z_dim, width, depth, heads=0, mlp_ratio=1.0, num_tokens=None):
        super().__init__()
        self.attends = heads > 0
        self.input = nn.Linear(token_dim, width)
        if self.attends:  # attention needs to know where each token is
            self.pos = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.condition = nn.Linear(z_dim, width)
        layers = []
        for _ in range(depth):
            if self.attends:
                layers.append(AdaLN(width, Attention(width, heads)))
            layers.append(AdaLN(width, FeedForward(width, mlp_ratio)))
        self.layers = nn.ModuleList(layers)
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, token_dim)

    def forward(self, x, t, z):  # x [B, L, D], t [B], z [B, L, Wz]
        c = self.time(sinusoidal(t, self.input.out_features))[:, None] + self.condition(z)  # [B, L, width]
        h = self.input(x) + self.pos if self.attends else self.input(x)  # [B, L, width]
        for layer in self.layers:
            h = layer(h, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=-1)
        return self.output(self.out_norm(h) * (1 + scale) + shift)  # [B, L, D]


# ----------------------------------------------------------------------------------------------------
# 7. The model (Fig. 2): the shared transformer, one training step over both phases, two-phase sampling
# ----------------------------------------------------------------------------------------------------


def twice(x):
    """x stacked on itself along the batch, for the two branches of classifier-free guidance (None stays None)."""
    return None if x is None else torch.cat([x, x])


def at(x, where):
    """The rows of x [B, n, C] at the True positions of where [B, n], the same number k in every image:
    [B, k, C] (None stays None)."""
    return None if x is None else x[where].view(x.shape[0], -1, x.shape[-1])


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
    for name, p in model.named_parameters():
        if name.startswith(("pos_", "mask_token", "pivot_placeholder", "class_embed")) or name.endswith(".pos"):
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
        self.diffusion = Diffusion(cfg.diffusion_steps)
        # inputs
        self.class_embed = nn.Embedding(cfg.num_classes + 1, W)  # the last class is the null class (CFG)
        self.token_embed = nn.Linear(cfg.token_dim, W)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos_buffer = nn.Parameter(torch.zeros(1, cfg.buffer_tokens, W))
        self.pos_dense = nn.Parameter(torch.zeros(1, cfg.num_dense, W))
        # the shared transformer, told its phase by the scale vector v = MLP(sinusoidal(phase))
        if cfg.scale_vector:  # (without it, ablation: v = 0, the blocks cannot tell the phases apart)
            self.scale_mlp = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, 6 * W))
        self.blocks = nn.ModuleList(ScaleAwareBlock(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W)
        # heads
        dense_heads = cfg.dit_head_heads if cfg.dense_head == "dit" else 0
        dense_width, dense_depth = (cfg.dit_head_width, cfg.dit_head_depth) if dense_heads else (cfg.mlp_head_width, cfg.mlp_head_depth)
        self.dense_head = DiffusionHead(cfg.token_dim, W, dense_width, dense_depth, dense_heads,
                                        cfg.mlp_ratio if dense_heads else 1.0, cfg.num_dense)
        if cfg.pivots != "none":
            self.pos_pivot = nn.Parameter(torch.zeros(1, cfg.num_pivots, W))
            self.pivot_head = DiffusionHead(cfg.token_dim, W, cfg.mlp_head_width, cfg.mlp_head_depth)
            self.pivot_placeholder = nn.Parameter(torch.zeros(1, cfg.num_pivots, W))  # a pivot with no condition
        if cfg.pivots == "conditional":
            self.pivot_condition = nn.Linear(W, W)  # z_s -> conditional token
        init_weights(self)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- the shared transformer --------------------------------------------------------------------

    def embed(self, tokens, mask):
        """Token values -> transformer inputs, the mask token where a token is hidden. [B, N, D] -> [B, N, W]"""
        return torch.where(mask[..., None], self.mask_token, self.token_embed(tokens))

    def transformer(self, phase, labels, tokens, mask, pivot_context=None):
        """Run the shared transformer for one phase and return z for that phase's tokens.

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
        if cfg.scale_vector:
            v = self.scale_mlp(sinusoidal(torch.tensor([phase], device=x.device), cfg.width))[0]  # [6W]
        else:
            v = torch.zeros(6 * cfg.width, device=x.device)
        for block in self.blocks:
            x = block(x, v)
        return self.norm(x)[:, -tokens.shape[1]:]  # z for this phase's tokens

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

    def head_loss(self, head, tokens, z, mask):
        """Diffusion loss of a head on tokens [B, N, D] given z [B, N, W] and the training mask [B, N].
        DiT head: the whole map noised to one level per image, `dit_head_repeats` times; the loss is averaged
                  over all tokens (as the reference code).
        MLP head: every token on its own, each at `mlp_head_repeats` noise levels; the loss is averaged over
                  the masked tokens (the head runs on all of them: fixed shapes, no wait for the GPU)."""
        if head.attends:
            r = self.cfg.dit_head_repeats
            return self.diffusion.loss(head, tokens.repeat(r, 1, 1), z.repeat(r, 1, 1)).mean()
        r = self.cfg.mlp_head_repeats
        x0 = tokens.flatten(0, 1).repeat(r, 1)[:, None]  # [r*B*N, 1, D]: each token is its own "map"
        loss = self.diffusion.loss(head, x0, z.flatten(0, 1).repeat(r, 1)[:, None])[:, 0]  # [r*B*N]
        weight = mask.flatten().repeat(r).float()
        return (loss * weight).sum() / weight.sum()

    def forward(self, images, labels, pivot_dropout=0.0):
        """One training step's losses (both phases every step). images [B, C, H, W] in [-1, 1], labels [B].
        Returns (total loss, {"pivot": loss1, "dense": loss2}). pivot_dropout: see pivot_dropout_at()."""
        cfg = self.cfg
        B, device = images.shape[0], images.device
        null = torch.full_like(labels, cfg.num_classes)
        labels = torch.where(torch.rand(B, device=device) < cfg.class_dropout, null, labels)
        pivots, dense = tokenize(images, cfg.patch_size)  # [B, Np, D], [B, Nd, D]

        if cfg.pivots == "none":  # MAR: one phase over the dense tokens
            dense_mask = mask_by_order(random_orders(B, cfg.num_dense, device), num_to_mask(truncated_normal_ratio(cfg), cfg.num_dense))
            z_dense = self.transformer(DENSE, labels, dense, dense_mask)
            loss = self.head_loss(self.dense_head, dense, z_dense, dense_mask)
            return loss, {"dense": loss.detach()}

        # Phase 1: pivots. Truncated-normal mask ratio; every dense position is masked, so they are left out.
        pivot_mask = mask_by_order(random_orders(B, cfg.num_pivots, device), num_to_mask(truncated_normal_ratio(cfg), cfg.num_pivots))
        z_pivot = self.transformer(PIVOT, labels, pivots, pivot_mask)  # z_s [B, Np, W]
        loss_pivot = self.head_loss(self.pivot_head, pivots, z_pivot, pivot_mask)

        # Phase 2: dense tokens, conditioned on the pivots (stop-grad phase-1 outputs). Cosine mask ratio.
        dropped = torch.rand(B, device=device) < pivot_dropout
        context = self.pivot_context(pivots, z_pivot, pivot_mask, dropped)
        dense_mask = mask_by_order(random_orders(B, cfg.num_dense, device), num_to_mask(cosine_ratio(), cfg.num_dense))
        z_dense = self.transformer(DENSE, labels, dense, dense_mask, context)  # z_l [B, Nd, W]
        loss_dense = self.head_loss(self.dense_head, dense, z_dense, dense_mask)

        # weights: 2.0 and 0.75, each times the phase's share of all tokens (as the reference code)
        n = cfg.num_pivots + cfg.num_dense
        loss = (cfg.pivot_loss_weight * cfg.num_pivots / n * loss_pivot
                + cfg.dense_loss_weight * cfg.num_dense / n * loss_dense)
        return loss, {"pivot": loss_pivot.detach(), "dense": loss_dense.detach()}

    # --- sampling -----------------------------------------------------------------------------------

    def denoise(self, head, z, z_null, cfg_scale, steps, temperature, generator):
        """Sample tokens [B, L, D] from a head by reverse diffusion, conditioned per token on z [B, L, W].
        With z_null (the same positions under the null class), classifier-free guidance on the noise:
        eps = eps_null + cfg_scale * (eps_cond - eps_null)."""

        def eps_fn(x, t):
            if z_null is None:
                return head(x, t, z)
            eps_cond, eps_null = head(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z_null])).chunk(2)
            return eps_null + cfg_scale * (eps_cond - eps_null)

        shape = (*z.shape[:2], self.cfg.token_dim)
        return self.diffusion.sample(eps_fn, shape, steps, temperature, generator, z.device)

    def unmask(self, phase, labels, steps, cfg_scale, temperature, diffusion_steps, generator,
               pivot_context=None, frames=None):
        """One phase of generation: reveal all of the phase's tokens in `steps` steps, in a random order,
        following the cosine schedule. Returns the tokens [B, N, D] and, per position, the transformer
        output z at the step it was revealed [B, N, W] (phase 1's z_s, which phase 2 is conditioned on)."""
        cfg, B, device = self.cfg, labels.shape[0], labels.device
        n = cfg.num_pivots if phase == PIVOT else cfg.num_dense
        denoising_steps = diffusion_schedule(diffusion_steps, steps)  # per generation step (annealed)
        head = self.pivot_head if phase == PIVOT else self.dense_head
        tokens = torch.zeros(B, n, cfg.token_dim, device=device)
        mask = torch.ones(B, n, dtype=torch.bool, device=device)  # True = not yet revealed
        z_revealed = torch.zeros(B, n, cfg.width, device=device)
        orders = random_orders(B, n, device, generator)
        guided = cfg_scale != 1.0
        # CFG: a second branch with the null class, sharing the tokens (and pivots) of the first
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
        pivot_context = twice(pivot_context) if guided else pivot_context

        for step, num_masked in enumerate(reveal_schedule(n, steps)):
            # 1. the transformer looks at everything revealed so far
            seen = (twice(tokens), twice(mask)) if guided else (tokens, mask)
            z = self.transformer(phase, labels, *seen, pivot_context)  # [B (x2 with CFG), n, W]
            z, z_null = z.chunk(2) if guided else (z, None)
            # 2. the positions revealed at this step, and the guidance scale (rising linearly with progress)
            reveal = mask & ~mask_by_order(orders, num_masked)  # [B, n]
            scale = 1 + (cfg_scale - 1) * (n - num_masked) / n
            # 3. the head samples them
            if head.attends:  # DiT head: denoise the whole map; the still-masked positions take the new sample
                sampled = self.denoise(head, z, z_null, scale, denoising_steps[step], temperature, generator)
                tokens = torch.where(mask[..., None], sampled, tokens)
            else:  # MLP head: only the revealed tokens, each on its own
                sampled = self.denoise(head, at(z, reveal), at(z_null, reveal), scale, denoising_steps[step],
                                       temperature, generator)
                tokens[reveal] = sampled.flatten(0, 1)
            # 4. the revealed tokens are fixed for good; keep their z
            z_revealed[reveal] = z[reveal]
            mask = mask & ~reveal
            if frames is not None:
                frames.append({"phase": "pivot" if phase == PIVOT else "dense",
                               "image": unpatchify(tokens, cfg.patch_size, cfg.channels).clamp(-1, 1).cpu(),
                               "mask": mask.view(B, math.isqrt(n), math.isqrt(n)).cpu()})
        return tokens, z_revealed

    @torch.no_grad()
    def sample(self, labels, pivot_steps=None, dense_steps=None, pivot_cfg=None, dense_cfg=None,
               temperature=None, pivot_diffusion_steps=None, dense_diffusion_steps=None, seed=None,
               drop_pivots=False, trajectory=False):
        """Generate images [B, C, H, W] in [-1, 1] for class labels [B]. Settings left as None take the
        config's defaults; the diffusion steps are an int or a (first, last) pair (see diffusion_schedule).
        drop_pivots: phase 2 sees only placeholders (to show what the pivots do).
        trajectory=True also returns one frame per step: {"phase", "image" (tokens so far; for the DiT head
        the masked positions hold its latest sample), "mask" (True = not yet revealed)}."""
        cfg = self.cfg
        default = lambda value, fallback: fallback if value is None else value
        pivot_steps, dense_steps = default(pivot_steps, cfg.pivot_steps), default(dense_steps, cfg.dense_steps)
        pivot_cfg, dense_cfg = default(pivot_cfg, cfg.pivot_cfg), default(dense_cfg, cfg.dense_cfg)
        pivot_diffusion_steps = default(pivot_diffusion_steps, cfg.pivot_diffusion_steps)
        dense_diffusion_steps = default(dense_diffusion_steps, cfg.dense_diffusion_steps)
        temperature = default(temperature, cfg.temperature)
        labels = torch.as_tensor(labels, device=self.mask_token.device).long()
        if labels.dim() != 1 or labels.min() < 0 or labels.max() >= cfg.num_classes:
            raise ValueError(f"labels must be a list of class indices in [0, {cfg.num_classes})")
        device = labels.device
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        frames = [] if trajectory else None
        was_training = self.training
        self.eval()

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # bf16 on a GPU
            context = None
            if cfg.pivots != "none":
                # Phase 1: the low-resolution pivots, MLP head; keep each pivot's z_s
                pivots, z_pivot = self.unmask(PIVOT, labels, pivot_steps, pivot_cfg, temperature, pivot_diffusion_steps,
                                              generator, frames=frames)
                everywhere = torch.ones(pivots.shape[:2], dtype=torch.bool, device=device)
                dropped = torch.full(labels.shape, drop_pivots, device=device)
                context = self.pivot_context(pivots, z_pivot, everywhere, dropped)
            # Phase 2: the dense tokens around the pivots, DiT head
            dense, _ = self.unmask(DENSE, labels, dense_steps, dense_cfg, temperature, dense_diffusion_steps,
                                   generator, pivot_context=context, frames=frames)

        self.train(was_training)
        images = unpatchify(dense, cfg.patch_size, cfg.channels).clamp(-1, 1)
        return (images, frames) if trajectory else images


# ----------------------------------------------------------------------------------------------------
# 8. Checkpoints: the config travels with the weights, files are written atomically
# ----------------------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or made for another model."""


def save_checkpoint(path, checkpoint):
    """torch.save to a temporary file in the same folder, then rename: a crash mid-save leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by save_checkpoint; a clear CheckpointError if it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: check the path (train.py writes <out-dir>/checkpoint.pt)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a checkpoint (corrupt or truncated file?): {e}") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or not {"model", "ema"} & set(checkpoint):
        raise CheckpointError(f"{path} is not a Hi-MAR checkpoint (it has no config and model weights)")
    return checkpoint


def config_from_checkpoint(checkpoint):
    known = {f.name for f in fields(Config)}
    unknown = set(checkpoint["config"]) - known
    if unknown:
        raise CheckpointError(f"the checkpoint's config has fields this version does not know: {sorted(unknown)}")
    return Config(**checkpoint["config"])


def load_weights(model, checkpoint, key="model"):
    """Load checkpoint[key] into model, after checking that the checkpoint was made for this config."""
    saved = checkpoint["config"]
    wanted = asdict(model.cfg)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, model {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
    if differ:
        raise CheckpointError("the checkpoint was made for another config:\n  " + "\n  ".join(differ))
    if key not in checkpoint:
        raise CheckpointError(f"the checkpoint has no {key!r} weights (it has: {', '.join(checkpoint)})")
    model.load_state_dict(checkpoint[key])


def model_from_checkpoint(path, device="cpu", key="ema"):
    """Rebuild a model from the file alone: its config, then its weights (EMA weights by default)."""
    checkpoint = load_checkpoint(path, device)
    model = HiMAR(config_from_checkpoint(checkpoint)).to(device)
    load_weights(model, checkpoint, key if key in checkpoint else "model")
    return model.eval()
