"""Tests of himar.py: each checks one behaviour of the method and fails if it breaks. CPU, tiny configs."""

import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import checkpoints
import himar
import pictures
from himar import DENSE, PIVOT, HiMAR, preset


def tiny(**overrides):
    torch.manual_seed(0)
    return HiMAR(preset("tiny", **overrides))


def randomize(module, std=0.3):
    """Give every parameter random values, so zero-initialised layers do not hide what a test looks for."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def images(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def in_range(head, bound=1.0):
    """Make a diffusion head predict clean tokens inside (-bound, bound), bound * tanh of what it computes, and
    return the noise that goes with them. A head with random weights predicts noise whose clean tokens lie far
    outside [-1, 1]: the sampler clamps them, and the images sit at -1 or +1 almost everywhere, alike for different
    conditions, so that only the last bits of the CPU's arithmetic could tell them apart. With this head (and an
    output that keeps tanh off its flat ends, see unclamped) a change of condition shows in the pixels."""
    forward, alpha_bar = head.forward, head.diffusion.alpha_bar

    def predict_noise(x, t, z):
        abar = alpha_bar[t].float().view(-1, *[1] * (x.dim() - 1))
        return (x - abar.sqrt() * bound * torch.tanh(forward(x, t, z))) / (1 - abar).sqrt()

    head.forward = predict_noise
    return head


def unclamped(model):
    """The model (random weights) with both heads in_range, their output layers N(0, 0.01) so that tanh stays off
    its flat ends: its samples spread over (-1, 1) and move smoothly with every condition (guidance can push a few
    past the ends)."""
    for head in (model.dense_head, getattr(model, "pivot_head", None)):
        if head is not None:
            randomize(head.output, std=0.01)
            in_range(head)
    return model


def saturated(x):
    """The fraction of the values at or next to -1 / +1: clamped by the sampler, or on tanh's flat ends."""
    return (x.abs() > 0.98).float().mean().item()


def differ(a, b):
    """The mean absolute difference: float rounding moves it by ~1e-7, a real change by far more."""
    return (a - b).abs().mean().item()


# --- tokenizer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(himar.PRESETS))
def test_tokenizer_round_trip_is_exact_and_shapes_match_the_preset(name):
    cfg = preset(name)
    x = images(2, cfg.image_size)
    pivots, dense = himar.tokenize(x, cfg.patch_size)
    assert dense.shape == (2, cfg.num_dense, cfg.token_dim)
    assert pivots.shape == (2, cfg.num_pivots, cfg.token_dim)
    assert cfg.num_dense == 4 * cfg.num_pivots
    assert torch.equal(himar.unpatchify(dense, cfg.patch_size), x)
    assert torch.equal(himar.unpatchify(pivots, cfg.patch_size), himar.downsample(x))


def test_pivot_tokens_are_the_tokens_of_the_downsampled_image():
    x = images(2, 32)
    pivots, _ = himar.tokenize(x, 2)
    small = x.reshape(2, 3, 16, 2, 16, 2).mean(dim=(3, 5))  # 2x2 box filter, written out
    assert torch.allclose(himar.patchify(small, 2), pivots, atol=1e-6)
    # token 0 is the top-left 2x2 patch of the small image, channel-major
    assert torch.allclose(pivots[0, 0], small[0, :, :2, :2].reshape(-1), atol=1e-6)


# --- training masks ---------------------------------------------------------------------------------


def test_truncated_normal_ratio_is_the_normal_cut_to_its_range():
    cfg = preset("tiny")
    torch.manual_seed(0)
    ratios = torch.stack([himar.truncated_normal_ratio(cfg) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    # 1 - 0.25 |n| with |n| <= 1.2: P(ratio > 1 - 0.25 a) = (2 Phi(a) - 1) / (2 Phi(1.2) - 1)
    phi = lambda a: 0.5 * (1 + math.erf(a / math.sqrt(2)))
    for a in (0.2, 0.6, 1.0):
        expected = (2 * phi(a) - 1) / (2 * phi(1.2) - 1)  # 0.206, 0.586, 0.887
        assert abs((ratios > 1 - 0.25 * a).float().mean().item() - expected) < 0.03
    assert himar.truncated_normal_ratio(preset("tiny", mask_ratio_std=0.0)) == 1.0
    wide = torch.stack([himar.truncated_normal_ratio(preset("tiny", mask_ratio_min=0.0)) for _ in range(500)])
    assert wide.min() >= 0.0 and wide.max() <= 1.0
    cosine = torch.stack([himar.cosine_ratio() for _ in range(3000)])
    assert cosine.min() < 0.1 and cosine.max() <= 1.0  # phase 2 goes low
    assert abs((cosine < 0.5).float().mean().item() - 1 / 3) < 0.03  # cos(pi u / 2) < 1/2 when u > 2/3
    assert [himar.num_to_mask(r, 64).item() for r in (0.0, 0.01, 0.5, 0.501, 1.0)] == [1, 1, 32, 33, 64]


def record_transformer_calls(model):
    calls = []
    original = model.transformer

    def spy(phase, labels, tokens, mask, pivot_context=None):
        calls.append(dict(phase=phase, labels=labels.clone(), mask=mask.clone(), tokens=tokens,
                          context=None if pivot_context is None else pivot_context.detach().clone()))
        return original(phase, labels, tokens, mask, pivot_context)

    model.transformer = spy
    return calls


def test_training_masks_follow_the_ratios_and_the_phases(monkeypatch):
    model = tiny()
    cfg = model.cfg
    monkeypatch.setattr(himar, "truncated_normal_ratio", lambda cfg, device=None: 0.8)
    monkeypatch.setattr(himar, "cosine_ratio", lambda device=None: 0.3)
    calls = record_transformer_calls(model)
    model(images(4), torch.arange(4), pivot_dropout=0.0)
    phase1, phase2 = calls
    # phase 1 runs on the pivots alone: every dense position is masked, so none enters the sequence
    assert phase1["phase"] == PIVOT and phase1["mask"].shape == (4, cfg.num_pivots) and phase1["context"] is None
    assert (phase1["mask"].sum(1) == math.ceil(0.8 * cfg.num_pivots)).all()
    # phase 2: dense tokens masked at the cosine ratio; the pivot positions carry conditions, never the mask token
    assert phase2["phase"] == DENSE and phase2["mask"].shape == (4, cfg.num_dense)
    assert (phase2["mask"].sum(1) == math.ceil(0.3 * cfg.num_dense)).all()
    assert phase2["context"].shape == (4, cfg.num_pivots, cfg.width)
    assert not torch.isclose(phase2["context"], model.mask_token.detach()).all(-1).any()
    # masks differ between images (each has its own random order)
    assert not torch.equal(phase2["mask"][0], phase2["mask"][1])


def test_dense_full_mask_trains_phase_two_on_the_fully_hidden_map_with_its_probability(monkeypatch):
    torch.manual_seed(0)
    for p, expected in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0)):
        ratios = torch.stack([himar.dense_ratio(preset("tiny", dense_full_mask=p)) for _ in range(2000)])
        assert abs((ratios == 1).float().mean().item() - expected) < 0.04  # the cosine ratio is 1 almost never
        assert ratios.min() >= 0 and ratios.max() <= 1
    # in a training step: every dense token hidden, whatever the cosine ratio drew; phase 1 unchanged
    model = tiny(dense_full_mask=1.0)
    monkeypatch.setattr(himar, "cosine_ratio", lambda device=None: torch.tensor(0.3))
    monkeypatch.setattr(himar, "truncated_normal_ratio", lambda cfg, device=None: 0.8)
    calls = record_transformer_calls(model)
    model(images(4), torch.arange(4), pivot_dropout=0.0)
    phase1, phase2 = calls
    assert (phase1["mask"].sum(1) == math.ceil(0.8 * model.cfg.num_pivots)).all()
    assert phase2["mask"].all()
    with pytest.raises(ValueError, match="dense_full_mask"):
        preset("tiny", pivots="none", dense_head="mlp", dense_full_mask=0.5)
    with pytest.raises(ValueError, match="dense_full_mask"):
        preset("tiny", dense_full_mask=1.5)


