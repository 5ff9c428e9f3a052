"""Train Hi-MAR on CIFAR-10, ImageNet 64x64 or a folder of images.

    python train.py                                        # CIFAR-10, the cifar10 preset, on the best device
    python train.py --preset tiny --max-steps 50           # a quick CPU check
    python train.py --resume                               # continue runs/cifar10 where it stopped
    torchrun --nproc_per_node=4 train.py                   # several GPUs (DDP)

Everything goes under --out-dir: checkpoint.pt (model, EMA, optimizer, step, config, RNG state) and the one saved
before it, checkpoint.prev.pt; metrics.jsonl and loss.png; and sample grids of the EMA model (one row per class).
"""

import argparse
import copy
import contextlib
import glob
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import fields

import torch
from tqdm import tqdm

import checkpoints
import himar
import pictures
from data import DataError, batch_at, load_dataset

try:
    import fcntl
except ImportError:
    fcntl = None

# How long each preset trains when --max-steps is not given, and its EMA decay (reached at the end of the warm-up).
# micro_batch: images per forward/backward pass on a GPU (None: the whole batch); imagenet64's 512 do not fit at once.
RECIPES = {
    "tiny": dict(steps=200, batch_size=32, lr=1e-3, warmup=20, ema_decay=0.99, micro_batch=None),
    # cifar10: about 20 minutes on one H100 (19.2 to 19.7 minutes of training in three runs on fresh ones, REPORT.md)
    "cifar10": dict(steps=17200, batch_size=256, lr=6e-4, warmup=500, ema_decay=0.999, micro_batch=None),
    # imagenet64: about a day on one H100 (892 images/s measured, REPORT.md): 150,000 x 512 = 60 epochs
    "imagenet64": dict(steps=150000, batch_size=512, lr=4e-4, warmup=5000, ema_decay=0.9999, micro_batch=128),
}


