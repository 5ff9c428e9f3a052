"""Tests of himar.py: each checks one behaviour of the method and fails if it breaks. CPU, tiny configs."""

import math

import pytest
import torch

import himar
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


def test_truncated_normal_ratio_stays_in_range():
    cfg = preset("tiny")
    torch.manual_seed(0)
    ratios = torch.tensor([himar.truncated_normal_ratio(cfg) for _ in range(3000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    # a normal centred at 1 cut to [0.7, 1]: more mass near 1 than near 0.7
    assert (ratios > 0.85).float().mean() > 0.55
    assert torch.tensor([himar.cosine_ratio() for _ in range(3000)]).min() < 0.1  # phase 2 goes low


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
    monkeypatch.setattr(himar, "truncated_normal_ratio", lambda cfg: 0.8)
    monkeypatch.setattr(himar, "cosine_ratio", lambda: 0.3)
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


def test_mar_baseline_is_one_phase_over_dense_tokens(monkeypatch):
    model = tiny(pivots="none", dense_head="mlp")
    monkeypatch.setattr(himar, "truncated_normal_ratio", lambda cfg: 0.75)
    calls = record_transformer_calls(model)
    loss, parts = model(images(2), torch.arange(2))
    assert [c["phase"] for c in calls] == [DENSE] and calls[0]["context"] is None
    assert (calls[0]["mask"].sum(1) == math.ceil(0.75 * model.cfg.num_dense)).all()
    assert set(parts) == {"dense"} and not hasattr(model, "pivot_head")


def test_pivot_dropout_schedule_falls_from_start_to_end():
    cfg = preset("tiny", pivot_dropout_start=1.0, pivot_dropout_end=0.25, pivot_dropout_warmup=100)
    values = [himar.pivot_dropout_at(cfg, s) for s in (0, 50, 100, 1000)]
    assert values == pytest.approx([1.0, 0.625, 0.25, 0.25])


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
        for before, after in zip(masks, masks[1:]):
            assert not (after & ~before).any()  # a revealed token never becomes masked again
            assert ((before & ~after).sum(1) >= 1).all()  # each step reveals at least one
        assert not masks[-1].any()


# --- diffusion --------------------------------------------------------------------------------------


def test_diffusion_sampler_with_the_exact_denoiser_returns_a_point_mass():
    diffusion = himar.Diffusion(1000)
    target = torch.tensor([0.5, -0.25, 0.0])

    def eps(x, t):  # the exact noise for data that is always `target`
        abar = diffusion.alpha_bar[t].float()[:, None]
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()

    out = diffusion.sample(eps, (64, 3), steps=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand(64, 3), atol=1e-4)


@pytest.mark.parametrize("steps", [250, 1000])
def test_diffusion_sampler_with_the_exact_denoiser_returns_a_gaussian(steps):
    diffusion = himar.Diffusion(1000)
    mean, std = 0.3, 0.2

    def eps(x, t):  # E[eps | x_t] when x_0 ~ N(mean, std^2)
        abar = diffusion.alpha_bar[t].float()[:, None]
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * std**2 + 1 - abar)

    out = diffusion.sample(eps, (20000, 2), steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(mean, abs=0.01)
    assert out.std().item() == pytest.approx(std, rel=0.05)
    # a temperature below 1 narrows the distribution
    cold = diffusion.sample(eps, (20000, 2), steps=steps, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert cold.std().item() < 0.9 * out.std().item()
    # with few steps, DDPM's posterior variance narrows the result (like a lower temperature): 0.16 at 25 steps
    few = diffusion.sample(eps, (20000, 2), steps=25, generator=torch.Generator().manual_seed(0))
    assert few.mean().item() == pytest.approx(mean, abs=0.01) and few.std().item() < 0.9 * std


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


@pytest.mark.parametrize("heads", [0, 2])
def test_only_the_dit_head_mixes_information_across_tokens(heads):
    torch.manual_seed(0)
    head = randomize(himar.DiffusionHead(token_dim=12, z_dim=16, width=32, depth=2, heads=heads, num_tokens=8)).eval()
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


# --- scale-aware transformer ------------------------------------------------------------------------


def test_scale_aware_block_starts_as_a_plain_pre_ln_block():
    torch.manual_seed(0)
    block = himar.ScaleAwareBlock(32, 4, 4.0, 0.0).eval()
    x, v = torch.randn(2, 5, 32), torch.randn(6 * 32)
    ln = torch.nn.LayerNorm(32, elementwise_affine=False)
    y = x + block.attn(ln(x))
    plain = y + block.ffn(ln(y))
    assert torch.allclose(block(x, v), plain, atol=1e-6)


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
    loss2 = model.head_loss(model.dense_head, dense, z_dense, dense_mask)
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
    assert torch.allclose(context[0, :5], model.pivot_condition(z[0, :5]))
    assert torch.allclose(context[0, 5:], placeholder[5:])  # visible pivots: placeholder
    assert torch.allclose(context[1], placeholder)  # a dropped image: placeholder everywhere
    # the "visual" ablation conditions phase 2 on the pivot tokens themselves
    visual = tiny(pivots="visual", dense_head="mlp")
    context = visual.pivot_context(pivots, z, predicted, dropped=torch.tensor([False, False]))
    assert torch.allclose(context, visual.token_embed(pivots))


# --- classifier-free guidance -----------------------------------------------------------------------


def test_cfg_scale_one_equals_the_unguided_path():
    model = tiny()
    head = randomize(himar.DiffusionHead(model.cfg.token_dim, 16, 32, 2, heads=2, num_tokens=8), std=0.1)
    z, z_null = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    run = lambda z_null, scale: model.denoise(head, z, z_null, scale, 10, 1.0, torch.Generator().manual_seed(3))
    assert torch.allclose(run(z_null, 1.0), run(None, 1.0), atol=1e-5)
    assert not torch.allclose(run(z_null, 3.0), run(None, 1.0), atol=1e-3)


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
    model = randomize(tiny(**variant), std=0.05)
    a = model.sample([0, 1, 2], seed=5)
    b = model.sample([0, 1, 2], seed=5)
    c = model.sample([0, 1, 2], seed=6)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    _, frames = model.sample([0, 1], seed=5, trajectory=True)
    cfg = model.cfg
    expected = (cfg.pivot_steps if cfg.pivots != "none" else 0) + cfg.dense_steps
    assert len(frames) == expected
    assert frames[-1]["image"].shape == (2, 3, 32, 32) and not frames[-1]["mask"].any()
    if cfg.pivots != "none":
        assert frames[0]["image"].shape == (2, 3, 16, 16) and frames[0]["mask"].shape == (2, 4, 4)


def test_dropping_pivots_changes_the_dense_phase():
    model = randomize(tiny(), std=0.05)
    assert not torch.equal(model.sample([1, 2], seed=0), model.sample([1, 2], seed=0, drop_pivots=True))


# --- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model = randomize(tiny(depth=3), std=0.05)
    path = tmp_path / "ckpt.pt"
    himar.save_checkpoint(path, {"config": himar.asdict(model.cfg), "model": model.state_dict()})
    loaded = himar.model_from_checkpoint(path)
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded.sample([4, 5], seed=1), model.sample([4, 5], seed=1))


def test_checkpoint_errors_are_clear(tmp_path):
    model = tiny()
    path = tmp_path / "ckpt.pt"
    himar.save_checkpoint(path, {"config": himar.asdict(model.cfg), "model": model.state_dict()})
    with pytest.raises(himar.CheckpointError, match="another config(.|\n)*depth: checkpoint 2, model 3"):
        himar.load_weights(tiny(depth=3), himar.load_checkpoint(path))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(himar.CheckpointError, match="corrupt or truncated"):
        himar.model_from_checkpoint(corrupt)
    with pytest.raises(himar.CheckpointError, match="no checkpoint at"):
        himar.model_from_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(himar.CheckpointError, match="not a Hi-MAR checkpoint"):
        himar.model_from_checkpoint(other)


def test_an_interrupted_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    himar.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}})

    def crash(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        himar.save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}})
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_config_rejects_impossible_combinations():
    with pytest.raises(ValueError, match="MAR"):
        preset("tiny", pivots="none", dense_head="dit")
    with pytest.raises(ValueError, match="pivots must be"):
        preset("tiny", pivots="lowres")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("cifar100")
