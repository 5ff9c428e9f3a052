"""Does the hierarchy help? The paper's ablation (Table 5) on CIFAR-10, plus a plain DiT, at equal steps.

    python scripts/cifar10_ablation.py run --scorer PATH/score_cifar10.py --data-dir DATA --out runs/ablation
    python scripts/cifar10_ablation.py run ... --variants mar himar dit --seeds 1      # a second seed of three rows
    python scripts/cifar10_ablation.py report runs/ablation --plot figures/cifar10_ablation.png
    python scripts/cifar10_ablation.py grids runs/ablation figures/cifar10_ablation_samples.png

`run` trains every variant (or those named by --variants), for each seed of --seeds, one after the other on the
same GPU, with train.py, the same data, token layout and batch, and the cifar10 recipe's settings: for --steps steps
(by default those that the recipe's Hi-MAR makes in 10 minutes on one H100), with the learning-rate schedule over
them. Each run keeps its checkpoint at the --score-steps fractions of its steps (train.py --keep-at); once it is
done, each kept EMA model samples --num-images images (--num-images-mlp for the variants whose dense tokens an MLP
head draws, slow to sample; the heads compiled on a GPU) at the variant's curve CFG and is scored: the curves,
against steps and against the training minutes the run had taken there (so the same runs also give the equal-time
reading). Then each CFG of --cfgs is tried at the last checkpoint, and --final-images images are sampled with the
best one (lowest fd), timed and scored: the table's numbers. Everything measured is appended to OUT/results.jsonl
as it comes, each row tagged with its variant, seed, budget and GPU; a study run again skips what that file already
holds, and a run cut off mid-training resumes from its checkpoint. `report` turns the file into markdown tables
(the final rows; every curve read at equal steps and at equal time) and a plot; `grids` puts the variants' final
sample grids (seed 0) side by side.

On a host with several GPUs, the rows can run side by side, one `run` per GPU with its own --variants and the same
--out; each appends whole lines to the one results file, and each row's timing is its own GPU's:

    CUDA_VISIBLE_DEVICES=0 python scripts/cifar10_ablation.py run ... --variants mar visual &
    CUDA_VISIBLE_DEVICES=1 python scripts/cifar10_ablation.py run ... --variants conditional conditional_dit &
    CUDA_VISIBLE_DEVICES=2 python scripts/cifar10_ablation.py run ... --variants himar dit &
    wait; python scripts/cifar10_ablation.py report runs/ablation --plot figures/cifar10_ablation.png

With --score-at MINUTES instead of --steps, the study is at equal training time, as it first was: each run trains
in segments that end at those minutes, with a constant learning rate after the warm-up (a run stopped at any time
is then as finished as it will get) and without CUDA graphs, and is scored after each segment.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import pictures  # noqa: E402
import himar  # noqa: E402
import train  # noqa: E402
from sample import compile_heads, positive_int  # noqa: E402
from sampling_sweep import check_scorer, sample_and_score, warmup_images  # noqa: E402


class DiT(nn.Module):
    """The baseline a user would pick instead: a plain class-conditional Diffusion Transformer over all dense
    tokens (the same 2x2-pixel patches). It is himar.DiTHead at the size of the config's transformer (width,
    depth, num_heads), conditioned on the class embedding alone. That condition is the same for every token, so in
    training it is passed as one row per image [B, 1, W] and the adaLN modulations are computed once per image.
    Trained with the same diffusion loss (over every token: nothing is masked), sampled with the same samplers
    and classifier-free guidance (the dense settings of the config's Sampling)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.width)  # the last class is the null class (CFG)
        self.net = himar.DiTHead(cfg.token_dim, cfg.width, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
                                 cfg.num_dense, 1, himar.Diffusion(cfg.diffusion_steps))
        himar.init_weights(self)  # Hi-MAR's initialisation: xavier, adaLN-Zero, small embeddings

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, images, labels, pivot_dropout=0.0):
        """The diffusion loss of one batch (train.py's interface; there are no pivots to drop)."""
        null = torch.full_like(labels, self.cfg.num_classes)
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout, null, labels)
        tokens = himar.patchify(images, self.cfg.patch_size)  # [B, Nd, D]
        loss = self.net.diffusion.loss(self.net, tokens, self.class_embed(labels)[:, None]).mean()
        return loss, {"dense": loss.detach()}

    @torch.no_grad()
    def sample(self, labels, sampling=None, seed=None, **changes):
        """Images [B, C, H, W] in [-1, 1] for class labels [B]: reverse diffusion of all tokens at once, with the
        dense settings of `sampling` (default: the config's) changed by `changes`."""
        cfg = self.cfg
        s = cfg.sampling_with(sampling, **changes).phase(himar.DENSE)
        labels = torch.as_tensor(labels, device=self.class_embed.weight.device).long()
        device = labels.device
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        z = self.class_embed(labels)[:, None]  # [B, 1, W]: one condition for every token
        z_null = self.class_embed(torch.full_like(labels, cfg.num_classes))[:, None]
        was_training = self.training
        self.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            denoising = himar.Denoising(s.diffusion_steps[0], s.sampler, s.spacing, s.temperature)
            tokens = self.net.denoise(z, z_null, s.cfg_scale, denoising, generator, length=cfg.num_dense)
        self.train(was_training)
        return himar.unpatchify(tokens, cfg.patch_size, cfg.channels).clamp(-1, 1)