def test_mar_baseline_is_one_phase_over_dense_tokens(monkeypatch):
    model = tiny(pivots="none", dense_head="mlp")
    monkeypatch.setattr(himar, "truncated_normal_ratio", lambda cfg, device=None: 0.75)
    calls = record_transformer_calls(model)
    loss, parts = model(images(2), torch.arange(2))
    assert [c["phase"] for c in calls] == [DENSE] and calls[0]["context"] is None
    assert (calls[0]["mask"].sum(1) == math.ceil(0.75 * model.cfg.num_dense)).all()
    assert set(parts) == {"dense"} and not hasattr(model, "pivot_head")


def test_pivot_dropout_schedule_falls_from_start_to_end_over_a_fraction_of_the_run():
    cfg = preset("tiny", pivot_dropout_start=1.0, pivot_dropout_end=0.25, pivot_dropout_warmup=0.5)
    values = [himar.pivot_dropout_at(cfg, progress) for progress in (0, 0.25, 0.5, 1.0)]
    assert values == pytest.approx([1.0, 0.625, 0.25, 0.25])
    # the default: the reference's 100 of 800 epochs, whatever the run's length
    default = preset("tiny", pivot_dropout_end=0.5)
    assert himar.pivot_dropout_at(default, 0.125) == pytest.approx(0.5)
    assert himar.pivot_dropout_at(default, 0.0625) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="fraction of the run"):
        preset("tiny", pivot_dropout_warmup=2000)


# --- sampling schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,steps", [(16, 1), (16, 2), (16, 4), (16, 16), (64, 7), (256, 64), (256, 256)])
def test_reveal_schedule_reveals_every_position_exactly_once(n, steps):
    schedule = himar.reveal_schedule(n, steps)
    assert len(schedule) == steps and schedule[-1] == 0
    counts = [n] + schedule
    assert all(a - b >= 1 for a, b in zip(counts, counts[1:]))  # at least one revealed per step
    orders = himar.random_orders(3, n, "cpu")
    revealed_at = torch.full((3, n), -1)
    mask = torch.ones(3, n, dtype=torch.bool)
    for k, num_masked in enumerate(schedule):
        reveal = mask & ~himar.mask_by_order(orders, num_masked)
        assert (revealed_at[reveal] == -1).all()  # nothing revealed twice
        revealed_at[reveal] = k
        mask &= ~reveal
    assert (revealed_at >= 0).all() and not mask.any()


def test_reveal_schedule_rejects_impossible_step_counts():
    for steps in (0, 17):
        with pytest.raises(ValueError, match="between 1 and the number of tokens"):
            himar.reveal_schedule(16, steps)


def test_diffusion_schedule_anneals_from_first_to_last():
    assert himar.diffusion_schedule(50, 4) == [50, 50, 50, 50]
    assert himar.diffusion_schedule((50, 10), 5) == [50, 40, 30, 20, 10]
    assert himar.diffusion_schedule((50, 10), 1) == [50]


def test_annealed_diffusion_steps_set_the_head_calls_of_each_generation_step():
    model = tiny()
    calls = []
    model.dense_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model.sample([0, 1], dense_steps=3, dense_diffusion_steps=(5, 1), dense_cfg=1.0, seed=0)
    assert len(calls) == 5 + 3 + 1  # one head call per denoising step, 5 then 3 then 1


def test_training_masks_have_a_fixed_shape_and_the_asked_count():
    orders = himar.random_orders(3, 10, "cpu")
    for k in (1, 4, 10):
        mask = himar.mask_by_order(orders, k)
        assert mask.shape == (3, 10) and (mask.sum(1) == k).all()
        assert mask.gather(1, orders[:, :k]).all()  # the first k of each order


def test_sampling_trajectory_reveals_each_token_once_per_phase():
    model = tiny()
    cfg = model.cfg
    _, frames = model.sample([0, 1], pivot_steps=3, dense_steps=cfg.num_dense, dense_diffusion_steps=2,
                             pivot_diffusion_steps=2, seed=0, trajectory=True)
    assert [f["phase"] for f in frames] == ["pivot"] * 3 + ["dense"] * cfg.num_dense
    for phase, n in (("pivot", cfg.num_pivots), ("dense", cfg.num_dense)):
        masks = [torch.ones(2, n, dtype=torch.bool)] + [f["mask"].flatten(1) for f in frames if f["phase"] == phase]
        revealed = [f["revealed"].flatten(1) for f in frames if f["phase"] == phase]
        for before, after, now in zip(masks, masks[1:], revealed):
            assert not (after & ~before).any()  # a revealed token never becomes masked again
            assert ((before & ~after).sum(1) >= 1).all()  # each step reveals at least one
            assert torch.equal(now, before & ~after)  # the frame says which
        assert not masks[-1].any()


# --- diffusion --------------------------------------------------------------------------------------


def test_diffusion_sampler_with_the_exact_denoiser_returns_a_point_mass():
    diffusion = himar.Diffusion(1000)
    target = torch.tensor([0.5, -0.25, 0.0])

    def eps(x, t):  # the exact noise for data that is always `target`
        abar = diffusion.alpha_bar[t].float()[:, None]
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()

    for sampler in himar.SAMPLERS:
        out = diffusion.sample(eps, torch.randn(64, 3), steps=10, sampler=sampler,
                               generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, target.expand(64, 3), atol=1e-4), sampler


