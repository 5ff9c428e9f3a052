"""How close a head's reverse diffusion comes, in few steps, to the limit it approximates; runs on a CPU.

DDIM is deterministic: from one seed (the same random order, the same starting noise) every number of denoising steps
solves the same ODE, and many steps land on its solution. So the distance of a cheap setting's samples from a
many-step setting's is the setting's own error, with no sampling noise in it, and no GPU or scorer is needed.

    python scripts/sampler_convergence.py --phase dense --images 8 --settings ddim:uniform:400 ddim:quadratic:400 \\
        ddim:uniform:25 ddim:quadratic:25 ddim:uniform:50 ddim:uniform:100
    python scripts/sampler_convergence.py --phase pivot --images 16 --settings ddim:uniform:1000 ...

Each setting is SAMPLER:SPACING:STEPS (himar.SAMPLERS and SPACINGS, and "dpm2m": DPM-Solver++(2M), a second-order
solver written here only, for comparison). The first setting is the reference. --phase pivot generates the pivots
(phase 1, MLP head, the checkpoint's K1 and guidance) with each setting; --phase dense generates phase 1 once with the
checkpoint's defaults and then phase 2 (DiT head, K2 = 1) around those pivots with each setting. Printed per setting:
the mean absolute pixel difference from the reference, the mean difference between neighbouring pixels (sharpness)
and the pixels' standard deviation; --test-images DATA_DIR prints the last two for the CIFAR-10 test images (or, with
--phase pivot, their pivot images).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import himar  # noqa: E402
from pictures import neighbour_difference  # noqa: E402
from sample import check_writable, errors_for_people, positive_int  # noqa: E402
from sampling_sweep import test_images  # noqa: E402


class DPMSolver2M(himar.Diffusion):
    """DPM-Solver++(2M) (Lu et al., 2022): the deterministic solver of the same ODE as DDIM, in the log-SNR
    variable, second order from the previous step's clean estimate (the first and the last step: DDIM's)."""

    def sample(self, eps_fn, noise, steps, sampler="ddim", temperature=1.0, generator=None, known=None, keep=None,
               spacing="uniform"):
        x, timesteps, previous = noise, self.timesteps(steps, spacing), None
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            if known is not None:  # the given tokens by replacement, as in Diffusion.sample
                x = torch.where(keep[..., None], self.q_sample(known, t_batch, noise), x)
            abar = self.alpha_bar_values[t]
            x0 = ((x - math.sqrt(1 - abar) * eps_fn(x, t_batch)) / math.sqrt(abar)).clamp(-1, 1)
            if i + 1 == len(timesteps):
                return x0 if known is None else torch.where(keep[..., None], known, x0)
            abar_next = self.alpha_bar_values[timesteps[i + 1]]
            h = 0.5 * (math.log(abar_next / (1 - abar_next)) - math.log(abar / (1 - abar)))  # log-SNR step
            d = x0 if previous is None else x0 + (x0 - previous[0]) * h / (2 * previous[1])
            x = math.sqrt((1 - abar_next) / (1 - abar)) * x - math.sqrt(abar_next) * math.expm1(-h) * d
            previous = (x0, h)


def parse_setting(text):
    try:
        sampler, spacing, steps = text.split(":")
        steps = int(steps)
    except ValueError:
        raise SystemExit(f"error: --settings {text}: give SAMPLER:SPACING:STEPS, e.g. ddim:quadratic:25")
    if sampler not in himar.SAMPLERS + ("dpm2m",) or spacing not in himar.SPACINGS or steps < 1:
        raise SystemExit(f"error: --settings {text}: the sampler is one of {himar.SAMPLERS + ('dpm2m',)}, the spacing "
                         f"one of {himar.SPACINGS}, the steps at least 1")
    return sampler, spacing, steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="checkpoints/himar_cifar10.pt")
    p.add_argument("--phase", choices=("pivot", "dense"), required=True)
    p.add_argument("--images", type=positive_int, default=8, help="images, classes in turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", nargs="+", required=True, help="SAMPLER:SPACING:STEPS; the first is the reference")
    p.add_argument("--out", help="also append the rows to this JSONL file")
    p.add_argument("--test-images", metavar="DATA_DIR", help="the folder that holds cifar-10-batches-py/")
    args = p.parse_args(argv)
    settings = [parse_setting(text) for text in args.settings]
    if args.out:
        check_writable("out", args.out)
    if args.test_images:
        real = torch.from_numpy(test_images(args.test_images, 10000)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
        real = himar.downsample(real) if args.phase == "pivot" else real
        print(f"the {len(real):,} CIFAR-10 test images{' (pivots)' if args.phase == 'pivot' else ''}: neighbour "
              f"difference {neighbour_difference(real):.4f}, std {real.std().item():.4f}")
    try:
        model = checkpoints.load_model(args.ckpt).float().eval()
    except checkpoints.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    cfg, B = model.cfg, args.images
    if cfg.pivots == "none":
        raise SystemExit(f"error: {args.ckpt} is a MAR model (no pivots): this script follows Hi-MAR's two phases")
    if max(steps for _, _, steps in settings) > cfg.diffusion_steps:
        raise SystemExit(f"error: --settings: at most {cfg.diffusion_steps} steps (the model's diffusion steps)")
    defaults = cfg.sampling
    labels = torch.arange(B) % cfg.num_classes
    known_pivots, pivot_keep, known_dense, dense_keep = himar.known_tokens(cfg, None, None, B, "cpu")
    plain, dpm = model.pivot_head.diffusion, DPMSolver2M(cfg.diffusion_steps)
    reference, rows = None, []
    with torch.no_grad():
        if args.phase == "dense":  # phase 1 once, as HiMAR.sample runs it
            pivots, z_pivot = model.unmask(himar.PIVOT, labels, known_pivots, pivot_keep, defaults.phase(himar.PIVOT),
                                           torch.Generator().manual_seed(args.seed))
            context = model.pivot_context(pivots, z_pivot, ~pivot_keep, torch.zeros(B, dtype=torch.bool))
        for sampler, spacing, steps in settings:
            diffusion = dpm if sampler == "dpm2m" else plain
            model.pivot_head.diffusion = model.dense_head.diffusion = diffusion
            start = time.time()
            phase = defaults.phase(himar.PIVOT if args.phase == "pivot" else himar.DENSE)
            phase = himar.PhaseSampling(phase.steps, phase.cfg_scale, (steps, steps), "ddim" if sampler == "dpm2m"
                                        else sampler, spacing, phase.temperature)
            if args.phase == "pivot":
                tokens, _ = model.unmask(himar.PIVOT, labels, known_pivots, pivot_keep, phase,
                                         torch.Generator().manual_seed(args.seed))
            else:
                tokens, _ = model.unmask(himar.DENSE, labels, known_dense, dense_keep, phase,
                                         torch.Generator().manual_seed(args.seed + 1), pivot_context=context)
            images = himar.unpatchify(tokens, cfg.patch_size, cfg.channels).clamp(-1, 1)
            reference = images if reference is None else reference
            row = {"phase": args.phase, "images": B, "sampler": sampler, "spacing": spacing, "steps": steps,
                   "from_reference": round((images - reference).abs().mean().item(), 4),
                   "neighbour_difference": round(neighbour_difference(images), 4),
                   "std": round(images.std().item(), 4), "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(f"{args.phase} {sampler:5s} {spacing:9s} {steps:4d} steps: {row['from_reference']:.4f} from the "
                  f"first, neighbour difference {row['neighbour_difference']:.4f}, std {row['std']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    with errors_for_people():
        main()