# name -> (label, --set changes to the cifar10 preset). The MLP heads draw each token on its own, so their dense
# phase reveals the 256 tokens in 64 steps (as MAR does), with as many denoising steps as the pivots' MLP head (an
# MLP head needs many: REPORT.md, first section); the DiT head draws the whole dense map in one step (the cifar10
# default). Every masked row trains phase 2 on the reference's cosine mask ratio, as the paper's chain did (the
# cifar10 preset's fully hidden map came after the study's first rows). The DiT baseline is wider and twice as deep
# as the masked models' transformer (32.8M parameters).
REFERENCE_MASKS = ["dense_full_mask=0"]
MLP_DENSE = [*REFERENCE_MASKS, "dense_head=mlp", "dense_steps=64", "dense_diffusion_steps=200"]
VARIANTS = {
    "mar": ("1. MAR: no pivots, MLP head", ["pivots=none", *MLP_DENSE]),
    "visual": ("2. visual pivots, MLP heads", ["pivots=visual", "scale_vector=false", *MLP_DENSE]),
    "conditional": ("3. conditional pivots, MLP heads", ["scale_vector=false", *MLP_DENSE]),
    "conditional_dit": ("4. conditional pivots, DiT head", [*REFERENCE_MASKS, "scale_vector=false"]),
    "himar": ("5. Hi-MAR: 4 + scale vector", REFERENCE_MASKS),
    "dit": ("plain DiT (baseline)", ["width=384", "depth=12", "num_heads=6"]),
}
EQUAL_STEPS = 7800  # the cifar10 recipe's Hi-MAR on one H100: 3,280 to 3,343 images/s (REPORT.md) x 600 s / 256
DIT_LR = 5e-4  # the DiT baseline is wider and twice as deep: the peak lr of its 20-minute run (REPORT.md, fd 1.87)


def model_class(name):
    return DiT if name == "dit" else himar.HiMAR


# The guidance that each variant's sweep varies: the scale of its MLP-head phases, which want a strong one (10 to
# 30), while a DiT head keeps the preset's dense scale (3); for the plain DiT, its only scale (1.5 to 3).
DEFAULT_CFGS = {"dit": [1.5, 2.0, 3.0]}  # every other variant: MLP_CFGS
MLP_CFGS = [10.0, 20.0, 30.0]


def cfg_setting(name, scale):
    if name == "dit":
        return {"dense_cfg": scale}
    mlp_dense = "dense_head=mlp" in VARIANTS[name][1]
    return {"pivot_cfg": scale, "dense_cfg": scale} if mlp_dense else {"pivot_cfg": scale}