@pytest.mark.parametrize("steps", [250, 1000])
def test_diffusion_sampler_with_the_exact_denoiser_returns_a_gaussian(steps):
    diffusion = himar.Diffusion(1000)
    mean, std = 0.3, 0.2

    def eps(x, t):  # E[eps | x_t] when x_0 ~ N(mean, std^2)
        abar = diffusion.alpha_bar[t].float()[:, None]
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std**2 + 1 - abar)

    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    out = diffusion.sample(eps, noise, steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(mean, abs=0.01)
    assert out.std().item() == pytest.approx(std, rel=0.05)
    # DDIM follows the probability-flow ODE: the same distribution, deterministically from the starting noise
    ddim = diffusion.sample(eps, noise, steps=steps, sampler="ddim")
    assert ddim.mean().item() == pytest.approx(mean, abs=0.01) and ddim.std().item() == pytest.approx(std, rel=0.05)
    other_seed = diffusion.sample(eps, noise, steps=steps, sampler="ddim", generator=torch.Generator().manual_seed(9))
    assert torch.equal(ddim, other_seed)  # no draws of its own
    # a temperature below 1 narrows DDPM's distribution
    cold = diffusion.sample(eps, noise, steps=steps, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert cold.std().item() < 0.9 * out.std().item()
    # with few steps, DDPM's posterior variance narrows the result (like a lower temperature)
    few = diffusion.sample(eps, noise, steps=25, generator=torch.Generator().manual_seed(0))
    assert few.mean().item() == pytest.approx(mean, abs=0.01) and few.std().item() < 0.9 * std


def test_the_diffusion_table_moves_with_the_model_and_stays_out_of_checkpoints():
    """Training looks abar_t up on the model's device. A table that stayed on the CPU was copied to the GPU inside the
    first compiled training step, so the second step no longer matched what had been traced and the whole step was
    compiled again (53 s on an H200, REPORT.md). Its sampler scalars are the same values as floats."""
    model = himar.HiMAR(himar.preset("tiny"))
    keys = set(model.state_dict())
    assert model.pivot_head.diffusion is model.dense_head.diffusion  # one process, shared by the two heads
    diffusion = model.dense_head.diffusion
    assert diffusion.alpha_bar_values == diffusion.alpha_bar.tolist() and len(diffusion.alpha_bar_values) == 1000
    model.to("meta")
    assert diffusion.alpha_bar.device.type == "meta"
    assert not any("alpha_bar" in key for key in keys)  # checkpoints keep the same keys


def test_diffusion_loss_is_small_for_the_exact_denoiser():
    diffusion = himar.Diffusion(1000)
    target = torch.tensor([0.5, -0.25])

    def head(x_t, t, z):
        abar = diffusion.alpha_bar[t].float()[:, None, None]
        return (x_t - abar.sqrt() * target) / (1 - abar).sqrt()

    exact = diffusion.loss(head, target.expand(256, 1, 2).clone(), None).mean()
    wrong = diffusion.loss(lambda x, t, z: torch.zeros_like(x), target.expand(256, 1, 2).clone(), None).mean()
    assert exact.item() < 1e-6 and wrong.item() > 0.5


# --- heads ------------------------------------------------------------------------------------------


def small_head(kind, repeats=1):
    torch.manual_seed(0)
    diffusion = himar.Diffusion(1000)
    if kind == "dit":
        return himar.DiTHead(token_dim=12, z_dim=16, width=32, depth=2, num_heads=2, mlp_ratio=2.0, num_tokens=8,
                             repeats=repeats, diffusion=diffusion)
    return himar.MLPHead(token_dim=12, z_dim=16, width=32, depth=2, repeats=repeats, diffusion=diffusion)


@pytest.mark.parametrize("kind", ["mlp", "dit"])
def test_only_the_dit_head_mixes_information_across_tokens(kind):
    head = randomize(small_head(kind)).eval()
    heads = kind == "dit"
    x, t, z = torch.randn(1, 8, 12), torch.tensor([300]), torch.randn(1, 8, 16)
    z2 = z.clone()
    z2[0, 3] += 1.0  # change the condition of token 3 only
    moved = (head(x, t, z2) - head(x, t, z)).abs().amax(-1)[0]  # [8]: how much each token's output moved
    assert moved[3] > 1e-3
    others = torch.cat([moved[:3], moved[4:]])
    if heads:
        assert (others > 1e-4).all()  # DiT head: every token sees token 3 through attention
    else:
        assert (others == 0).all()  # MLP head: each token alone


def test_dit_head_loss_counts_only_the_masked_tokens():
    head = randomize(small_head("dit", repeats=2), std=0.1)
    tokens, z = torch.randn(3, 8, 12), torch.randn(3, 8, 16)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :5] = True

    def loss_with_offset(where):  # the loss after the head's predictions move by 5 at `where` [3, 8]
        original = type(head).forward
        head.forward = lambda x, t, z: original(head, x, t, z) + 5.0 * where.repeat(2, 1)[..., None]
        torch.manual_seed(0)
        loss = head.loss(tokens, z, mask)
        del head.forward
        return loss

    base = loss_with_offset(torch.zeros(3, 8, dtype=torch.bool))
    assert loss_with_offset(~mask) == base  # the visible tokens' predictions do not count
    assert loss_with_offset(mask) > base + 1  # the masked ones do


def test_dit_head_loss_averages_the_masked_errors_over_the_whole_map():
    # as the reference: an image's loss is r x (the mean over its masked tokens), r its masked fraction
    head = randomize(small_head("dit", repeats=2), std=0.1)
    tokens, z = torch.randn(3, 8, 12), torch.randn(3, 8, 16)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :2] = True  # a quarter of every image masked
    torch.manual_seed(0)
    per_token = head.diffusion.loss(head, tokens.repeat(2, 1, 1), z.repeat(2, 1, 1))  # [6, 8]
    torch.manual_seed(0)
    loss = head.loss(tokens, z, mask)
    masked_only = per_token[mask.repeat(2, 1)].mean()
    assert masked_only > 0.1
    assert torch.isclose(loss, 0.25 * masked_only, rtol=1e-4)  # not masked_only: 4x as large


def test_mlp_head_loss_counts_only_the_masked_tokens():
    head = randomize(small_head("mlp", repeats=3), std=0.1)
    tokens, z = torch.randn(2, 8, 12), torch.randn(2, 8, 16)
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    torch.manual_seed(0)
    base = head.loss(tokens, z, mask)
    torch.manual_seed(0)
    assert head.loss(torch.where(mask[..., None], tokens, tokens + 3.0), z, mask) == base