def train(args, model_class=himar.HiMAR):
    """Train model_class(cfg) (Hi-MAR, or another model with the same forward and sample) as args say: the run folder,
    the config and the data, the model with its EMA copy and optimizer (restored when resuming), then the loop."""
    rank, world_size, device = setup_distributed(args)
    with claim_run_folder(args) if rank == 0 else contextlib.nullcontext():  # locked while the run lasts
        args, cfg, checkpoint = run_config(args, main_process=rank == 0)
        data = training_data(args, cfg, rank, world_size, device)
        model, ema, optimizer = build(model_class, cfg, args, device, rank)
        if rank == 0:
            clear_earlier_run(args)
        run = Run(args, cfg, model, ema, optimizer, rank, world_size, device, checkpoint, len(data.labels))
        step_model = model if world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        compile_model(model, args, device)

        # the loop: one optimizer step per batch; the run logs, samples, saves and stops when its flags say so
        for step in run.steps():  # from the checkpoint's step (0 for a new run) to --max-steps
            images, labels = batch_at(data, step, args.batch_size // world_size, args.seed, device, rank, world_size)
            progress = run_progress(args, step, run.seconds)  # 0 to 1: the lr and the pivot dropout follow it
            lr = set_learning_rate(optimizer, learning_rate(args, step, progress))
            pivot_dropout = torch.full((), himar.pivot_dropout_at(cfg, progress), device=device)  # (a fill: no copy)
            with run.out_of_memory_advice(step):
                loss, parts, grad_norm = training_step(step_model, optimizer, images, labels, pivot_dropout,
                                                       args.grad_clip, args.micro_batch)
            update_ema(ema, model, ema_decay_at(args, step))
            run.record(step, lr, loss, parts, grad_norm)
            # every --log-every, --sample-every, --ckpt-every; True at the end of --max-minutes
            if run.log_sample_save():
                break
        run.finish()


# ----- The step: the optimizer's update on one batch, the learning rate, the EMA, compilation -----


def training_step(step_model, optimizer, images, labels, pivot_dropout, grad_clip, micro_batch=None):
    """One optimizer step on a batch (bf16 autocast on a GPU), in micro-batches of at most micro_batch images
    (gradient accumulation): each micro-batch's loss counts by its share of the batch, so their gradients add up to
    the batch's, and the update is the batch's in less memory. (Hi-MAR draws one mask ratio per forward pass, so
    its micro-batches draw several where the whole batch draws one: the same update in expectation.)
    Returns the loss, its parts and the gradient norm before clipping, all still on the device (not synchronised)."""
    size = micro_batch or len(images)
    chunks = list(zip(images.split(size), labels.split(size)))
    optimizer.zero_grad(set_to_none=True)
    loss, parts = 0.0, {}
    for k, (x, y) in enumerate(chunks):
        share = len(x) / len(images)
        # under DDP the gradients are averaged across the GPUs once, in the backward pass of the last micro-batch
        accumulate_only = k < len(chunks) - 1 and hasattr(step_model, "no_sync")
        with step_model.no_sync() if accumulate_only else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
                part, part_parts = step_model(x, y, pivot_dropout=pivot_dropout)
            (part * share).backward()
        loss = loss + part.detach() * share
        parts = {key: parts.get(key, 0.0) + value * share for key, value in part_parts.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(step_model.parameters(), grad_clip)
    optimizer.step()
    return loss, parts, grad_norm


def learning_rate(args, step, progress):
    """Linear warm-up over the first steps, then constant or cosine decay to 10% of the peak by the end of the run;
    progress (0 to 1) is how far through the run this step is (see run_progress)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_learning_rate(optimizer, lr):
    """Give every parameter group the learning rate lr; returns it (for the log)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def run_progress(args, step, seconds):
    """How far through the run (0 to 1) a step is: by steps, or by training time when --max-minutes ends the run
    first. The learning rate's decay and the pivot dropout's schedule follow it."""
    progress = step / args.max_steps
    if args.max_minutes is not None:
        progress = max(progress, seconds / (60 * args.max_minutes))
    return progress


def ema_decay_at(args, step):
    """The EMA decay rises linearly from 0 over the learning-rate warm-up (early weights are soon forgotten), then
    stays at --ema-decay."""
    return args.ema_decay * min(1.0, step / max(1, args.warmup_steps))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, every parameter in one multi-tensor call (a GPU step is bound by
    launching kernels: one per parameter would be 219 for cifar10)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def make_optimizer(model, args):
    """AdamW (0.9, 0.95). Weight decay on the weight matrices of linear layers only: none on embeddings (classes,
    positions, the mask token, the placeholder), norms, biases and the scale-aware blocks' modulation."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay = [p for p in model.parameters() if id(p) in matrices]
    other = [p for p in model.parameters() if id(p) not in matrices]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def build(model_class, cfg, args, device, rank):
    """The model (its initial weights drawn from --seed, and each rank's random numbers from its own seed), its EMA
    copy (the weights that sample) and the optimizer; a clear error if the model does not fit."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed + rank)
    try:
        model = model_class(cfg).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
    except (RuntimeError, MemoryError) as e:
        if not checkpoints.is_out_of_memory(e):
            raise
        raise SystemExit(f"error: the model of this config (width {cfg.width}, depth {cfg.depth}) does not fit in the "
                         f"memory of {device}: check the config (--set, or the run's checkpoint)") from None
    return model, ema, make_optimizer(model, args)


def compile_model(model, args, device):
    """torch.compile the training forward pass whole: both phases and both losses, one graph (the masks' sizes are
    drawn on the device and the pivot dropout comes as a tensor, so no step needs another). --compile is on by
    default on a GPU and off on a CPU; --cuda-graphs, on by default where it works (a compiled GPU run whose steps
    are one pass each), also replays it as CUDA graphs. Sampling stays eager."""
    compiled = args.compile or (args.compile is None and device.type == "cuda")
    graphs = args.cuda_graphs or (args.cuda_graphs is None and compiled and device.type == "cuda"
                                  and not accumulates(args))
    if graphs:  # torch's hint that some calls take a slower, checked path; measured whole, the step is still faster
        warnings.filterwarnings("ignore", message="Unable to hit fast path of CUDAGraphs")
    if compiled:
        model.compile(mode="reduce-overhead" if graphs else None)


# ----- The loop's bookkeeping: logs, saves, sample grids, and the ways a run stops -----


class Run:
    """The loop's bookkeeping, so that the loop reads as the training: the clock and the stop requests (agreed on by
    every rank), the sums of the losses for the log, a flag for any NaN or inf, and what the run writes in --out-dir:
    metrics.jsonl and loss.png, the sample grids of the EMA model, and the checkpoint (checkpoint.prev.pt keeps the
    one before). Nothing non-finite is ever saved, and every way the run can stop says what was saved and what to do."""

    def __init__(self, args, cfg, model, ema, optimizer, rank, world_size, device, checkpoint, num_images):
        self.args, self.cfg, self.model, self.ema, self.optimizer = args, cfg, model, ema, optimizer
        self.num_images = num_images
        self.rank, self.world_size, self.device, self.main = rank, world_size, device, rank == 0
        self.ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
        self.log_path = os.path.join(args.out_dir, "metrics.jsonl")
        self.start_step, self.earlier_seconds = 0, 0.0  # where a resumed run starts, and how long it had trained
        if checkpoint is not None:
            try:
                self.start_step, self.earlier_seconds = restore(checkpoint, model, ema, optimizer, rank, device)
            except (checkpoints.CheckpointError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
                first_line = (str(e).splitlines() or [""])[0]
                raise SystemExit(f"error: cannot resume {self.ckpt_path}: its state does not load ({type(e).__name__}: "
                                 f"{first_line}).{go_back_hint(args.out_dir)}") from None
            if self.main:
                print(f"resuming {self.ckpt_path} at step {self.start_step}")
                if self.start_step >= args.max_steps:
                    print(f"(the run has made its --max-steps {args.max_steps}: nothing to train; give a larger "
                          "--max-steps to train on)")
        self.last_saved = self.start_step if checkpoint is not None else None  # the step that checkpoint.pt holds
        self.done = self.start_step  # steps done
        self.seconds = self.earlier_seconds  # training time of the whole run so far, read at every step
        self.train_seconds = 0.0  # ... of this process, up to the last log
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss or gradient since the last log
        self.sums, self.count = {}, 0
        self.interrupted = self.out_of_time = False

    def steps(self):
        """The steps left, with a progress bar; the clock starts now."""
        args = self.args
        if self.main:
            name = "Hi-MAR" if type(self.model) is himar.HiMAR else type(self.model).__name__  # e.g. the ablation's DiT
            print(f"{name} {args.preset}: {self.model.num_params() / 1e6:.2f}M parameters; "
                  f"{self.num_images} images, batch {args.batch_size} on {self.world_size} x {self.device}")
        self.bar = tqdm(range(self.start_step, args.max_steps), initial=self.start_step, total=args.max_steps,
                        disable=not self.main, desc="training")
        self.timer_start = time.time()
        return self.bar

    @contextlib.contextmanager
    def out_of_memory_advice(self, step):
        """A GPU out of memory stops the run with the flags that fit: fewer images per forward pass."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            args = self.args
            images = args.micro_batch or args.batch_size // self.world_size
            again = f"--micro-batch {max(1, images // 2)}"
            if os.path.exists(self.ckpt_path):
                again = "--resume " + again
            raise TrainingStopped(
                f"the GPU ran out of memory at step {step + 1}, with {images} images per forward pass. Run again with "
                f"fewer ({again}): the update stays that of --batch-size {args.batch_size}, it only takes "
                "longer.") from None

    def record(self, step, lr, loss, parts, grad_norm):
        """Add a step's losses to the log's sums (on the device: no wait for the GPU), note any NaN or inf, and read
        the clock and the stop requests, the same on every rank."""
        self.lr = lr
        self.bad |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        for key, value in {"loss": loss, **parts}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.float()
        self.count += 1
        self.done = step + 1
        seconds = self.earlier_seconds + self.train_seconds + time.time() - self.timer_start
        signalled, self.seconds = largest_on_any_rank([float(stopping.signal is not None), seconds],
                                                      self.device, self.world_size)
        self.interrupted = signalled > 0  # Ctrl-C, SIGTERM or SIGHUP on any rank: finish this step, save, exit
        self.out_of_time = self.args.max_minutes is not None and self.seconds >= 60 * self.args.max_minutes

    def log_sample_save(self):
        """Every --log-every steps a row of metrics.jsonl (and loss.png), every --sample-every a grid, every
        --ckpt-every a checkpoint (and at each --keep-at step, also kept under its own name); all three at the end, at
        a stop request (then Interrupted) and at the end of --max-minutes (then True: the loop ends)."""
        args, done = self.args, self.done
        last = done == args.max_steps or self.interrupted or self.out_of_time
        if not (last or done % args.log_every == 0 or done % args.ckpt_every == 0 or done in args.keep_at):
            return False
        if self.bad.item():  # stop before anything non-finite reaches a checkpoint
            raise TrainingStopped(diverged(f"the loss or its gradient became NaN or inf between step "
                                           f"{done - self.count + 1} and {done}", self.last_saved, args.out_dir))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - self.timer_start
        self.train_seconds += elapsed
        means = {k: (v / self.count).item() for k, v in self.sums.items()}
        row = {"step": done, **means, "lr": self.lr, "images_per_s": self.count * args.batch_size / elapsed,
               "minutes": (self.earlier_seconds + self.train_seconds) / 60}  # training time of the whole run so far
        self.sums, self.count = {}, 0
        try:
            if self.main:
                append_metrics(self.log_path, row)
                plot_losses(self.log_path, os.path.join(args.out_dir, "loss.png"))
                shown = {k: f"{v:.4f}" for k, v in means.items()}
                shown |= {"lr": f"{self.lr:.1e}", "img/s": f"{row['images_per_s']:.0f}"}
                if args.max_minutes:  # the time budget's progress
                    shown["min"] = f"{row['minutes']:.1f}/{args.max_minutes:g}"
                self.bar.set_postfix(shown)
            if done % args.sample_every == 0 or done == args.max_steps or self.out_of_time:
                self.sample_grid()
            if done % args.ckpt_every == 0 or last or done in args.keep_at:
                self.save()
            if done in args.keep_at and self.main:
                with checkpoints.written(os.path.join(args.out_dir, f"checkpoint_{done}.pt")) as tmp:
                    shutil.copyfile(self.ckpt_path, tmp)
        except OSError as e:  # a full disk, a folder gone read-only: the checkpoint it replaced is whole
            raise TrainingStopped(f"could not write in {args.out_dir} after step {done} ({e.strerror or e}): make "
                                  f"room there. {saved_so_far(self.last_saved, self.ckpt_path)}.") from None
        if self.interrupted:
            raise Interrupted(f"{stopping.signal}: stopped after step {done} and saved {self.ckpt_path}; "
                              "continue the run with --resume")
        self.timer_start = time.time()
        if self.out_of_time and self.main:
            minutes = (self.earlier_seconds + self.train_seconds) / 60
            print(f"stopping after {minutes:.2f} minutes of training (--max-minutes)")
        return self.out_of_time

    def save(self):
        """The checkpoint: weights, EMA, optimizer, step, every rank's random state, the run's settings and time."""
        model, ema, step = self.model, self.ema, self.done
        if not all(torch.isfinite(p).all() for p in [*model.parameters(), *ema.parameters()]):
            why = f"the weights became NaN or inf before step {step}"
            raise TrainingStopped(diverged(why, self.last_saved, self.args.out_dir))
        rng = {"cpu": self.gathered(torch.get_rng_state()),
               "cuda": self.gathered(torch.cuda.get_rng_state()) if self.device.type == "cuda" else []}
        if self.main:  # the checkpoint it replaces is kept as checkpoint.prev.pt
            checkpoints.save_checkpoint(self.ckpt_path, himar.to_checkpoint(
                self.cfg, model=model.state_dict(), ema=ema.state_dict(), optimizer=self.optimizer.state_dict(),
                step=step, rng=rng, args=vars(self.args), train_seconds=self.earlier_seconds + self.train_seconds),
                previous=os.path.join(self.args.out_dir, "checkpoint.prev.pt"))
        self.last_saved = step

    def gathered(self, tensor):
        """Every rank's copy of a tensor (for the checkpoint's random states)."""
        if self.world_size == 1:
            return [tensor]
        out = [torch.zeros_like(tensor, device=self.device) for _ in range(self.world_size)]  # NCCL: all on the GPU
        torch.distributed.all_gather(out, tensor.to(self.device))
        return [t.cpu() for t in out]

    def sample_grid(self):
        """8 samples of the EMA model for each of the first 10 classes, one row per class: samples_<step>.png."""
        if self.main:
            labels = torch.arange(min(10, self.cfg.num_classes), device=self.device).repeat_interleave(8)
            try:
                path = os.path.join(self.args.out_dir, f"samples_{self.done:07d}.png")
                pictures.save_grid(self.ema.sample(labels, seed=0), 8, path)
            except pictures.NonFiniteImages as e:
                print(f"warning: no sample grid for step {self.done}: {e} (are the weights diverging? see loss.png)")

    def finish(self):
        if self.main and self.train_seconds > 0:
            took = f"{self.train_seconds / 60:.1f} min" if self.train_seconds >= 60 else f"{self.train_seconds:.1f} s"
            print(f"trained {self.done - self.start_step} steps in {took}: "
                  f"{(self.done - self.start_step) * self.args.batch_size / self.train_seconds:.0f} images/s "
                  "(scripts/benchmark.py: FLOPs and TFLOP/s)")
        if self.world_size > 1:  # every rank at the end before any tears its connections down (gloo can abort else)
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class TrainingStopped(Exception):
    """The run cannot go on (a NaN loss, a checkpoint that does not fit): the message says why and what to do."""


class Interrupted(Exception):
    """Training was asked to stop (Ctrl-C, SIGTERM, SIGHUP) and saved its checkpoint first."""


class StoppedAtOnce(BaseException):
    """A second stop request: training stops where it is, without saving. (A BaseException, as KeyboardInterrupt,
    so that no `except Exception` on the way catches it.)"""


class Stopping:
    """Within `with stopping:`, SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) do not kill training: they
    ask it to finish the step it is in, save a checkpoint and stop. A second request stops at once, without saving."""

    # (Windows has no SIGHUP)
    SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    signal = None

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._request)
        return self

    def _request(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise StoppedAtOnce(name)
        self.signal = name
        with contextlib.suppress(OSError):  # (os.write: print could be in the middle of writing already)
            os.write(2, f"\n{name}: finishing this step, then saving and stopping "
                           "(ask again to stop at once, without saving)\n".encode())

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


stopping = Stopping()


def largest_on_any_rank(values, device, world_size):
    """Each of the numbers `values` as its maximum over the ranks: under DDP every rank then takes the same branch
    (stop, save) and the same learning rate at the same step."""
    if world_size == 1:
        return values
    values = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values.tolist()


def saved_so_far(last_saved, ckpt_path):
    """What a run that stops now has saved (last_saved: the step its checkpoint holds, None if none), and how to go
    on."""
    if last_saved is None:
        return "No checkpoint was saved: start again with --overwrite"
    return (f"Nothing after step {last_saved} was saved: {ckpt_path} holds step {last_saved}; continue from it with "
            "--resume")


def diverged(what, last_saved, out_dir):
    """The message of a run stopped by a NaN or inf, `what` says where. Weights can grow huge (but finite) before the
    first NaN, so the last checkpoint is not known to be good: the one before it is kept, and the message says how
    to go back to it."""
    saved = saved_so_far(last_saved, os.path.join(out_dir, "checkpoint.pt"))
    message = f"{what}. {saved}, with a lower --lr or a stronger --grad-clip."
    if last_saved is not None:
        message += " If the loss was already climbing before that step (see loss.png), its weights may be diverging."
        message += go_back_hint(out_dir)
    return message


def read_metrics(log_path):
    """The rows of metrics.jsonl (none if it does not exist). A line that is not a row, such as the end of a write
    cut short by a full disk or a crash, is skipped: it never stops a resume."""
    if not os.path.exists(log_path):
        return []
    rows = []
    with open(log_path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def append_metrics(log_path, row):
    """Add a row to metrics.jsonl in one write, never through a link; if the write fails part-way (a full disk) the
    file is cut back to what it was, so no torn line is left."""
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(f"only part of a row could be written to {log_path}")
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def plot_losses(log_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(log_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "pivot", "dense"):
        if key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    with checkpoints.written(png_path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def drop_rows_after(log_path, step):
    """Keep the metrics of steps up to `step` (the checkpoint's): those past it are trained again after a resume.
    A line that is not a row (a write cut short) goes too."""
    if os.path.exists(log_path):
        rows = [row for row in read_metrics(log_path) if row["step"] <= step]
        with checkpoints.written(log_path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


# ----- The run folder, resuming, and the data -----


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # open() refuses a link at that name (Windows has no such flag)


def run_files(out_dir):
    """The names of the files that a run writes in out_dir and that are there now (links included)."""
    names = ["checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "loss.png"]
    there = [n for n in names if os.path.lexists(os.path.join(out_dir, n))]
    return there + sorted(glob.glob("samples_*.png", root_dir=out_dir))


def claim_run_folder(args):
    """The main process's hold on --out-dir: no link among the files a run writes (one could make it overwrite a file
    elsewhere); an exclusive lock (a second run into the same folder stops, naming the first); the temporary files
    of runs killed while saving removed; and a run there never overwritten or mixed with by accident.
    Returns the open lock file: the lock lasts until it is closed."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        links = [n for n in [".lock", *run_files(args.out_dir)] if os.path.islink(os.path.join(args.out_dir, n))]
        if links:
            raise SystemExit(f"error: {os.path.join(args.out_dir, links[0])} is a link: a run writes only plain files "
                             "in its folder (through a link it could overwrite a file elsewhere); remove it, or choose "
                             "another --out-dir")
        lock = os.fdopen(os.open(os.path.join(args.out_dir, ".lock"), os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666), "r+")
    except OSError as e:  # a read-only place, a file of that name, ... (or a link made since the look above)
        raise SystemExit(f"error: cannot use --out-dir {args.out_dir} as the run folder ({e.strerror or e}): "
                         "choose a folder you can write in") from None
    if fcntl is not None:  # (Windows has no flock: no lock there)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise SystemExit(f"error: {args.out_dir} is in use by another training run ({holder}); "
                             "wait for it to end, or choose another --out-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
    checkpoints.remove_stale_temporaries(args.out_dir)
    for tmp in glob.glob(os.path.join(args.out_dir, checkpoints.TMP_PREFIX + "*.pt")):  # as earlier versions named them
        os.remove(tmp)
    old = run_files(args.out_dir)
    if old and not args.resume:
        if not args.overwrite and "checkpoint.pt" in old:
            raise SystemExit(f"error: {args.out_dir} holds a run (checkpoint.pt): continue it with --resume, start "
                             "afresh there with --overwrite (which deletes it), or choose another --out-dir")
        if not args.overwrite:
            raise SystemExit(f"error: {args.out_dir} holds the files of a run that saved no checkpoint "
                             f"({', '.join(old)}): start afresh there with --overwrite (which deletes them), or "
                             "choose another --out-dir")
    return lock  # (with --overwrite, the old run's files go only once the new run has started: clear_earlier_run)


def clear_earlier_run(args):
    """--overwrite: delete the files of the run that was in --out-dir, now that the new run's config, data and model
    are known to be good (a mistyped flag stops the new run before it can cost the old one anything)."""
    if args.overwrite and not args.resume:
        for name in run_files(args.out_dir):
            os.remove(os.path.join(args.out_dir, name))


def run_config(args, main_process):
    """The run's settings and model config: from the checkpoint when resuming (with the run's own settings, and
    the checkpoint itself returned), else from the preset and --set (and no checkpoint)."""
    if not args.resume:
        return args, config_from_args(args), None
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    try:
        checkpoint = checkpoints.load_checkpoint(ckpt_path)
        cfg = checkpoints.config_from_checkpoint(checkpoint)
    except checkpoints.CheckpointError as e:
        raise SystemExit(f"error: cannot resume: {e}.{go_back_hint(args.out_dir)}") from None
    if problem := resume_problem(checkpoint):
        raise SystemExit(f"error: cannot resume {ckpt_path}: {problem}")
    args = resumed_args(args, checkpoint.get("args", {}), main_process)
    if "data_dir" not in args.given and not os.path.isdir(os.path.expanduser(args.data_dir)):
        raise SystemExit(f"error: the run's data folder {args.data_dir} is not there any more: give its new place "
                         "with --data-dir")
    if "set" in args.given and config_from_args(args) != cfg:
        raise SystemExit(f"error: --set changes the config of the run in {args.out_dir}; resume it without --set")
    if main_process:
        drop_rows_after(os.path.join(args.out_dir, "metrics.jsonl"), checkpoint["step"])
    return args, cfg, checkpoint


def resumed_args(args, saved, verbose):
    """--resume: the run's own settings, saved in its checkpoint, for every flag not given now; a given flag that
    differs is printed as a change. The device, --compile and --cuda-graphs are this process's own. --preset must
    agree."""
    if "preset" in args.given and saved.get("preset", args.preset) != args.preset:
        raise SystemExit(f"error: the run in {args.out_dir} was trained with --preset {saved['preset']}, not "
                         f"{args.preset}: resume it without --preset (or start a new run in another --out-dir)")
    merged = argparse.Namespace(**vars(args))
    for key, value in saved.items():
        this_process = ("resume", "overwrite", "device", "compile", "cuda_graphs", "out_dir", "given")
        if key in this_process or not hasattr(args, key):
            continue
        if key not in args.given:
            setattr(merged, key, value)
        elif value != getattr(args, key) and verbose:
            print(f"resuming with --{key.replace('_', '-')} {getattr(args, key)} (the run had {value})")
    check_args(merged, lambda message: sys.exit(f"error: {message}"))
    return merged


def resume_problem(checkpoint):
    """Why a checkpoint cannot be resumed (None if it can): what train.py saves besides the weights, each of its
    kind."""
    if "optimizer" not in checkpoint:
        return ("it holds no optimizer state (an exported checkpoint, or one written by an older version of himar); "
                "it can still be sampled with sample.py")
    step, rng = checkpoint.get("step"), checkpoint.get("rng")
    if not (isinstance(step, int) and step >= 0):
        return f"its step is {step!r}, not a whole number >= 0 (it was not written by train.py)"
    if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), list) and rng["cpu"]
            and all(torch.is_tensor(state) for state in rng["cpu"])):
        return "it holds no random-number state (rng), which train.py saves (it was not written by train.py)"
    return None