def sweep_scales(name, args):
    """(the scale scored along the training curve, the scales of the final sweep) for a variant."""
    cfgs = args.cfgs or DEFAULT_CFGS.get(name, MLP_CFGS)
    return (args.curve_cfg if args.curve_cfg is not None else cfgs[len(cfgs) // 2]), cfgs


def device_name(device):
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)


def load_ema(name, checkpoint_path, args, into=None):
    """(the EMA model of a checkpoint, the checkpoint). into: the variant's model from an earlier checkpoint of the
    same run, whose weights are replaced (its compiled heads are kept); else a new model, its heads compiled with
    --compile."""
    checkpoint = checkpoints.load_checkpoint(checkpoint_path, args.device)
    model = into or model_class(name)(checkpoints.config_from_checkpoint(checkpoint)).to(args.device)
    checkpoints.load_weights(model, checkpoint, "ema")
    if into is None and args.compile:
        compile_heads(model)
    return model.eval(), checkpoint


def sample_scored(model, num_images, setting, args, keep=None):
    """sample_and_score with the study's batch and warm-up (warmup_images), the row marked compiled or not."""
    warmup = warmup_images(args.batch_size, args.compile)
    return {"compiled": args.compile,
            **sample_and_score(model, num_images, setting, args.scorer, args.batch_size, keep=keep, warmup=warmup)}


def run_variant(name, seed, args, log):
    """Train one variant with one seed, scoring its EMA model along the way (the curve); then the CFG sweep and
    the final score. At equal steps (--steps): one run of --steps steps that keeps its checkpoint at the --score-steps
    fractions, each scored once the run is done; at equal time (--score-at): the run in segments that end at those
    minutes, scored after each."""
    out = os.path.join(args.out, name if seed == 0 else f"{name}_seed{seed}")
    if earlier_row(args, name, seed, "final"):
        print(f"{VARIANTS[name][0]}, seed {seed}: done before (its final row is in {args.out}/results.jsonl)")
        return
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    sets = [x for s in VARIANTS[name][1] for x in ("--set", s)]
    common = ["--data-dir", args.data_dir, "--preset", args.preset, "--out-dir", out, "--device", args.device,
              "--log-every", str(args.log_every), "--sample-every", "100000000", "--seed", str(seed)]
    if args.steps:  # the recipe's schedule (warm-up, cosine decay) over the steps, CUDA graphs as it sets them
        keep = sorted({max(1, round(f * args.steps)) for f in args.score_steps})
        common += ["--max-steps", str(args.steps), "--ckpt-every", "1000", "--keep-at", *map(str, keep)]
    else:  # a constant lr after the warm-up, so that a run stopped at any time is as finished as it will get
        common += ["--max-steps", "100000000", "--lr-schedule", "constant", "--ckpt-every", "100000000",
                   "--no-cuda-graphs"]  # as the equal-time rows in REPORT.md were measured
    common += [*args.train_flags, *sets]
    if name == "dit" and "--lr" not in args.train_flags:
        common += ["--lr", str(DIT_LR)]
    curve_cfg, cfgs = sweep_scales(name, args)
    if args.steps:
        if not os.path.exists(os.path.join(out, f"checkpoint_{args.steps}.pt")):  # (else an earlier study run did)
            train.train(train.parse_args(common + resumed(checkpoint_path)), model_class=model_class(name))
        model, scored = None, []
        for step in keep:
            path = os.path.join(out, f"checkpoint_{step}.pt")
            model, row = curve_point(name, seed, args, path, curve_cfg, log, model)
            scored.append(row)
    else:
        model, scored = None, []
        for minutes in args.score_at:
            args_now = train.parse_args(common + ["--max-minutes", str(minutes)] + resumed(checkpoint_path))
            train.train(args_now, model_class=model_class(name))
            model, row = curve_point(name, seed, args, checkpoint_path, curve_cfg, log, model)
            scored.append(row)
    curve = scored[-1]
    at = {k: v for k, v in curve.items() if k in ATTRIBUTES}
    sweep = {curve_cfg: curve}  # the last curve point is the sweep's entry for curve_cfg
    for scale in cfgs:
        if scale not in sweep:
            sweep[scale] = earlier_row(args, name, seed, "sweep", cfg=scale)
        if sweep[scale] is None:
            sweep[scale] = {**at, "kind": "sweep", "cfg": scale,
                            **sample_scored(model, curve_images(name, args), cfg_setting(name, scale), args)}
            log(sweep[scale])
    best = min(sweep, key=lambda s: sweep[s].get("fd", 0.0))  # without a scorer: the first
    samples = os.path.join(out, "final_samples.npz")
    final = sample_scored(model, args.final_images, cfg_setting(name, best), args, keep=samples)
    log({**at, "kind": "final", "cfg": best, **final})
    save_class_grid(samples, os.path.join(out, "final_grid.png"), model.cfg.num_classes)
    os.remove(samples)


def resumed(checkpoint_path):
    """--resume where a run's checkpoint is (a run cut off goes on from it), else nothing."""
    return ["--resume"] if os.path.exists(checkpoint_path) else []


ATTRIBUTES = ("variant", "seed", "budget", "unit", "step", "minutes", "params", "batch_size", "device")  # of each row


def budget_of(args):
    """The study's budget and its unit: (--steps, "steps") at equal steps, (the last --score-at, "min") at equal
    time."""
    return (args.steps, "steps") if args.steps else (args.score_at[-1], "min")


def earlier_row(args, name, seed, kind, **match):
    """The row of this kind that an earlier run of the study logged for this variant, seed and budget, with the
    values in `match` (e.g. step=...), or None."""
    want = {"variant": name, "seed": seed, "kind": kind, "budget": budget_of(args)[0], **match}
    return next((r for r in read_results(args.out) if all(r.get(k, 0 if k == "seed" else None) == v
                                                          for k, v in want.items())), None)


def curve_point(name, seed, args, path, scale, log, model=None):
    """Score the EMA model of a checkpoint at guidance `scale` (unless an earlier run of the study did): (the model,
    its curve row). model: the run's model from its previous curve point, to load the weights into (see load_ema)."""
    model, checkpoint = load_ema(name, path, args, into=model)
    earlier = earlier_row(args, name, seed, "curve", step=checkpoint["step"])
    if earlier:
        return model, earlier
    budget, unit = budget_of(args)
    row = {"variant": name, "seed": seed, "budget": budget, "unit": unit, "step": checkpoint["step"],
           "minutes": round(checkpoint["train_seconds"] / 60, 3), "params": model.num_params(),
           "batch_size": checkpoint["args"]["batch_size"], "device": device_name(args.device), "kind": "curve",
           "cfg": scale, **sample_scored(model, curve_images(name, args), cfg_setting(name, scale), args)}
    log(row)
    return model, row


def curve_images(name, args):
    """Samples per curve point and per CFG of the sweep: fewer for the variants whose dense tokens an MLP head draws
    (64 generation steps of 200 denoising steps each: about 45 images/s on an H100)."""
    return args.num_images_mlp if "dense_head=mlp" in VARIANTS[name][1] else args.num_images


def save_class_grid(npz_path, png_path, num_classes, per_class=10):
    """The first per_class samples of each class (rows) from an npz of samples."""
    data = np.load(npz_path)
    images, labels = data["arr_0"], data["arr_1"]
    rows = np.concatenate([images[labels == c][:per_class] for c in range(min(10, num_classes))])
    pictures.save_grid(torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 127.5 - 1, per_class, png_path)


def read_results(out):
    """The rows of OUT/results.jsonl (out: the study's folder, or a results file itself)."""
    path = out if os.path.isfile(out) else os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return []
    try:
        rows = [json.loads(line) for line in open(path) if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not a results file of this study (a line is not JSON: {e})") from None
    if not all(isinstance(row, dict) and {"variant", "kind"} <= set(row) for row in rows):
        raise SystemExit(f"error: {path} is not a results file of this study (its rows have no variant and kind)")
    return rows


def at_step(curve, at, key, axis="step"):
    """curve's value of key where its `axis` ("step" or "minutes") is `at`, linear between the two scored points
    around it (None outside)."""
    xs = [r[axis] for r in curve]
    return float(np.interp(at, xs, [r[key] for r in curve])) if xs[0] <= at <= xs[-1] else None


def report(out, plot=None):
    """Markdown tables: the final rows (one per variant, seed and budget); every curve read at equal steps (the step
    count that the slowest run reached) and at equal time (the minutes of the shortest run). With plot: fd and acc
    against training time, and fd against steps, one line per variant and seed (the curve of its largest budget)."""
    rows = read_results(out)
    if not rows:
        raise SystemExit(f"error: no results in {out}: run the study first")
    names = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    lines = ["| variant | seed | parameters | steps (training minutes) | training images/s | best CFG | `fd` | `acc` | "
             "sampling images/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        finals = sorted((r for r in rows if r["variant"] == n and r["kind"] == "final"),
                        key=lambda r: (r["budget"], r.get("seed", 0)))
        if not finals:
            lines.append(f"| {VARIANTS[n][0]} | | (not finished) | | | | | | |")
        for r in finals:
            train_rate = r["step"] * r["batch_size"] / (60 * r["minutes"])
            fd, acc = (f"{r['fd']:.1f}", f"{r['acc']:.2f}") if "fd" in r else ("-", "-")
            lines.append(f"| {VARIANTS[n][0]} | {r.get('seed', 0)} | {r['params'] / 1e6:.1f}M | {r['step']:,} "
                         f"({r['minutes']:.1f} min) | {train_rate:,.0f} | {r['cfg']:g} | {fd} | {acc} | "
                         f"{r['images_per_s']:.0f}{'' if r.get('compiled') else ' (eager)'} |")
    print("\n".join(lines))
    curves = {}  # (variant, seed) -> the scored curve of its largest budget
    for n in names:
        for seed in sorted({r.get("seed", 0) for r in rows if r["variant"] == n}):
            scored = [r for r in rows if r["variant"] == n and r.get("seed", 0) == seed and r["kind"] == "curve"
                      and "fd" in r]
            if scored:
                budget = max(r["budget"] for r in scored)
                curves[n, seed] = sorted((r for r in scored if r["budget"] == budget), key=lambda r: r["step"])
    if not curves:  # unscored runs have no curves
        return
    first = next(iter(curves.values()))[0]  # the curves' GPU, for the captions
    counts = sorted({r["n"] for curve in curves.values() for r in curve})  # samples per curve point
    count = " or ".join(f"{n:,}" for n in counts) + " samples"
    for axis, unit in (("step", "steps"), ("minutes", "training minutes")):
        # every curve read where the shortest one ends (linear between its scored points)
        at = min(curve[-1][axis] for curve in curves.values())
        print(f"\nAt equal {'steps' if axis == 'step' else 'time'}: {at:,.4g} {unit}, read off each curve ({count} "
              f"per point, at its curve CFG; linear between its scored points)\n")
        other = "minutes" if axis == "step" else "step"
        print(f"| variant | seed | {other if other == 'minutes' else 'steps'} there | `fd` | `acc` | samples |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for (n, seed), curve in curves.items():
            read = {k: at_step(curve, at, k, axis) for k in (other, "fd", "acc")}
            if read["fd"] is None:
                print(f"| {VARIANTS[n][0]} | {seed} | (its curve starts after {at:,.4g} {unit}) | | | |")
            else:
                there = f"{read[other]:,.0f}" if other == "step" else f"{read[other]:.1f}"
                print(f"| {VARIANTS[n][0]} | {seed} | {there} | {read['fd']:.1f} | {read['acc']:.2f} | "
                      f"{curve[-1]['n']:,} |")
    if plot:
        plot_curves(curves, plot, f"CIFAR-10 on {first['device']}: EMA samples scored along each run ({count} "
                                  f"per point, at its curve CFG)")


def plot_curves(curves, plot, title):
    """fd and acc against training minutes, fd against steps: a colour per variant, a line style per seed; a run
    of a smaller budget than the largest is drawn thin, a curve scored on fewer samples than the most has hollow
    markers (its fd reads higher: fewer samples, more bias)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    largest = max(curve[0]["budget"] for curve in curves.values())
    most = max(curve[0]["n"] for curve in curves.values())
    colours = {n: f"C{i}" for i, n in enumerate(VARIANTS)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for (n, seed), curve in curves.items():
        small = curve[0]["budget"] < largest
        label = VARIANTS[n][0] + (f", seed {seed}" if seed else "")
        if small:
            label += f" ({curve[0]['budget']:g} {curve[0].get('unit', 'min')})"
        fewer = curve[0]["n"] < most
        if fewer:
            label += f", N = {curve[0]['n']:,}"
        for ax, (x, y) in zip(axes, [("minutes", "fd"), ("minutes", "acc"), ("step", "fd")]):
            ax.plot([r[x] for r in curve], [r[y] for r in curve], marker="o", color=colours[n],
                    mfc="white" if fewer else colours[n], ls=["-", "--", ":"][min(seed, 2)], lw=0.8 if small else 1.5,
                    label=label)
    for ax, (x, y) in zip(axes, [("training minutes", "fd"), ("training minutes", "acc"), ("training steps", "fd")]):
        ax.set_xlabel(x), ax.set_ylabel(y), ax.grid(alpha=0.3, which="both")
    for ax in axes[0], axes[2]:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter()), ax.yaxis.set_minor_formatter(ScalarFormatter())
    fig.suptitle(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    print(f"wrote {plot}")


def grids(out, png, per_class=6):
    """The variants' final class grids (OUT/<variant>/final_grid.png) side by side, per_class columns of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(n, plt.imread(os.path.join(out, n, "final_grid.png"))) for n in VARIANTS
             if os.path.exists(os.path.join(out, n, "final_grid.png"))]
    if not found:
        raise SystemExit(f"error: no {out}/<variant>/final_grid.png: run the study first")
    fig, axes = plt.subplots(1, len(found), figsize=(2.3 * len(found), 3.9), squeeze=False)
    for ax, (n, image) in zip(axes[0], found):
        tile = (image.shape[0] - 2) // 10  # 10 rows (classes) of samples, each with save_grid's 2-pixel gap
        ax.imshow(image[:, :2 + per_class * tile], interpolation="nearest"), ax.axis("off")
        ax.set_title(VARIANTS[n][0], fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, sample and score the variants")
    r.add_argument("--out", default="runs/ablation")
    r.add_argument("--data-dir", default="./data", help="the folder that holds cifar-10-batches-py/")
    r.add_argument("--scorer", help="path of score_cifar10.py (without it, samples are timed but not scored)")
    r.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--steps", type=positive_int,
                   help="equal steps (the default): train each run this long, with the recipe's "
                   f"schedule over them (default {EQUAL_STEPS:,}, what the recipe's Hi-MAR makes in 10 minutes on one "
                   "H100)")
    r.add_argument("--score-steps", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="at equal steps: the fractions of --steps at which each run's EMA model is scored")
    r.add_argument("--score-at", type=float, nargs="+",
                   help="equal time instead: training minutes after which to score; the last is each run's budget")
    r.add_argument("--seeds", type=int, nargs="+", default=[0], help="a run of each variant for each seed")
    r.add_argument("--num-images", type=positive_int, default=2000,
                   help="samples per curve point and per CFG of the sweep")
    r.add_argument("--num-images-mlp", type=positive_int,
                   help="the same for the variants whose dense tokens an MLP head draws, slow to sample (default: "
                        "--num-images)")
    r.add_argument("--final-images", type=positive_int, default=10000,
                   help="samples for the final score, with the best CFG")
    r.add_argument("--curve-cfg", type=float, help="the CFG of the curve points (default: the middle of the sweep's)")
    r.add_argument("--cfgs", type=float, nargs="+",
                   help="the CFG sweep at the end, for every variant (default: 1.5 2 3 for the DiT, 10 20 30 for the "
                        "MLP-head phases of the others; see cfg_setting)")
    r.add_argument("--batch-size", type=positive_int, default=1000, help="sampling batch")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the heads for sampling (default: on a GPU; Hi-MAR's 10,000 images on an H200 "
                        "in 27 s instead of 48, the same scores: REPORT.md)")
    r.add_argument("--preset", default="cifar10", choices=list(himar.PRESETS))
    r.add_argument("--log-every", type=int, default=50, help="train.py's --log-every; a segment ends at one of these")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                   help="anything after this goes to train.py as is (e.g. --dataset folder --batch-size 8)")
    rep = sub.add_parser("report", help="the table (markdown) and the plot from OUT/results.jsonl")
    rep.add_argument("out", help="the study's --out folder, or a results .jsonl file")
    rep.add_argument("--plot", help="PNG path for the curves")
    g = sub.add_parser("grids", help="the variants' final sample grids side by side in one PNG")
    g.add_argument("out", help="the study's --out folder")
    g.add_argument("png")
    args = p.parse_args(argv)
    if args.command == "run":
        if args.score_at and args.steps:
            p.error("give --steps (equal steps) or --score-at (equal time), not both")
        if args.score_at and (args.score_at != sorted(args.score_at) or args.score_at[0] <= 0):
            p.error("--score-at must be positive minutes in increasing order")
        if not args.score_at:
            args.steps = args.steps or EQUAL_STEPS
            if not all(0 < f <= 1 for f in args.score_steps):
                p.error("--score-steps are fractions of --steps, in (0, 1]")
            args.score_steps = sorted({*args.score_steps, 1.0})  # the last point is the run's end
        args.num_images_mlp = args.num_images_mlp or args.num_images
        if args.compile is None:
            args.compile = args.device.startswith("cuda")
        check_scorer(args.scorer)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            p.error(f"--out {args.out} is a file: give the study's folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == "report":
        return report(args.out, args.plot)
    if args.command == "grids":
        return grids(args.out, args.png)
    os.makedirs(args.out, exist_ok=True)

    def log(row):
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    failed = []
    for seed in args.seeds:
        for name in args.variants:
            try:
                run_variant(name, seed, args, log)
            except (SystemExit, train.TrainingStopped) as e:  # a run that fails (e.g. its loss diverges) is reported
                log({"variant": name, "seed": seed, "kind": "failed", "error": str(e)})
                failed.append(f"{name} seed {seed}")
    report(args.out)
    if failed:  # (the others ran on)
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; their errors are in "
                         f"{args.out}/results.jsonl")


if __name__ == "__main__":
    main()