def ddim_spread(std, steps, spacing="uniform"):
    """Gaussian tokens of standard deviation `std`, sampled by DDIM with the exact noise prediction: the spread of
    the samples as a fraction of std (1: the sampler keeps the distribution's width)."""
    diffusion = himar.Diffusion(1000)

    def exact_eps(x, t):
        abar = diffusion.alpha_bar[t[0]].item()
        return math.sqrt(1 - abar) * x / (abar * std**2 + 1 - abar)

    noise = torch.randn(20000, 1, 1, generator=torch.Generator().manual_seed(0))
    return diffusion.sample(exact_eps, noise, steps, "ddim", spacing=spacing).std().item() / std


def test_ddim_with_few_steps_narrows_the_distribution_like_a_lower_temperature():
    # Gaussian tokens of std 0.3: 25 DDIM steps give about 0.91 of the true spread (the README's table of
    # differences), 200 steps almost all of it
    assert 0.86 < ddim_spread(0.3, 25) < 0.95 and ddim_spread(0.3, 200) > 0.97


def test_quadratic_spacing_keeps_the_fine_detail_that_25_evenly_spaced_ddim_steps_lose():
    # Fine detail: Gaussian tokens of std 0.1. Such a token is decided at low noise (abar_t ~ 0.99, t < 100 of 1000),
    # where 25 evenly spaced steps put three steps; the quadratic spacing puts eight there and keeps most of the
    # spread (README, differences from the reference)
    spread = {spacing: ddim_spread(0.1, 25, spacing) for spacing in himar.SPACINGS}
    assert spread["uniform"] < 0.82 and spread["quadratic"] > 0.88
    diffusion = himar.Diffusion(1000)
    low_noise = {spacing: sum(t < 100 for t in diffusion.timesteps(25, spacing)) for spacing in himar.SPACINGS}
    assert low_noise == {"uniform": 3, "quadratic": 8}


def test_each_phase_samples_with_its_own_spacing():
    model = tiny()
    asked, timesteps = [], model.pivot_head.diffusion.timesteps

    def spy(steps, spacing="uniform"):
        asked.append(spacing)
        return timesteps(steps, spacing)

    model.pivot_head.diffusion.timesteps = spy  # the one Diffusion both heads share
    model.sample([0, 1], pivot_steps=3, dense_steps=2, pivot_spacing="quadratic", seed=0)
    assert asked == ["quadratic"] * 3 + ["uniform"] * 2


def test_quadratic_spacing_is_denser_at_low_noise_and_never_repeats_a_step():
    diffusion = himar.Diffusion(1000)
    for steps in (2, 7, 25, 45, 200, 1000):
        ts = diffusion.timesteps(steps, "quadratic")
        assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))  # strictly falling
        assert len(ts) == steps if steps <= 45 else len(ts) < steps  # past ~sqrt(2T), neighbours near 0 coincide
    gaps = [a - b for a, b in zip(diffusion.timesteps(25, "quadratic"), diffusion.timesteps(25, "quadratic")[1:])]
    assert gaps == sorted(gaps, reverse=True)  # the steps shorten towards t = 0


def test_sampler_timesteps_run_from_the_noisiest_level_down_to_zero():
    diffusion = himar.Diffusion(1000)
    assert diffusion.timesteps(50)[0] == 999 and diffusion.timesteps(50)[-1] == 0
    assert diffusion.timesteps(100)[:3] == [999, 989, 979] and len(set(diffusion.timesteps(100))) == 100
    seen = []

    def eps(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    for sampler in himar.SAMPLERS:
        for spacing in himar.SPACINGS:
            seen.clear()
            diffusion.sample(eps, torch.randn(2, 4, 3), steps=7, sampler=sampler, spacing=spacing)
            assert seen == diffusion.timesteps(7, spacing) and seen[-1] == 0
    assert diffusion.timesteps(7, "quadratic") != diffusion.timesteps(7)


@pytest.mark.parametrize("sampler", himar.SAMPLERS)
def test_known_tokens_enter_every_denoising_step_at_its_noise_level_and_come_out_as_given(sampler):
    diffusion = himar.Diffusion(1000)
    g = torch.Generator().manual_seed(0)
    known, noise = torch.rand(2, 6, 3, generator=g) * 2 - 1, torch.randn(2, 6, 3, generator=g)
    keep = torch.tensor([[True, False, True, False, False, True]] * 2)
    calls = []

    def eps(x, t):  # a spy: what the denoiser sees at the known positions
        abar = diffusion.alpha_bar[t[0]].float()
        expected = abar.sqrt() * known + (1 - abar).sqrt() * noise
        calls.append(torch.allclose(x[keep], expected[keep], atol=1e-6))
        return torch.randn(x.shape, generator=g)  # a poor denoiser: the rest comes out anything

    out = diffusion.sample(eps, noise, steps=8, sampler=sampler, generator=g, known=known, keep=keep)
    assert calls == [True] * 8
    assert torch.equal(out[keep], known[keep]) and differ(out[~keep], known[~keep]) > 0.1


def test_dit_head_keeps_the_revealed_tokens_and_fills_the_masked_ones():
    head = randomize(small_head("dit"), std=0.1).eval()
    tokens = torch.rand(2, 8, 12) * 2 - 1
    mask = torch.tensor([[True, True, False, False, True, False, True, True]] * 2)
    reveal = mask & torch.tensor([True, False, False, False, True, False, False, False])
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0][:, ~mask[0]].clone()))
    denoising = himar.Denoising(5, "ddim", "uniform", 1.0)
    out = head.sample(tokens, mask, reveal, torch.randn(2, 8, 16), None, 1.0, denoising, None)
    assert torch.equal(out[~mask], tokens[~mask]) and differ(out[mask], tokens[mask]) > 0.1
    # the revealed tokens were shown to the head at each denoising step, noised less and less
    gaps = [(x - tokens[:, ~mask[0]]).abs().mean().item() for x in seen]
    assert len(seen) == 5 and gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.05


def test_guidance_scales_are_set_per_phase():
    model = randomize(tiny(), std=0.05)
    scales = {"pivot": [], "dense": []}
    for name in scales:
        head = getattr(model, f"{name}_head")
        original = head.denoise
        head.denoise = lambda *args, _name=name, _original=original, **kw: (scales[_name].append(args[2]),
                                                                            _original(*args, **kw))[1]
    model.sample([1, 2], pivot_cfg=4.0, dense_cfg=2.0, pivot_steps=4, dense_steps=2, seed=0)
    for name, given in scales.items():  # one scale per image (or token); here every image has the same at each step
        assert all(len(s.unique()) == 1 for s in given)
        scales[name] = [s.flatten()[0].item() for s in given]
    assert scales["pivot"][-1] == pytest.approx(4.0) and scales["dense"][-1] == pytest.approx(2.0)
    assert scales["pivot"] == sorted(scales["pivot"]) and scales["pivot"][0] < 4.0  # rising linearly
    defaults = himar.Sampling()
    assert defaults.pivot_cfg >= defaults.dense_cfg  # the reference: the pivot scale at least the dense one