def go_back_hint(out_dir):
    """How to go back to the save before the last one of the run in out_dir ('' if it is not there)."""
    checkpoint, previous = os.path.join(out_dir, "checkpoint.pt"), os.path.join(out_dir, "checkpoint.prev.pt")
    if not os.path.exists(previous):
        return ""
    return f" The save before it is kept: `mv {previous} {checkpoint}` goes back to it."


def restore(checkpoint, model, ema, optimizer, rank, device):
    """Load a resumed run's weights, optimizer and random state; return (its step, how long it had trained)."""
    checkpoints.load_weights(model, checkpoint, "model")
    checkpoints.load_weights(ema, checkpoint, "ema")
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["cpu"][rank % len(checkpoint["rng"]["cpu"])])
    if device.type == "cuda" and checkpoint["rng"].get("cuda"):
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"][rank % len(checkpoint["rng"]["cuda"])])
    return int(checkpoint["step"]), float(checkpoint.get("train_seconds", 0.0))


def training_data(args, cfg, rank, world_size, device):
    """The data set, read by rank 0 first (it may download it), then by the others; on the GPU if it is small.
    If rank 0 cannot read it (or stopped before, e.g. on a run folder in use), every rank stops with a message."""

    def read():  # (the data, None) or (None, what to do)
        try:
            return load_dataset(args.dataset, args.data_dir, cfg.image_size), None
        except DataError as e:
            return None, str(e)

    data, error = read() if rank == 0 else (None, None)
    if world_size > 1:  # the other ranks wait here for rank 0's verdict
        failed = torch.tensor([float(error is not None)], device=device)
        try:
            torch.distributed.broadcast(failed, 0)
        except RuntimeError:  # rank 0's process is gone
            raise SystemExit(f"error: rank {rank}: rank 0 stopped before the data was read; its message says "
                             "why") from None
        if failed.item() and rank != 0:
            raise SystemExit(f"error: rank {rank}: rank 0 could not read the data set; its message says why")
        if rank != 0:
            data, error = read()
    if error:
        raise SystemExit(f"error: {error}" if rank == 0 else f"error: rank {rank}: {error}")
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the number of processes "
                         f"({world_size})")
    if data.labels.max() >= cfg.num_classes:
        classes = int(data.labels.max()) + 1
        raise SystemExit(f"error: the data has {classes} classes, the {args.preset} preset {cfg.num_classes}; "
                         f"use --set num_classes={classes}")
    if len(data.labels) // world_size < args.batch_size // world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is more than the {len(data.labels)} images of the "
                         f"data set (on {world_size} process(es)): lower it")
    if device.type == "cuda" and data.images.numel() < 2**31:  # small data sets live on the GPU
        data.images = data.images.to(device)
    return data