def test_a_learned_diffusion_position_embedding_is_added_to_z():
    model = tiny()
    cfg = model.cfg
    assert model.diffusion_pos_dense.abs().sum() > 0 and model.diffusion_pos_pivot.abs().sum() > 0  # N(0, 0.02)
    pivots = torch.randn(2, cfg.num_pivots, cfg.token_dim)
    mask = torch.zeros(2, cfg.num_pivots, dtype=torch.bool)
    before = model.transformer(PIVOT, torch.tensor([1, 2]), pivots, mask)
    with torch.no_grad():
        model.diffusion_pos_pivot[0, 3] += 1.0
    after = model.transformer(PIVOT, torch.tensor([1, 2]), pivots, mask)
    assert torch.allclose((after - before)[:, 3], torch.ones(2, cfg.width), atol=1e-6)
    assert torch.allclose((after - before)[:, :3], torch.zeros(2, 3, cfg.width), atol=1e-6)


def test_sampling_settings_are_checked_in_one_place():
    with pytest.raises(ValueError, match="samplers"):
        himar.Sampling(dense_sampler="euler")
    with pytest.raises(ValueError, match="pivot_spacing.*spacings"):
        himar.Sampling(pivot_spacing="log")
    with pytest.raises(ValueError, match="temperature"):
        himar.Sampling(temperature=0)
    with pytest.raises(ValueError, match="number of tokens"):
        tiny().sample([0], pivot_steps=17)
    with pytest.raises(ValueError, match="diffusion steps"):
        tiny().sample([0], dense_diffusion_steps=1001)
    assert preset("tiny", dense_steps=3).sampling.dense_steps == 3  # sampling fields change by name


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "himar_cifar10.pt")


def test_the_shipped_checkpoint_is_the_cifar10_preset_and_samples():
    model = checkpoints.load_model(SHIPPED)
    assert model.cfg == preset("cifar10")  # sizes, training choices and default sampling as `python train.py` has them
    assert model.diffusion_pos_dense.abs().sum() > 0  # trained, not zeros
    x = model.sample([3, 8], pivot_steps=2, pivot_diffusion_steps=3, dense_diffusion_steps=3, seed=0)
    assert x.shape == (2, 3, 32, 32) and x.std() > 0.1


def test_the_shipped_checkpoint_samples_the_images_it_sampled_when_it_was_shipped():
    """checkpoints/himar_cifar10_reference.npz holds images the shipped model sampled (its labels, seed and settings
    are in the file). The code may be rearranged, never what it generates. Another CPU rounds a few values
    differently (AVX2 against plain kernels: at most 1 of 255 in 0.4% of the pixels), so the margins are loose, and
    far below what any change to the sampling does. After re-shipping the model, write the file again:
    np.savez_compressed(PATH, images=pictures.to_uint8(model.sample(labels, seed=seed, **settings)), labels=labels,
    seed=seed, settings=json.dumps(settings))."""
    import json

    reference = np.load(SHIPPED.replace(".pt", "_reference.npz"))
    model = checkpoints.load_model(SHIPPED)
    images = model.sample(reference["labels"].tolist(), seed=int(reference["seed"]),
                          **json.loads(str(reference["settings"])))
    difference = np.abs(pictures.to_uint8(images).astype(int) - reference["images"].astype(int))
    assert difference.mean() < 0.5 and (difference > 16).mean() < 0.001, (difference.mean(), difference.max())


def test_a_checkpoint_with_the_mask_token_as_it_was_loads_it_as_a_vector(tmp_path):
    # checkpoints written before the mask token became a vector [W] (the previously shipped model's too)
    # hold it as [1, 1, W]
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.randn(1, 1, model.cfg.width)
    path = str(tmp_path / "old.pt")
    checkpoints.save_checkpoint(path, himar.to_checkpoint(model.cfg, ema=state))
    loaded = checkpoints.load_model(path)
    assert loaded.mask_token.shape == (model.cfg.width,)
    assert torch.equal(loaded.mask_token.detach(), state["mask_token"].reshape(-1))


def test_a_checkpoint_written_before_the_spacings_samples_as_it_did_with_even_steps(tmp_path):
    cfg = preset("tiny", pivot_spacing="quadratic")
    checkpoint = himar.to_checkpoint(cfg, ema=tiny().state_dict())
    checkpoints.save_checkpoint(tmp_path / "now.pt", checkpoint)
    assert checkpoints.load_model(tmp_path / "now.pt").cfg.sampling.pivot_spacing == "quadratic"  # as saved
    for name in ("pivot_spacing", "dense_spacing"):
        del checkpoint["config"]["sampling"][name]  # as written before the fields existed
    checkpoints.save_checkpoint(tmp_path / "old.pt", checkpoint)
    sampling = checkpoints.load_model(tmp_path / "old.pt").cfg.sampling
    assert (sampling.pivot_spacing, sampling.dense_spacing) == ("uniform", "uniform")
    assert himar.Sampling().pivot_spacing == "quadratic"  # not the class default, which changed


def test_a_checkpoint_of_the_first_layout_is_refused_with_what_to_do(tmp_path):
    config = {k: v for k, v in asdict(preset("tiny")).items() if k not in ("sampling", "num_heads")}
    config.update(heads=2, pivot_steps=4)  # the first layout: `heads`, sampling fields loose in the config
    checkpoints.save_checkpoint(tmp_path / "old.pt", {"config": config, "ema": {}, "step": 1})
    with pytest.raises(checkpoints.CheckpointError, match="first version of himar.*git checkout f5f94d6"):
        checkpoints.load_checkpoint(tmp_path / "old.pt")


# --- scale-aware transformer ------------------------------------------------------------------------


def test_scale_aware_block_starts_as_a_plain_pre_ln_block():
    torch.manual_seed(0)
    block = himar.ScaleAwareBlock(32, 4, 4.0, 0.0).eval()
    x, v = torch.randn(2, 5, 32), torch.randn(6 * 32)
    ln = torch.nn.LayerNorm(32, elementwise_affine=False)
    y = x + block.attn(ln(x))
    plain = y + block.ffn(ln(y))
    assert torch.allclose(block(x, v), plain, atol=1e-6)


def test_under_autocast_the_residual_streams_are_bf16_and_the_loss_stays_close():
    """On a GPU, training and sampling run under bf16 autocast, and the residual streams of the transformer and of
    both heads are then kept in bf16 (half the bytes for the elementwise work between the matrix products). Checked
    with the CPU's autocast: every block reads and writes bf16 there and fp32 without it; the loss moves little."""
    model = tiny()
    blocks = [*model.blocks, *model.pivot_head.blocks, *model.dense_head.blocks]
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    x, y = images(), torch.arange(4)
    torch.manual_seed(1)
    full = model(x, y)[0]
    assert set(seen) == {(torch.float32, torch.float32)} and len(seen) == len(blocks) + len(model.blocks)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)  # the same masks, noise and class dropout
        half = model(x, y)[0]
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)} and len(seen) == len(blocks) + len(model.blocks)
    assert half.dtype == torch.float32 and abs(half.item() - full.item()) < 0.05 * full.item()


def test_the_two_phases_get_different_modulation():
    model = tiny()
    block = model.blocks[0]
    with torch.no_grad():
        block.a.normal_(0, 0.5)  # as after some training
    phase_vector = lambda phase: model.scale_mlp(himar.sinusoidal(torch.tensor([phase]), model.cfg.width))[0]
    v1, v2 = phase_vector(PIVOT), phase_vector(DENSE)
    assert not torch.allclose(v1, v2)
    x = torch.randn(2, 5, model.cfg.width)
    assert not torch.allclose(block(x, v1), block(x, v2), atol=1e-4)
    # the ablation without the scale vector has no phase MLP: both phases share one modulation
    assert not hasattr(tiny(scale_vector=False), "scale_mlp")


# --- pivot conditioning -----------------------------------------------------------------------------


def test_phase_two_does_not_send_gradient_into_phase_one():
    model = tiny()
    cfg = model.cfg
    x, labels = images(2), torch.tensor([1, 2])
    pivots, dense = himar.tokenize(x, cfg.patch_size)
    pivot_mask = himar.mask_by_order(himar.random_orders(2, cfg.num_pivots, "cpu"), 12)
    randomize(model.dense_head, std=0.1)  # so that loss2 depends on z_dense at all (its output starts at zero)
    z_pivot = model.transformer(PIVOT, labels, pivots, pivot_mask)
    z_pivot.retain_grad()
    context = model.pivot_context(pivots, z_pivot, pivot_mask, torch.tensor([False, False]))
    dense_mask = himar.mask_by_order(himar.random_orders(2, cfg.num_dense, "cpu"), 40)
    z_dense = model.transformer(DENSE, labels, dense, dense_mask, context)
    loss2 = model.dense_head.loss(dense, z_dense, dense_mask)
    loss2.backward()
    assert z_pivot.grad is None or not z_pivot.grad.any()  # stop-gradient: nothing reaches phase 1's output
    assert model.pivot_condition.weight.grad.abs().sum() > 0  # but the projection into phase 2 learns


def test_pivot_context_uses_conditions_where_predicted_and_the_placeholder_elsewhere():
    model = tiny()
    cfg = model.cfg
    pivots = torch.randn(2, cfg.num_pivots, cfg.token_dim)
    z = torch.randn(2, cfg.num_pivots, cfg.width)
    predicted = torch.zeros(2, cfg.num_pivots, dtype=torch.bool)
    predicted[:, :5] = True
    context = model.pivot_context(pivots, z, predicted, dropped=torch.tensor([False, True]))
    placeholder = model.pivot_placeholder[0]
    # (atol: the projection of 5 rows and of the whole batch round differently in some CPUs' matrix kernels)
    assert torch.allclose(context[0, :5], model.pivot_condition(z[0, :5]), atol=1e-5)
    assert torch.allclose(context[0, 5:], placeholder[5:])  # visible pivots: placeholder
    assert torch.allclose(context[1], placeholder)  # a dropped image: placeholder everywhere
    # the "visual" ablation conditions phase 2 on the pivot tokens themselves
    visual = tiny(pivots="visual", dense_head="mlp")
    context = visual.pivot_context(pivots, z, predicted, dropped=torch.tensor([False, False]))
    assert torch.allclose(context, visual.token_embed(pivots), atol=1e-5)


# --- classifier-free guidance -----------------------------------------------------------------------


def test_cfg_scale_one_equals_the_unguided_path():
    head = in_range(randomize(small_head("dit"), std=0.1), bound=0.25)  # so that guidance cannot hide in a clamp
    z, z_null = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    denoising = himar.Denoising(10, "ddpm", "uniform", 1.0)
    run = lambda z_null, scale: head.denoise(z, z_null, scale, denoising, torch.Generator().manual_seed(3))
    unguided = run(None, 1.0)
    assert torch.allclose(run(z_null, 1.0), unguided, atol=1e-5)
    guided = run(z_null, 3.0)
    assert saturated(guided) < 0.01 and differ(guided, unguided) > 0.01  # guidance moves the (unclamped) samples


def test_labels_are_respected_and_the_null_class_only_where_asked():
    model = tiny()
    null = model.cfg.num_classes
    seen = []
    model.class_embed.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    model.sample([3, 7], pivot_cfg=1.0, dense_cfg=1.0, seed=0)
    assert all(s.tolist() == [3, 7] for s in seen)
    seen.clear()
    model.sample([3, 7], pivot_cfg=2.0, dense_cfg=2.0, seed=0)
    assert all(s.tolist() == [3, 7, null, null] for s in seen)
    # training: the null class replaces a label with probability class_dropout
    seen.clear()
    model.cfg = preset("tiny", class_dropout=0.0)
    model(images(8), torch.arange(8))
    assert all(s.tolist() == list(range(8)) for s in seen)
    seen.clear()
    model.cfg = preset("tiny", class_dropout=1.0)
    model(images(8), torch.arange(8))
    assert all((s == null).all() for s in seen)
    with pytest.raises(ValueError, match="class indices"):
        model.sample([null])


def test_each_phase_draws_its_own_class_dropout():
    model = tiny(class_dropout=0.5)
    null, seen = model.cfg.num_classes, []
    model.class_embed.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    torch.manual_seed(0)
    model(images(64), torch.arange(64) % 10)
    phase1, phase2 = seen  # the labels each phase's transformer pass saw
    assert 10 < (phase1 == null).sum() < 54 and 10 < (phase2 == null).sum() < 54
    assert ((phase1 == null) != (phase2 == null)).sum() > 5  # not one draw shared by both phases
    kept = phase2 != null
    assert (phase2[kept] == torch.arange(64)[kept] % 10).all()