# ----- The command line -----


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Hi-MAR on one GPU (or several with torchrun).", allow_abbrev=False)
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "imagenet64", "folder"])
    p.add_argument("--data-dir", default="./data", help="folder that holds (or receives) the data set")
    p.add_argument("--preset", choices=list(himar.PRESETS),
                   help="model config (default: cifar10, or imagenet64 for that data set)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a config field, e.g. --set pivots=none --set dense_head=mlp (repeatable)")
    p.add_argument("--out-dir", help="where checkpoints, logs and samples go (default: runs/<preset>)")
    p.add_argument("--max-steps", type=int, help="training steps (default: the preset's recipe)")
    p.add_argument("--max-minutes", type=float,
                   help="also stop once the run has trained this long in all (resumed runs count their earlier time); "
                        "the learning-rate decay and the pivot-dropout schedule then run over this time (the clock is "
                        "read at every step)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the preset's recipe)")
    p.add_argument("--micro-batch", type=int,
                   help="images per forward/backward pass on each GPU; their gradients add up to one update of the "
                        "whole batch (gradient accumulation). Lower it when the GPU runs out of memory (default: the "
                        "preset's recipe: the whole batch for cifar10, 128 for imagenet64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's recipe)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"], help="after the warm-up")
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--grad-clip", type=float, default=3.0, help="clip the gradient norm to this (> 0)")
    p.add_argument("--ema-decay", type=float, help="EMA of the weights (default: the preset's recipe)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its checkpoint, with its own settings (flags given now "
                        "change them)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out-dir that holds a run, deleting it")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward pass whole (default: on a GPU, where it trains cifar10 "
                        "about 2x as fast on an H100, see REPORT.md; --no-compile if your setup cannot compile)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="replay the compiled forward and backward as CUDA graphs (torch.compile's 'reduce-overhead' "
                        "mode), with less time spent launching kernels (default: on where it is measured to work, a "
                        "GPU with --compile and one forward pass a step; cifar10 on one H100: 14,900 steps in 19.3 "
                        "instead of 21.0 min (f79fc51); on 2 H100s: 3,426 instead of 2,535 images/s; see REPORT.md)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--keep-at", type=int, nargs="+", default=[], metavar="STEP",
                   help="also keep the checkpoint of these steps, as checkpoint_<step>.pt (to score a run along the "
                        "way: scripts/cifar10_ablation.py)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    # the flags given on this command line (the others may come from a run's checkpoint when resuming)
    args.given = sorted({a.dest for a in p._actions for token in argv if token.split("=")[0] in a.option_strings})
    args.preset = args.preset or ("imagenet64" if args.dataset == "imagenet64" else "cifar10")
    recipe = RECIPES[args.preset]
    for name, key in (("max_steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("warmup_steps", "warmup"),
                      ("ema_decay", "ema_decay"), ("micro_batch", "micro_batch")):
        if getattr(args, name) is None:
            setattr(args, name, recipe[key])
    if "micro_batch" not in args.given and args.micro_batch is not None:  # the recipe's, for a smaller --batch-size
        args.micro_batch = min(args.micro_batch, args.batch_size)
    args.out_dir = args.out_dir or os.path.join("runs", args.preset)
    check_args(args, p.error)
    return args


def check_args(args, error):
    """Every numeric flag within its range, and a device that exists, before anything starts."""
    for name in ("max_steps", "batch_size", "log_every", "sample_every", "ckpt_every"):
        if getattr(args, name) <= 0:
            error(f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}")
    if any(not 0 < step <= args.max_steps for step in args.keep_at):
        error(f"--keep-at takes step numbers from 1 to --max-steps, got {args.keep_at}")
    for name in ("grad_clip", "max_minutes"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:  # (NaN fails too)
            error(f"--{name.replace('_', '-')} must be > 0 and finite, got {getattr(args, name)}")
    if not 0 < args.lr <= 1:
        error(f"--lr must be > 0 and at most 1 (AdamW moves every weight by about lr at each step), got {args.lr}")
    if args.micro_batch is not None and args.micro_batch <= 0:
        error(f"--micro-batch must be a positive whole number, got {args.micro_batch}")
    if args.micro_batch is not None and args.micro_batch > args.batch_size:
        error(f"--micro-batch {args.micro_batch} is more than the batch (--batch-size {args.batch_size}): give at most "
              "that")
    if args.warmup_steps < 0:
        error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 <= args.weight_decay < math.inf:
        error(f"--weight-decay must be >= 0 and finite, got {args.weight_decay}")
    if not 0 <= args.ema_decay < 1:
        error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0 <= args.seed < 2**63:
        error(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")
    if problem := cuda_graphs_problem(args):
        error(problem)
    if args.resume and args.overwrite:
        error("--resume continues the run in --out-dir and --overwrite deletes it: give one of them")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except RuntimeError:
            error(f"--device {args.device}: not a device; use cuda, cuda:N, cpu or auto")


def accumulates(args):
    """Whether a step runs in several forward/backward passes (gradient accumulation, --micro-batch)."""
    local_batch = args.batch_size // launched_world_size()
    return args.micro_batch is not None and args.micro_batch < local_batch


def cuda_graphs_problem(args):
    """Why --cuda-graphs, if asked for, cannot work with these flags (None if it can)."""
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.cuda_graphs and (args.compile is False or not on_gpu):
        return "--cuda-graphs replays compiled code on a CUDA GPU: it goes with neither --no-compile nor a CPU"
    if args.cuda_graphs and accumulates(args):
        return ("--cuda-graphs does not work with gradient accumulation yet (--micro-batch below the batch per GPU, "
                "as in the imagenet64 recipe): leave it off")
    return None


def config_from_args(args):
    """The preset's config with the --set changes; a clear error for a combination the config rejects."""
    try:
        cfg = himar.preset(args.preset, **config_overrides(args.set))
    except ValueError as e:  # e.g. a width that the number of heads does not divide
        raise SystemExit(f"error: --set: {e}") from None
    if cfg.channels != 3:
        raise SystemExit(f"error: --set channels={cfg.channels}: the data sets train.py reads are RGB, so channels "
                         "must be 3")
    return cfg


def config_overrides(pairs):
    """--set FIELD=VALUE pairs -> {field: value typed like the config's default}; FIELD is a field of Config or of
    its Sampling settings (e.g. --set dense_steps=4)."""
    defaults = {**{f.name: getattr(himar.Config(), f.name) for f in fields(himar.Config) if f.name != "sampling"},
                **{f.name: getattr(himar.Sampling(), f.name) for f in fields(himar.Sampling)}}
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        renamed = {"heads": "num_heads", "dit_head_heads": "dit_head_num_heads"}  # the names of the first version
        if name in renamed:
            raise SystemExit(f"error: --set {pair}: the field {name} is now called {renamed[name]}")
        if not sep or name not in defaults:
            raise SystemExit(f"error: --set {pair}: expected FIELD=VALUE with FIELD one of: {', '.join(defaults)}")
        kind = type(defaults[name])
        try:
            if kind is bool:
                overrides[name] = BOOLEANS[value.lower()]
            elif kind is tuple:  # the diffusion steps: "50" or "50,10" (first, last)
                steps = tuple(int(v) for v in value.split(","))
                if len(steps) > 2:
                    raise ValueError
                overrides[name] = steps if len(steps) == 2 else steps[0]
            else:
                overrides[name] = kind(value)
        except (ValueError, KeyError):
            what = {tuple: "a whole number or a pair FIRST,LAST", int: "a whole number", float: "a number",
                    bool: "true or false (or 1/0, yes/no, on/off)"}.get(kind, f"a {kind.__name__}")
            raise SystemExit(f"error: --set {pair}: {name} must be {what}") from None
    return overrides


BOOLEANS = {word: True for word in ("1", "true", "yes", "on")} | {word: False for word in ("0", "false", "no", "off")}


# ----- Several GPUs (torchrun) -----


def launched_world_size():
    """How many processes train together: torchrun's WORLD_SIZE, 1 when started with python."""
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(args):
    """Under torchrun: one process per GPU (NCCL), or per CPU process (gloo). Returns (rank, world_size, device)."""
    world_size = launched_world_size()
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and int(os.environ.get("RANK", 0)) == 0:
            print("warning: no CUDA GPU found, training on the CPU (slow; fine for --preset tiny)")
    else:
        device = args.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {device} asked for, but no CUDA GPU is available (use --device cpu)")
    if world_size == 1:
        return 0, 1, torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, torch.device(device)


def main(argv=None):
    args = parse_args(argv)
    try:
        with stopping:
            train(args)
    except TrainingStopped as e:
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(130) from None
    except StoppedAtOnce as e:
        print(f"{e} again: stopped at once, without saving; --resume continues from the last checkpoint",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