# --- learning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(), dict(pivots="none", dense_head="mlp")], ids=["himar", "mar"])
def test_tiny_model_overfits_one_batch(variant):
    model = tiny(**variant)
    x, labels = images(8), torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(150):
        loss, _ = model(x, labels, pivot_dropout=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


# --- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(), dict(pivots="none", dense_head="mlp"),
                                     dict(pivots="visual", dense_head="mlp", scale_vector=False)],
                         ids=["himar", "mar", "visual-mlp"])
def test_sample_is_reproducible_in_range_and_has_a_trajectory(variant):
    model = unclamped(randomize(tiny(**variant)))
    a = model.sample([0, 1, 2], seed=5)
    b = model.sample([0, 1, 2], seed=5)
    c = model.sample([0, 1, 2], seed=6)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert saturated(a) < 0.05  # (guidance pushes a few of MAR's per-token samples to the ends)
    assert differ(a, c) > 0.01  # another seed, other images
    _, frames = model.sample([0, 1], seed=5, trajectory=True)
    cfg = model.cfg
    expected = (cfg.sampling.pivot_steps if cfg.pivots != "none" else 0) + cfg.sampling.dense_steps
    assert len(frames) == expected
    assert frames[-1]["image"].shape == (2, 3, 32, 32) and not frames[-1]["mask"].any()
    if cfg.pivots != "none":
        assert frames[0]["image"].shape == (2, 3, 16, 16) and frames[0]["mask"].shape == (2, 4, 4)


def test_dropping_pivots_changes_the_dense_phase():
    model = unclamped(randomize(tiny()))
    with_pivots, without = model.sample([1, 2], seed=0), model.sample([1, 2], seed=0, drop_pivots=True)
    assert saturated(with_pivots) < 0.01 and saturated(without) < 0.01  # in range: the pixels show what phase 2 did
    assert differ(with_pivots, without) > 0.01


def test_given_pivots_are_kept_and_phase_two_is_generated_around_them():
    model = unclamped(randomize(tiny()))
    model.pivot_head.sample = None  # phase 1 must not sample: the pivots are given
    given = torch.rand(2, 3, 16, 16) * 2 - 1
    a, frames = model.sample([1, 2], seed=0, pivots=given, trajectory=True)
    pivot_frames = [f for f in frames if f["phase"] == "pivot"]
    assert len(pivot_frames) == model.cfg.sampling.pivot_steps  # the transformer still runs phase 1, step by step
    assert torch.equal(pivot_frames[-1]["image"], given)
    assert saturated(a) < 0.01  # in range: the pixels show what phase 2 did
    assert differ(a, model.sample([1, 2], seed=1, pivots=given)) > 0.01  # phase 2 differs between seeds
    other = torch.rand(2, 3, 16, 16) * 2 - 1  # ... and follows the pivots (through their z_s)
    assert differ(a, model.sample([1, 2], seed=0, pivots=other)) > 0.01


def test_given_pivots_of_the_wrong_kind_are_refused_clearly():
    model = tiny()
    with pytest.raises(ValueError, match=r"pivots must be a float tensor \[B, C, H/2, W/2\] = \[2, 3, 16, 16\]"):
        model.sample([0, 1], pivots=images(2))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        model.sample([0, 1], pivots=images(2, 16) * 2)
    with pytest.raises(ValueError, match="not both"):
        model.sample([0, 1], pivots=images(2, 16), known_images=images(2),
                     known_mask=torch.ones(2, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="no pivot phase"):
        tiny(pivots="none", dense_head="mlp").sample([0], pivots=images(1, 16))


# --- zero-shot editing ------------------------------------------------------------------------------


def edit_masks():
    """Pixel masks [3, 32, 32] aligned to the tiny preset's 4x4 tokens, keeping different amounts per image: the left
    half (8 of 16 pivots), the top quarter (4 pivots), a band no pivot lies wholly inside (0 pivots)."""
    keep = torch.zeros(3, 32, 32, dtype=torch.bool)
    keep[0, :, :16] = True
    keep[1, :8] = True
    keep[2, 4:12, 4:28] = True
    return keep


@pytest.mark.parametrize("variant", [dict(), dict(dense_full_mask=1.0), dict(pivots="none", dense_head="mlp")],
                         ids=["himar", "himar_fully_hidden", "mar"])
def test_editing_keeps_the_known_pixels_exactly_and_generates_the_rest(variant):
    model = unclamped(randomize(tiny(**variant)))
    x, keep = images(3), edit_masks()
    kept = keep[:, None].expand_as(x)  # [3, 3, 32, 32]
    a, frames = model.sample([1, 2, 3], seed=0, known_images=x, known_mask=keep, trajectory=True)
    b = model.sample([1, 2, 3], seed=1, known_images=x, known_mask=keep)
    assert torch.equal(a[kept], x[kept]) and torch.equal(b[kept], x[kept])
    assert saturated(a[~kept]) < 0.01 and differ(a[~kept], b[~kept]) > 0.01  # the rest is generated, differently
    # for another seed
    assert a.min() >= -1 and a.max() <= 1
    # the model never looks at the pixels it is not given
    noise = torch.where(kept, x, torch.randn_like(x))
    assert torch.equal(a, model.sample([1, 2, 3], seed=0, known_images=noise, known_mask=keep))
    # the schedule covers each image's unknown tokens (a different number in each), each revealed exactly once
    dense = [f["mask"].flatten(1) for f in frames if f["phase"] == "dense"]
    unknown = ~himar.whole_patches(keep, model.cfg.patch_size)  # [3, Nd]
    assert len(dense) == model.cfg.sampling.dense_steps and torch.equal(dense[0] & ~unknown, torch.zeros_like(unknown))
    assert not dense[-1].any()


@pytest.mark.parametrize("full", [0.5, 1.0])
def test_phase_two_shows_the_transformer_given_dense_tokens_only_if_it_was_trained_to_see_some(full, monkeypatch):
    # a model trained only on the fully hidden dense map (dense_full_mask = 1) is shown none while editing either: the
    # given tokens reach phase 2 through the head's replacement; one trained on partly hidden maps sees them
    model = tiny(dense_full_mask=full)
    shown, transformer = [], model.transformer

    def spy(phase, labels, tokens, mask, *rest):
        if phase == DENSE:
            shown.append(mask.clone())
        return transformer(phase, labels, tokens, mask, *rest)

    monkeypatch.setattr(model, "transformer", spy)
    keep = edit_masks()
    model.sample([1, 2, 3], seed=0, known_images=images(3), known_mask=keep, dense_steps=2)
    given = himar.whole_patches(keep, model.cfg.patch_size)  # [3, Nd], True = given
    assert len(shown) == 2 and given.any()
    first = shown[0][:3]  # the conditional branch of the first dense step
    assert torch.equal(first, torch.ones_like(first)) if full == 1 else torch.equal(first, ~given)


def test_editing_with_every_pixel_known_returns_the_input_without_running_the_model():
    model = randomize(tiny(), std=0.05)
    calls = record_transformer_calls(model)
    x = images(2)
    out, frames = model.sample([0, 1], seed=0, known_images=x, known_mask=torch.ones(2, 32, 32, dtype=torch.bool),
                               trajectory=True)
    assert torch.equal(out, x) and frames == [] and calls == []


def test_editing_masks_and_images_of_the_wrong_shape_are_refused_clearly():
    model = tiny()
    x, keep = images(2), torch.zeros(2, 32, 32, dtype=torch.bool)
    keep[:, :, :14] = True  # 14 is not a multiple of the 4-pixel tokens
    with pytest.raises(ValueError, match="aligned to whole dense tokens: every 4x4 pixel patch"):
        model.sample([0, 1], known_images=x, known_mask=keep)
    keep[:, :, :16] = True
    with pytest.raises(ValueError,
                       match=r"known_images must be \[B, C, H, W\] = \[2, 3, 32, 32\].*got \[2, 3, 16, 16\]"):
        model.sample([0, 1], known_images=images(2, 16), known_mask=keep)
    with pytest.raises(ValueError, match=r"known_images must be \[B, C, H, W\]"):  # one image per label
        model.sample([0, 1, 2], known_images=x, known_mask=keep)
    with pytest.raises(ValueError, match="known_mask must be a bool tensor"):
        model.sample([0, 1], known_images=x, known_mask=keep.float())
    with pytest.raises(ValueError, match="go together"):
        model.sample([0, 1], known_images=x)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        model.sample([0, 1], known_images=(x + 1) * 127.5, known_mask=keep)


def test_phase_one_starts_from_the_known_pivots_and_phase_two_sees_placeholders_there():
    model = randomize(tiny(), std=0.05)
    cfg = model.cfg
    calls = record_transformer_calls(model)
    revealed = []
    sample_pivots = model.pivot_head.sample
    model.pivot_head.sample = lambda tokens, mask, reveal, *rest: (revealed.append(reveal),
                                                                   sample_pivots(tokens, mask, reveal, *rest))[1]
    x, keep = images(3), edit_masks()
    model.sample([1, 2, 3], seed=0, known_images=x, known_mask=keep, pivot_cfg=1.0, dense_cfg=1.0)
    pivots, dense = himar.tokenize(x, cfg.patch_size)
    pivot_keep = himar.whole_patches(keep, 2 * cfg.patch_size)  # [3, Np]: all 4 dense tokens under the pivot kept
    assert pivot_keep.sum(1).tolist() == [8, 4, 0]
    phase1 = [c for c in calls if c["phase"] == PIVOT]
    assert torch.equal(phase1[0]["mask"], ~pivot_keep)  # the known pivots are revealed from the first step ...
    assert torch.equal(phase1[0]["tokens"][pivot_keep], pivots[pivot_keep])  # ... as the downsampled image's tokens
    assert not any((r & pivot_keep).any() for r in revealed)  # and never sampled again
    assert torch.equal(sum(r.int() for r in revealed), (~pivot_keep).int())  # the others exactly once
    # each image follows the cosine schedule over its own unknown pivots (8, 12 and 16 here)
    unknown = (~pivot_keep).sum(1)
    schedule = himar.reveal_counts(unknown, cfg.sampling.pivot_steps)  # [K, 3]
    assert [c["mask"].sum(1).tolist() for c in phase1] == [unknown.tolist()] + schedule[:-1].tolist()
    # phase 2: the placeholder at the given pivots, conditional tokens from z_s at the predicted ones (as in training)
    phase2 = next(c for c in calls if c["phase"] == DENSE)
    placeholder = model.pivot_placeholder.detach().expand(3, -1, -1)
    assert torch.equal(phase2["context"][pivot_keep], placeholder[pivot_keep])
    assert not torch.isclose(phase2["context"][~pivot_keep], placeholder[~pivot_keep]).all(-1).any()
    dense_keep = himar.whole_patches(keep, cfg.patch_size)
    assert torch.equal(phase2["mask"], ~dense_keep) and torch.equal(phase2["tokens"][dense_keep], dense[dense_keep])


def test_reveal_counts_follow_each_images_schedule_and_stop_when_none_is_left():
    counts = himar.reveal_counts(torch.tensor([16, 3, 0]), 4)  # [K, B]
    assert counts[:, 0].tolist() == himar.reveal_schedule(16, 4)
    assert counts[:, 1].tolist() == [2, 1, 0, 0] and counts[:, 2].tolist() == [0, 0, 0, 0]
    assert himar.reveal_counts(torch.tensor([2, 1]), 4).tolist() == [[1, 0], [0, 0]]  # no step without a token
    assert himar.reveal_counts(torch.tensor([0, 0]), 4).shape == (0, 2)


# --- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model = unclamped(randomize(tiny(depth=3)))
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(path, {"config": himar.asdict(model.cfg), "model": model.state_dict()})
    loaded = checkpoints.load_model(path)
    assert loaded.cfg == model.cfg
    drawn = model.sample([4, 5], seed=1)  # unclamped: a weight lost on the way would show in the pixels
    in_range(loaded.dense_head), in_range(loaded.pivot_head)
    assert saturated(drawn) < 0.01 and torch.equal(loaded.sample([4, 5], seed=1), drawn)


def test_checkpoint_errors_are_clear(tmp_path):
    model = tiny()
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(path, {"config": himar.asdict(model.cfg), "model": model.state_dict()})
    with pytest.raises(checkpoints.CheckpointError, match="another config(.|\n)*depth: checkpoint 2, model 3"):
        checkpoints.load_weights(tiny(depth=3), checkpoints.load_checkpoint(path))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="is not a checkpoint"):
        checkpoints.load_model(text)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match="corrupt or truncated"):
        checkpoints.load_model(corrupt)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint at"):
        checkpoints.load_model(tmp_path / "missing.pt")
    with pytest.raises(checkpoints.CheckpointError, match="is a folder: give the checkpoint file in it"):
        checkpoints.load_model(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(checkpoints.CheckpointError, match="not a Hi-MAR checkpoint"):
        checkpoints.load_model(other)


def test_an_interrupted_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}})

    def crash(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}})
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_config_rejects_impossible_combinations():
    with pytest.raises(ValueError, match="MAR"):
        preset("tiny", pivots="none", dense_head="dit")
    with pytest.raises(ValueError, match="pivots must be"):
        preset("tiny", pivots="lowres")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("cifar100")


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_checkpoint_holding_code_is_refused_without_torchs_advice_to_trust_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": RunsCode()}, path)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load_checkpoint(path)
    assert "holds objects other than tensors" in str(e.value) and "weights_only" not in str(e.value)
