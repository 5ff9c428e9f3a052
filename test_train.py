"""Tests of train.py and sample.py: training, resuming, sampling, and what keeps a user's work safe."""
import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import himar
import pictures
import sample
import train
from data import DataError, load_dataset
from test_data import cifar_batch, write_cifar

# --- the command lines end to end (tiny preset, a folder data set, CPU) ---------------------------------



@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for i in range(16):
            pixels = np.clip(rng.normal(60 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    return str(tmp_path / "images")


def train_args(data, out, steps, *extra):
    return ["--dataset", "folder", "--data-dir", data, "--preset", "tiny", "--out-dir", str(out), "--device", "cpu",
            "--max-steps", str(steps), "--batch-size", "8", "--log-every", "3", "--ckpt-every", "3",
            "--sample-every", "6", "--lr-schedule", "constant", "--warmup-steps", "2", *extra]


def test_train_then_sample_end_to_end(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 6))
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png", "samples_0000006.png"} <= set(os.listdir(out))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["loss"]) for r in rows)
    grid, npz, gif = tmp_path / "grid.png", tmp_path / "s.npz", tmp_path / "t.gif"
    sample.main(["--ckpt", str(out / "checkpoint.pt"), "--grid", str(grid), "--labels", "0", "1", "--per-class", "3",
                 "--num-images", "6", "--npz", str(npz), "--trajectory", str(gif), "--device", "cpu",
                 "--batch-size", "4", "--dense-diffusion-steps", "3", "1"])
    height, width = np.asarray(Image.open(grid)).shape[:2]  # 2 rows x 3 images of 32 px + gaps, the class names left
    assert height == 2 * 34 + 2 and width > 3 * 34 + 2
    data = np.load(npz)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 32, 32, 3)
    assert data["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]
    cfg = himar.preset("tiny")
    assert Image.open(gif).n_frames == cfg.sampling.pivot_steps + cfg.sampling.dense_steps


def test_sample_npz_compiles_the_heads_where_asked_and_by_default_on_a_gpu_only(tmp_path, monkeypatch):
    path = tmp_path / "tiny.pt"
    cfg = himar.preset("tiny")
    checkpoints.save_checkpoint(path, himar.to_checkpoint(cfg, ema=himar.HiMAR(cfg).state_dict()))
    compiled = []
    monkeypatch.setattr(sample, "compile_heads", compiled.append)
    common = ["--ckpt", str(path), "--device", "cpu", "--grid", "", "--trajectory", "", "--num-images", "3",
              "--pivot-diffusion-steps", "2", "--dense-diffusion-steps", "2"]
    sample.main(common + ["--npz", str(tmp_path / "a.npz")])  # a CPU: eager
    assert compiled == []
    sample.main(common + ["--npz", str(tmp_path / "b.npz"), "--compile"])
    assert len(compiled) == 1 and isinstance(compiled[0], himar.HiMAR)
    assert np.load(tmp_path / "b.npz")["arr_0"].shape == (3, 32, 32, 3)


def test_keep_at_keeps_the_checkpoints_of_those_steps(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 5, "--keep-at", "2", "4", "--ckpt-every", "100", "--log-every", "100"))
    kept = {step: torch.load(out / f"checkpoint_{step}.pt") for step in (2, 4)}
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint_")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    assert [kept[2]["step"], kept[4]["step"], torch.load(out / "checkpoint.pt")["step"]] == [2, 4, 5]
    changed = [n for n in kept[2]["ema"] if not torch.equal(kept[2]["ema"][n], kept[4]["ema"][n])]
    assert changed  # two different moments of the run
    with pytest.raises(SystemExit):
        train.parse_args(["--keep-at", "0"])


def test_resume_gives_the_same_model_as_an_uninterrupted_run(image_folder, tmp_path):
    train.main(train_args(image_folder, tmp_path / "straight", 6))
    train.main(train_args(image_folder, tmp_path / "resumed", 3))
    train.main(train_args(image_folder, tmp_path / "resumed", 6) + ["--resume"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt")
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], atol=1e-6), (key, name)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 3))
    good = torch.load(out / "checkpoint.pt")
    forward = himar.HiMAR.forward
    monkeypatch.setattr(himar.HiMAR, "forward", lambda self, *a, **k: (forward(self, *a, **k)[0] * float("nan"), {}))
    with pytest.raises(SystemExit, match="NaN or inf.*Nothing after step 3 was saved"):
        train.main(train_args(image_folder, out, 9) + ["--resume"])
    after = torch.load(out / "checkpoint.pt")
    assert after["step"] == 3 and all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])


class PerImageLoss(torch.nn.Module):
    """A deterministic model with train.py's interface whose loss is a mean over the images of the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(48, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, images, labels, pivot_dropout=0.0):
        loss = ((self.net(images.flatten(1)).squeeze(1) - labels.float()) ** 2).mean()
        return loss, {"dense": loss.detach()}


@pytest.mark.parametrize("micro_batch", [1, 2, 4, 6])
def test_micro_batches_give_the_update_of_the_whole_batch(micro_batch):
    x, y = torch.randn(6, 3, 4, 4), torch.arange(6) % 3  # 6 images: micro-batches of 4 leave one of 2 (shares 4/6, 2/6)
    updated = []
    for size in (None, micro_batch):
        model = PerImageLoss()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.02)
        for _ in range(3):
            loss, parts, grad_norm = train.training_step(model, optimizer, x, y, 0.0, grad_clip=0.5, micro_batch=size)
        updated.append((loss, parts["dense"], grad_norm, [p.detach().clone() for p in model.parameters()]))
    (l1, d1, g1, p1), (l2, d2, g2, p2) = updated
    assert torch.allclose(l1, l2) and torch.allclose(d1, d2) and torch.allclose(g1, g2)  # g > 0.5: clipping is on
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p2))


def test_micro_batch_flag_trains_and_out_of_memory_names_the_flag(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "micro"
    train.main(train_args(image_folder, out, 3, "--micro-batch", "3"))  # batches of 8 as 3 + 3 + 2
    assert torch.load(out / "checkpoint.pt")["args"]["micro_batch"] == 3
    with pytest.raises(SystemExit):
        train.main(train_args(image_folder, tmp_path / "m0", 3, "--micro-batch", "0"))
    assert "--micro-batch must be a positive whole number, got 0" in capsys.readouterr().err

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "training_step", out_of_memory)
    message = r"ran out of memory at step 1, with 8 images per forward pass.*--micro-batch 4"
    with pytest.raises(SystemExit, match=message):
        train.main(train_args(image_folder, tmp_path / "oom", 3))
    monkeypatch.setattr(himar.HiMAR, "sample", out_of_memory)
    with pytest.raises(SystemExit, match=r"ran out of memory while sampling.*--batch-size for --npz \(now 500\)"):
        sample.main(["--ckpt", str(out / "checkpoint.pt"), "--device", "cpu", "--grid", str(tmp_path / "g.png")])


def test_bad_flags_and_checkpoints_give_clear_errors(image_folder, tmp_path):
    with pytest.raises(SystemExit, match="--set depth=x: depth must be a whole number"):
        train.main(train_args(image_folder, tmp_path / "a", 3) + ["--set", "depth=x"])
    with pytest.raises(SystemExit, match="FIELD one of"):
        train.main(train_args(image_folder, tmp_path / "a", 3) + ["--set", "colour=red"])
    with pytest.raises(SystemExit, match="heads is now called num_heads"):
        train.main(train_args(image_folder, tmp_path / "a", 3) + ["--set", "heads=4"])
    with pytest.raises(SystemExit, match="cannot resume: no checkpoint"):
        train.main(train_args(image_folder, tmp_path / "b", 3) + ["--resume"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        sample.main(["--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"])
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 3))
    ckpt = str(out / "checkpoint.pt")
    saved = torch.load(ckpt)
    for broken in ({k: v for k, v in saved.items() if k != "ema"}, {**saved, "optimizer": {"state": {}}},
                   {**saved, "train_seconds": "a while"}):  # a resume that cannot load its state says so
        checkpoints.save_checkpoint(tmp_path / "broken" / "checkpoint.pt", broken)
        with pytest.raises(SystemExit, match="cannot resume .*: its state does not load"):
            train.main(train_args(image_folder, tmp_path / "broken", 6, "--resume"))
    with pytest.raises(SystemExit, match="nothing to write"):
        sample.main(["--ckpt", ckpt, "--grid", "", "--trajectory", "", "--device", "cpu"])
    with pytest.raises(SystemExit, match="dense_steps must be at least 1"):
        sample.main(["--ckpt", ckpt, "--dense-steps", "0", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"dense_steps must be between 1 and the number of tokens \(64\), got 65"):
        sample.main(["--ckpt", ckpt, "--dense-steps", "65", "--device", "cpu"])
    with pytest.raises(SystemExit, match="diffusion steps must be at least 1"):
        sample.main(["--ckpt", ckpt, "--dense-diffusion-steps", "50", "0", "--device", "cpu"])
    with pytest.raises(SystemExit, match="takes one or two numbers"):
        sample.main(["--ckpt", ckpt, "--dense-diffusion-steps", "50", "20", "10", "--device", "cpu"])
    with pytest.raises(SystemExit, match="2"):  # argparse: invalid choice
        sample.main(["--ckpt", ckpt, "--dense-sampler", "euler", "--device", "cpu"])
    with pytest.raises(SystemExit, match="dense_diffusion_steps must be a whole number or a pair"):
        train.main(train_args(image_folder, tmp_path / "c", 3) + ["--set", "dense_diffusion_steps=many"])
    args = train.parse_args(["--preset", "tiny", "--set", "width=64"])
    assert train.config_from_args(args).width == 64  # tiny's heads divide 64
    with pytest.raises(SystemExit, match="width must be divisible by num_heads"):
        train.config_from_args(train.parse_args(["--preset", "tiny", "--set", "width=63"]))
    with pytest.raises(SystemExit, match="diffusion steps must be at least 1"):
        train.main(train_args(image_folder, tmp_path / "d", 3) + ["--set", "dense_diffusion_steps=50,0"])
    with pytest.raises(SystemExit, match="diffusion steps must be between 1 and diffusion_steps"):
        train.main(train_args(image_folder, tmp_path / "d", 3) + ["--set", "dense_diffusion_steps=5000"])
    with pytest.raises(SystemExit, match="cannot write"):
        sample.main(["--ckpt", ckpt, "--grid", str(tmp_path / "no" / "such" / "dir.png"), "--device", "cpu"])


def torchrun_two_cpu_processes(flags):
    """train.py under torchrun with 2 processes (gloo), on a port that is free now (a fixed one can be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "train.py",
           *flags]
    root = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)


def test_ddp_with_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun_two_cpu_processes(train_args(image_folder, out, 3))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoint.pt")
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]["cpu"]) == 2
    assert "batch 8 on 2 x cpu" in result.stdout


def test_max_minutes_counts_the_time_of_earlier_segments(image_folder, tmp_path):
    out = tmp_path / "timed"
    train.main(train_args(image_folder, out, 6))
    first = torch.load(out / "checkpoint.pt")["train_seconds"]
    assert first > 0
    # the run has already trained longer than this budget: a resumed run stops after its first step (the clock is
    # read at every step, not only at the log points every 3 steps), logs it and saves
    train.main(train_args(image_folder, out, 1000) + ["--resume", "--max-minutes", str(first / 120)])
    checkpoint = torch.load(out / "checkpoint.pt")
    assert checkpoint["step"] == 7 and checkpoint["train_seconds"] > first
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6, 7] and rows[-1]["minutes"] * 60 > first


@pytest.fixture
def study(monkeypatch):
    """scripts/cifar10_ablation.py with its plain DiT at the tiny preset's size (not the real baseline's), and MAR
    with few sampling steps, to keep the tests quick on a CPU."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import cifar10_ablation as study

    monkeypatch.setitem(study.VARIANTS, "dit", ("plain DiT", []))
    label, sets = study.VARIANTS["mar"]
    monkeypatch.setitem(study.VARIANTS, "mar", (label, [*sets, "dense_steps=4", "dense_diffusion_steps=10"]))
    return study


def test_ablation_study_runs_end_to_end(study, image_folder, tmp_path, capsys):
    out = tmp_path / "study"
    study.main(["run", "--out", str(out), "--preset", "tiny", "--variants", "mar", "dit",
                "--score-at", "0.002", "0.004", "--num-images", "10", "--final-images", "20", "--batch-size", "10",
                "--log-every", "2", "--cfgs", "1.5", "3", "--curve-cfg", "3", "--device", "cpu",
                "--train-flags", "--dataset", "folder", "--data-dir", image_folder, "--batch-size", "8"])
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    for name in ("mar", "dit"):
        kinds = [r["kind"] for r in rows if r["variant"] == name]
        assert kinds == ["curve", "curve", "sweep", "final"], kinds
        curve = [r for r in rows if r["variant"] == name and r["kind"] == "curve"]
        assert curve[0]["step"] < curve[1]["step"] and 0.004 <= curve[1]["minutes"]
        assert (out / name / "final_grid.png").exists()
    assert {r["n"] for r in rows if r["kind"] == "final"} == {20}
    assert {(r["budget"], r["device"]) for r in rows} == {(0.004, "cpu")}
    capsys.readouterr()
    study.main(["report", str(out), "--plot", str(tmp_path / "curves.png")])
    table = capsys.readouterr().out
    assert "| 1. MAR: no pivots, MLP head |" in table and "| plain DiT |" in table
    assert not (tmp_path / "curves.png").exists()  # nothing was scored: no curves to plot
    with open(out / "results.jsonl", "w") as f:  # as if a scorer had scored every sample set
        f.writelines(json.dumps({**r, "fd": 10.0 + i, "acc": 0.5}) + "\n" for i, r in enumerate(rows))
    study.main(["report", str(out), "--plot", str(tmp_path / "curves.png")])
    report = capsys.readouterr().out
    assert "| 0.50 |" in report and (tmp_path / "curves.png").exists()
    equal = min(max(r["step"] for r in rows if r["variant"] == n and r["kind"] == "curve") for n in ("mar", "dit"))
    assert f"At equal steps: {equal:,} steps" in report
    curve = [{"step": 100, "fd": 20.0}, {"step": 300, "fd": 10.0}, {"step": 700, "fd": 6.0}]
    assert [study.at_step(curve, s, "fd") for s in (100, 200, 300, 500, 50, 800)] == [20.0, 15.0, 10.0, 8.0, None, None]
    study.main(["grids", str(out), str(tmp_path / "grids.png")])
    assert (tmp_path / "grids.png").exists()
    with pytest.raises(SystemExit, match="run the study first"):
        study.main(["grids", str(tmp_path / "nothing"), str(tmp_path / "none.png")])


def test_the_study_plot_marks_the_curves_scored_on_fewer_samples(study, tmp_path, monkeypatch):
    import matplotlib.figure

    def curve(n):
        return [{"budget": 4, "unit": "steps", "n": n, "step": s, "minutes": s / 2, "fd": 20.0 / s, "acc": 0.1 * s}
                for s in (2, 4)]

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    study.plot_curves({("mar", 0): curve(6), ("dit", 0): curve(10)}, tmp_path / "curves.png", "title")
    fig, = saved
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["1. MAR: no pivots, MLP head, N = 6", "plain DiT"]
    mar, dit = fig.axes[0].get_lines()
    assert mar.get_markerfacecolor() == "white" and dit.get_markerfacecolor() == dit.get_color()


def test_sampling_sweep_gives_phase_2_the_test_images_pivots_with_their_labels(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import sampling_sweep

    test = cifar_batch(first=3, n=6)  # labels 3, 4, ..., 8: not the classes in turn that plain sampling takes
    (write_cifar(tmp_path) / "test_batch").write_bytes(pickle.dumps(test))
    images = torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)).float() / 127.5 - 1
    model = himar.HiMAR(himar.preset("tiny")).eval()
    given, plain_sample = [], model.sample

    def sample(labels, pivots=None, **settings):  # the model's own sample, watching the pivots it is given
        given.append(pivots)
        return plain_sample(labels, pivots=pivots, **settings)
    monkeypatch.setattr(model, "sample", sample)
    row = sampling_sweep.sample_and_score(model, 6, {}, batch_size=4, keep=tmp_path / "s.npz", warmup=2,
                                          test_pivots=str(tmp_path))
    assert np.load(tmp_path / "s.npz")["arr_1"].tolist() == test[b"labels"]
    # after the warm-up call, the 6 in batches
    assert torch.allclose(torch.cat(given[1:]), himar.downsample(images), atol=1e-6)
    assert row["n"] == 6 and row["given_pivots"] == "test images" and row["warmup_seconds"] > 0
    given.clear()
    sampling_sweep.sample_and_score(model, 4, {}, batch_size=4, warmup=2)
    assert given == [None, None]  # without test_pivots, phase 1 samples them
    given.clear()
    row = sampling_sweep.sample_and_score(model, 4, {}, batch_size=4, warmup=0)
    assert len(given) == 1 and row["warmup_seconds"] < 0.5  # warmup 0: no warm-up call (the sweep's later settings)
    with pytest.raises(SystemExit, match="has 6 test images; give --num-images 6 or fewer"):
        sampling_sweep.sample_and_score(model, 8, {}, test_pivots=str(tmp_path))


def test_sampling_sweep_writes_the_real_pivots_row_to_its_out_file(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import sampling_sweep

    (write_cifar(tmp_path) / "test_batch").write_bytes(pickle.dumps(cifar_batch(first=0, n=5)))
    scorer = tmp_path / "scorer.py"  # stands in for score_cifar10.py: one JSON line about the images it was given
    scorer.write_text("import json, sys\nimport numpy as np\nd = np.load(sys.argv[1])\n"
                      "print(json.dumps({'fd': 1.5, 'scored': list(d['arr_0'].shape),\n"
                      "                  'labels': d['arr_1'].tolist()}))\n")
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", ["sampling_sweep.py", "--real-pivots", str(tmp_path), "--scorer", str(scorer),
                                      "--num-images", "4", "--out", str(out)])
    sampling_sweep.main()
    rows = [json.loads(line) for line in open(out)]  # printed, and written to --out as the sampled settings are
    assert len(rows) == 1 and rows[0]["n"] == 4 and rows[0]["fd"] == 1.5
    assert rows[0]["scored"] == [4, 32, 32, 3] and rows[0]["labels"] == [0, 1, 2, 3]  # enlarged back to 32x32


def test_ablation_study_at_equal_steps_scores_each_run_along_the_way_per_seed(study, image_folder, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "study"
    argv = ["run", "--out", str(out), "--preset", "tiny", "--variants", "mar", "dit", "--steps", "4", "--score-steps",
            "0.5", "--num-images", "10", "--num-images-mlp", "6", "--final-images", "20", "--batch-size", "10",
            "--cfgs", "1.5", "3", "--curve-cfg", "3", "--device", "cpu",
            "--train-flags", "--dataset", "folder", "--data-dir", image_folder, "--batch-size", "8",
            "--warmup-steps", "1"]
    compiled = []  # --compile compiles each run's heads once: the later checkpoints load into the same model
    monkeypatch.setattr(study, "compile_heads", compiled.append)
    flags = argv.index("--train-flags")
    study.main(argv[:flags] + ["--compile"] + argv[flags:])
    assert len(compiled) == 2 and compiled[0] is not compiled[1]  # mar's and dit's
    second_seed = [*argv[:argv.index("--variants")], "--variants", "dit", "--seeds", "1", *argv[argv.index("--steps"):]]
    study.main(second_seed)  # a second seed of one row, into the same study; not compiled (a CPU's default)
    assert len(compiled) == 2
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    for name, seed in [("mar", 0), ("dit", 0), ("dit", 1)]:
        run = [r for r in rows if r["variant"] == name and r["seed"] == seed]
        assert [r["kind"] for r in run] == ["curve", "curve", "sweep", "final"]
        assert [r["step"] for r in run] == [2, 4, 4, 4] and {(r["budget"], r["unit"]) for r in run} == {(4, "steps")}
        assert [r["n"] for r in run] == [6, 6, 6, 20] if name == "mar" else [10, 10, 10, 20]
        folder = out / (name if seed == 0 else f"{name}_seed{seed}")
        kept = torch.load(folder / "checkpoint_2.pt", weights_only=False)
        assert kept["step"] == 2 and kept["args"]["max_steps"] == 4 and kept["args"]["lr_schedule"] == "cosine"
        assert kept["args"]["seed"] == seed and (folder / "final_grid.png").exists()
    assert run[0]["minutes"] <= run[1]["minutes"]  # the training time at each scored step
    assert [r["compiled"] for r in rows if r["variant"] == "mar"] == [True] * 4
    args = study.parse_args(argv)
    weights = lambda model: torch.cat([p.flatten() for p in model.state_dict().values()])
    first, _ = study.load_ema("dit", out / "dit" / "checkpoint_2.pt", args)
    at_2 = weights(first)
    reloaded, _ = study.load_ema("dit", out / "dit" / "checkpoint_4.pt", args, into=first)
    fresh, _ = study.load_ema("dit", out / "dit" / "checkpoint_4.pt", args)
    assert reloaded is first and torch.equal(weights(reloaded), weights(fresh))
    assert not torch.equal(at_2, weights(fresh))
    study.main(argv)  # again: everything is in results.jsonl, so nothing is trained or sampled twice
    assert len(open(out / "results.jsonl").readlines()) == len(rows)
    with open(out / "results.jsonl", "w") as f:  # as if a scorer had scored every sample set
        f.writelines(json.dumps({**r, "fd": 10.0 + i, "acc": 0.5}) + "\n" for i, r in enumerate(rows))
    capsys.readouterr()
    study.main(["report", str(out), "--plot", str(tmp_path / "curves.png")])
    table = capsys.readouterr().out
    assert "| 1. MAR: no pivots, MLP head | 0 |" in table and "| plain DiT | 1 |" in table
    assert "At equal steps: 4 steps" in table and "At equal time:" in table and (tmp_path / "curves.png").exists()
    with pytest.raises(SystemExit):
        study.parse_args(["run", "--steps", "100", "--score-at", "5"])


def test_sampling_sweep_says_what_is_wrong_with_a_setting():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import sampling_sweep

    def error(message):  # as argparse's error: exit with the message
        raise SystemExit(message)

    cfg = himar.preset("tiny")
    parsed = sampling_sweep.parse_setting('{"pivot_cfg": 5, "drop_pivots": true}', cfg, error)
    assert parsed == {"pivot_cfg": 5, "drop_pivots": True}
    for text, words in [("{bad", "not JSON"), ('{"cfg": 3}', "fields of himar.Sampling"), ("[1]", "a JSON object"),
                        ('{"pivot_steps": 0}', "pivot_steps must be at least 1")]:
        with pytest.raises(SystemExit, match=words):
            sampling_sweep.parse_setting(text, cfg, error)


def test_training_flops_count_attention_on_cpu():
    # a training step costs about three forward passes (backward: two products per product of the forward);
    # without attention, which PyTorch cannot count in the CPU's fused kernel, it would be about 2.7 for tiny
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import benchmark

    model = himar.HiMAR(himar.preset("tiny"))
    _, forward = benchmark.flops_by_part(model)
    step, _ = benchmark.count_flops(model, torch.device("cpu"), backward=True)
    assert step == pytest.approx(3 * forward, rel=0.03)


def test_benchmark_accounts_for_the_whole_forward_pass_and_times_training(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import benchmark

    result = benchmark.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                             "--batch-size", "4"])
    parts, total = result["parts"], result["forward"]
    assert sum(parts.values()) == pytest.approx(total, rel=1e-6)  # every FLOP belongs to one part
    assert {"blocks", "dense_head", "pivot_head"} <= set(parts)
    cfg, W = himar.preset("tiny"), himar.preset("tiny").width

    def block(L):  # one block on L tokens: qkv, proj and the MLP (2 FLOPs per multiply-add), then attention
        return 2 * L * W * W * (4 + 2 * cfg.mlp_ratio) + 4 * L * L * W

    phase1 = cfg.buffer_tokens + cfg.num_pivots  # [buffer | pivots]
    phase2 = phase1 + cfg.num_dense  # [buffer | pivot context | dense]
    assert parts["blocks"] == cfg.depth * (block(phase1) + block(phase2))
    assert result["images_per_s"] > 0 and len(result["first_steps_s"]) == 2 and min(result["first_steps_s"]) > 0
    mar = benchmark.main(["--preset", "tiny", "--set", "pivots=none", "--set", "dense_head=mlp",
                          "--steps", "0"])["parts"]
    assert "pivot_head" not in mar and mar["blocks"] < parts["blocks"]
    out = capsys.readouterr().out
    assert "GFLOP per image" in out and "images/s" in out
    with pytest.raises(SystemExit):
        benchmark.main(["--preset", "tiny", "--device", "cpu", "--cuda-graphs"])
    assert "--cuda-graphs replays compiled code on a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the imagenet64 recipe accumulates micro-batches
        benchmark.main(["--preset", "imagenet64", "--device", "cuda", "--cuda-graphs"])
    assert "--cuda-graphs does not work with gradient accumulation" in capsys.readouterr().err


def test_benchmark_profile_counts_overlapping_kernels_once_and_ranks_kernels_by_time():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import benchmark

    # two steps' kernels (start us, end us, name): a matrix product overlapped by an elementwise kernel, then attention
    step = [(0, 1000, "nvjet_tst_gemm"), (500, 1500, "triton_poi_fused_add_0"), (2000, 2600, "triton_poi_fused_add_0"),
            (3000, 3400, "flash_fwd_kernel")]
    kernels = step + [(start + 10000, end + 10000, name) for start, end, name in step]
    busy, kinds, top = benchmark.kernel_time(kernels, steps=2)
    assert busy == pytest.approx(2.5)  # 0 to 1.5 ms, 2.0 to 2.6, 3.0 to 3.4: the overlap counts once
    assert kinds == pytest.approx({"fused elementwise (Triton)": 1.6, "matrix products": 1.0, "attention": 0.4})
    assert [name for name, _, _ in top] == ["triton_poi_fused_add_0", "nvjet_tst_gemm", "flash_fwd_kernel"]
    assert top[0][1:] == pytest.approx((1.6, 2))  # ms and launches per step


@pytest.mark.parametrize("flags,device,mode", [
    ([], "cuda", "reduce-overhead"),               # the default on a GPU: compiled, replayed as CUDA graphs
    (["--micro-batch", "8"], "cuda", "default"),   # gradient accumulation: compiled, no graphs (they fail there)
    (["--no-cuda-graphs"], "cuda", "default"),
    (["--no-compile"], "cuda", None),
    ([], "cpu", None),                             # a CPU: eager
])
def test_compile_model_uses_cuda_graphs_by_default_where_they_work(flags, device, mode, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: compiled.append((self, mode or "default")))
    model = himar.HiMAR(himar.preset("tiny"))
    train.compile_model(model, train.parse_args(["--preset", "tiny", *flags]), torch.device(device))
    assert compiled == ([(model, mode)] if mode else [])  # the whole model's forward, once


@pytest.mark.parametrize("changes", [{}, {"dense_full_mask": 0.5}, {"pivots": "none", "dense_head": "mlp"}])
def test_the_compiled_training_forward_is_one_graph_for_every_step(changes):
    # the masks' sizes are drawn on the device and the pivot dropout comes as a tensor (as train.py passes it), so
    # torch.compile traces the whole step's forward once (fullgraph: no break) and never compiles it again
    torch._dynamo.reset()
    model = himar.HiMAR(himar.preset("tiny", **changes))
    model.compile(backend="eager", fullgraph=True)  # dynamo's tracing and guards alone (no code generation)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for dropout in (1.0, 0.7, 0.1):
            loss, _ = model(images, torch.arange(4), pivot_dropout=torch.tensor(dropout))
            loss.backward()
    torch._dynamo.reset()


def test_weight_decay_falls_on_linear_weight_matrices_only():
    model = himar.HiMAR(himar.preset("tiny"))
    args = train.parse_args(["--preset", "tiny"])
    decay, other = train.make_optimizer(model, args).param_groups
    assert decay["weight_decay"] == args.weight_decay > 0 and other["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    for name in ("dense_head.pos", "class_embed.weight", "diffusion_pos_dense", "pos_dense", "mask_token",
                 "pivot_placeholder", "blocks.0.a", "norm.weight", "token_embed.bias"):
        assert name not in decayed, name
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decayed == linear and len(decay["params"]) + len(other["params"]) == len(list(model.parameters()))


def test_update_ema_moves_each_parameter_by_one_minus_decay():
    model, ema = himar.HiMAR(himar.preset("tiny")), himar.HiMAR(himar.preset("tiny"))
    before = [e.clone() for e in ema.parameters()]
    train.update_ema(ema, model, 0.9)
    for b, e, p in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_ema_decay_reaches_the_configured_value_at_the_end_of_the_warmup():
    args = train.parse_args(["--preset", "cifar10"])
    assert args.ema_decay == 0.999 and args.warmup_steps == 500
    assert train.ema_decay_at(args, 0) == 0.0
    assert train.ema_decay_at(args, 250) == pytest.approx(0.4995)
    assert all(train.ema_decay_at(args, s) == 0.999 for s in (500, 501, 8699))


def test_the_learning_rate_decays_over_the_time_budget_when_max_minutes_ends_the_run():
    args = train.parse_args(["--preset", "cifar10", "--max-steps", "1000000", "--max-minutes", "20",
                             "--warmup-steps", "10"])
    assert train.learning_rate(args, 5, 0.0) == pytest.approx(args.lr * 6 / 10)  # warm-up by steps
    halfway = train.run_progress(args, 5000, 10 * 60)  # few of the steps, half of the time
    assert halfway == pytest.approx(0.5)
    assert train.learning_rate(args, 5000, halfway) == pytest.approx(args.lr * 0.55)  # cosine midpoint of 1 -> 0.1
    assert train.learning_rate(args, 9000, train.run_progress(args, 9000, 20 * 60)) == pytest.approx(args.lr * 0.1)
    by_steps = train.parse_args(["--preset", "cifar10", "--max-steps", "100"])
    assert train.run_progress(by_steps, 50, 1e6) == 0.5  # no time budget: steps alone


def test_a_checkpoint_without_optimizer_state_is_sampled_but_not_resumed(image_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    model = himar.HiMAR(himar.preset("tiny"))
    checkpoints.save_checkpoint(out / "checkpoint.pt",
                                {"config": himar.asdict(model.cfg), "ema": model.state_dict(), "step": 3})
    with pytest.raises(SystemExit, match="holds no optimizer state"):
        train.main(train_args(image_folder, out, 5) + ["--resume"])


# ----- never losing a user's work, never running a stranger's code -----


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["data_batch_2", "data_batch_5"])
def test_a_tampered_cifar_file_is_refused_and_never_run(tmp_path, name):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "the_command_ran"
    (folder / name).write_bytes(pickle.dumps({b"labels": RunsAShellCommand(marker), b"label_names": []}))
    with pytest.raises(DataError, match=f"{name} is not an official CIFAR-10 file: it holds a posix.system object"):
        load_dataset("cifar10", str(tmp_path), 32)
    assert not marker.exists()


def test_a_fresh_run_never_overwrites_a_run_folder_by_accident(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 6))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="holds a run.*--resume.*--overwrite"):
        train.main(train_args(image_folder, out, 3))
    assert (out / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit):
        train.main(train_args(image_folder, out, 3, "--resume", "--overwrite"))
    # --overwrite with a mistake in the new run's flags or data: it stops before the old run is touched
    for mistake in (["--set", "pivots=bogus"], ["--batch-size", "100000"], ["--data-dir", str(tmp_path / "none")]):
        with pytest.raises(SystemExit):
            train.main(train_args(image_folder, out, 3, "--overwrite", *mistake))
        assert (out / "checkpoint.pt").read_bytes() == before and (out / "samples_0000006.png").exists()
    train.main(train_args(image_folder, out, 3, "--overwrite"))
    assert torch.load(out / "checkpoint.pt")["step"] == 3
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [3]  # the old run's rows are gone
    assert not (out / "samples_0000006.png").exists()


def test_resume_takes_the_runs_own_settings_and_reports_changes(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 3, "--lr", "3e-3", "--seed", "7"))
    train.main(["--out-dir", str(out), "--resume", "--device", "cpu", "--max-steps", "6", "--batch-size", "16"])
    saved = torch.load(out / "checkpoint.pt")["args"]
    assert saved["lr"] == 3e-3 and saved["seed"] == 7 and saved["dataset"] == "folder" and saved["warmup_steps"] == 2
    assert saved["max_steps"] == 6 and saved["batch_size"] == 16 and saved["preset"] == "tiny"
    out_text = capsys.readouterr().out
    assert "--max-steps 6 (the run had 3)" in out_text and "--batch-size 16 (the run had 8)" in out_text
    with pytest.raises(SystemExit, match="trained with --preset tiny, not cifar10"):
        train.main(["--out-dir", str(out), "--resume", "--device", "cpu", "--preset", "cifar10"])
    train.main(["--out-dir", str(out), "--resume", "--device", "cpu"])  # at its --max-steps already: says so
    assert "has made its --max-steps 6: nothing to train" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt")["step"] == 6


class InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_a_non_finite_gradient_or_weight_never_reaches_a_checkpoint(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 3))
    good = (out / "checkpoint.pt").read_bytes()
    forward = himar.HiMAR.forward
    with monkeypatch.context() as m:  # a finite loss whose gradient is infinite
        m.setattr(himar.HiMAR, "forward", lambda self, *a, **k: (InfiniteGradient.apply(forward(self, *a, **k)[0]), {}))
        with pytest.raises(SystemExit, match="gradient became NaN or inf.*Nothing after step 3 was saved"):
            train.main(train_args(image_folder, out, 6, "--resume"))
    assert (out / "checkpoint.pt").read_bytes() == good
    with monkeypatch.context() as m:  # weights gone bad without a bad loss or gradient
        m.setattr(train, "update_ema", lambda ema, model, decay: [p.data.fill_(float("nan")) for p in ema.parameters()])
        with pytest.raises(SystemExit, match="weights became NaN or inf"):
            train.main(train_args(image_folder, out, 6, "--resume"))
    assert (out / "checkpoint.pt").read_bytes() == good
    # sample.py refuses a checkpoint with non-finite weights
    checkpoint = torch.load(out / "checkpoint.pt")
    checkpoint["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                         for k, v in checkpoint["ema"].items()}
    checkpoints.save_checkpoint(tmp_path / "bad.pt", checkpoint)
    with pytest.raises(SystemExit, match="NaN or inf: it cannot generate images"):
        sample.main(["--ckpt", str(tmp_path / "bad.pt"), "--device", "cpu", "--trajectory", ""])


def test_a_second_run_into_a_folder_in_use_stops_and_names_the_first(image_folder, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 4242 on elsewhere")
        holder.flush()
        with pytest.raises(SystemExit, match=r"in use by another training run \(pid 4242 on elsewhere\)"):
            train.main(train_args(image_folder, out, 3))
    train.main(train_args(image_folder, out, 3))  # free again once the first has ended
    assert (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_the_step_and_exit(image_folder, tmp_path, monkeypatch, signum):
    out = tmp_path / "run"
    step = train.training_step
    calls = []

    def interrupted_at_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)  # arrives in the middle of training
        return step(*args)

    monkeypatch.setattr(train, "training_step", interrupted_at_the_fifth)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # not always the defaults: a shell
    with pytest.raises(SystemExit) as e:                                        # may start pytest ignoring SIGINT
        train.main(train_args(image_folder, out, 12))  # checkpoints every 3 steps
    assert e.value.code == 130 and torch.load(out / "checkpoint.pt")["step"] == 5  # the step in flight, finished
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    # a resume drops metric rows past the checkpoint, so none is written twice
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    monkeypatch.setattr(train, "training_step", step)
    train.main(train_args(image_folder, out, 9, "--resume"))
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [3, 5, 6, 9]


def test_checkpoints_are_synced_get_the_users_mode_and_stale_temporary_files_go(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-abc123.pt").write_bytes(b"x" * 1000)  # left by a run killed while saving
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    old_umask = os.umask(0o022)
    try:
        train.main(train_args(image_folder, out, 3))
    finally:
        os.umask(old_umask)
    assert not list(out.glob(".tmp-*")) and synced
    assert (out / "checkpoint.pt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("flags,message", [
    (["--grad-clip", "-1"], "--grad-clip must be > 0"), (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--lr", "0"], "--lr must be > 0"), (["--lr", "-1"], "--lr must be > 0"), (["--device", "foo"], "not a device"),
    (["--max-minutes", "0"], "--max-minutes must be > 0"), (["--ema-decay", "1"], "--ema-decay must be in"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs replays compiled code on a CUDA GPU"),
    (["--cuda-graphs", "--no-compile"], "--cuda-graphs replays compiled code on a CUDA GPU"),
    (["--cuda-graphs", "--device", "cuda", "--micro-batch", "8"],
     "--cuda-graphs does not work with gradient accumulation"),
])
def test_train_flags_are_checked_before_anything_starts(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--per-class", "0"], "--per-class must be a positive"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--grid", "grid.bmp"], "must end in .png or .jpg or .jpeg"),
    (["--trajectory", "t.mp4"], "must end in .png or .gif"),
    (["--num-images", "10"], "--num-images needs --npz"),
    (["--npz", "samples", "--num-images", "4"], "must end in .npz"),
    (["--device", "foo"], "not a device"),
    (["--edit", "missing.png", "--keep", "left"], "--edit missing.png: no such file"),
    (["--edit", "in.png"], "--edit needs --keep REGION, one of left, right"),
    (["--keep", "left"], "--keep needs --edit"),
    (["--edit", "in.png", "--keep", "top", "--per-class", "2"], "does not go with --npz or --per-class"),
])
def test_sample_flags_are_checked_before_the_model_loads(flags, message, monkeypatch):
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit, match=message):
        sample.main(flags)


def test_sample_writes_each_file_whole_or_not_at_all(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 3))
    npz = tmp_path / "samples.npz"
    npz.write_bytes(b"an earlier, good file")

    def killed(path, **arrays):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(np, "savez", killed)
        with pytest.raises(KeyboardInterrupt):
            sample.main(["--ckpt", str(out / "checkpoint.pt"), "--device", "cpu", "--grid", "", "--trajectory", "",
                         "--num-images", "4", "--npz", str(npz)])
    assert npz.read_bytes() == b"an earlier, good file" and [p.name for p in tmp_path.glob(".tmp-*")] == []
    sample.main(["--ckpt", str(out / "checkpoint.pt"), "--device", "cpu", "--grid", "", "--trajectory", "",
                 "--num-images", "4", "--npz", str(npz)])
    assert np.load(npz)["arr_0"].shape == (4, 32, 32, 3) and f"replaced {npz}:" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert npz.stat().st_mode & 0o777 == 0o666 & ~umask  # the user's usual mode, not a temporary file's 0600


@pytest.fixture
def heads_in_range(monkeypatch):
    """Every diffusion head predicts clean tokens inside (-1, 1), tanh of what it computes, and returns the noise
    that goes with them. Random weights predict noise whose clean tokens lie far outside [-1, 1]: the sampler clamps
    them, and the images sit at 0 or 255 almost everywhere, alike for different weights or conditions. With these
    heads (and random_weights) they spread over the pixel values, and a difference between two models or two
    samples shows in the pixels (test_himar.py's in_range, for sample.py's own models)."""
    forward = himar.DiffusionHead.forward

    def predict_noise(self, x, t, z):
        abar = self.diffusion.alpha_bar[t].float().view(-1, 1, 1)
        return (x - abar.sqrt() * torch.tanh(forward(self, x, t, z))) / (1 - abar).sqrt()

    monkeypatch.setattr(himar.DiffusionHead, "forward", predict_noise)


def random_weights(model):
    """Random weights, N(0, 0.3), and N(0, 0.01) in the heads' output layers, which keeps heads_in_range's tanh off
    its flat ends (the initial weights would not do: their heads predict zero noise whatever the condition)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for head in (model.dense_head, model.pivot_head):
            for p in head.output.parameters():
                p.normal_(0, 0.01)
    return model


def saturated(pixels):
    """The fraction of uint8 pixel values at or next to 0 and 255: clamped by the sampler, or on tanh's flat ends."""
    return ((pixels <= 2) | (pixels >= 253)).mean()


def mean_difference(a, b):
    """Of uint8 pixels: float rounding moves one by at most 1 (0.5 on the way to a whole number)."""
    return np.abs(a.astype(float) - b.astype(float)).mean()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny model's checkpoint with random weights (untrained): enough to run sample.py end to end."""
    torch.manual_seed(0)
    model = random_weights(himar.HiMAR(himar.preset("tiny")))
    path = tmp_path / "tiny.pt"
    checkpoints.save_checkpoint(path, {"config": himar.asdict(model.cfg), "model": model.state_dict()})
    return str(path)


def test_sampler_convergence_measures_each_setting_against_the_first(tiny_checkpoint, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import sampler_convergence

    for phase in ("pivot", "dense"):
        rows = sampler_convergence.main(["--ckpt", tiny_checkpoint, "--phase", phase, "--images", "3", "--out",
                                         str(tmp_path / "rows.jsonl"), "--settings", "ddim:uniform:40",
                                         "ddim:uniform:40", "ddim:quadratic:6", "dpm2m:quadratic:6"])
        # DDIM is deterministic: the same setting gives the same images, another setting others
        assert [r["from_reference"] for r in rows[:2]] == [0, 0]
        assert all(r["from_reference"] > 0 for r in rows[2:]) and rows[2]["from_reference"] != rows[3]["from_reference"]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 8
    for bad in ("ddim:uniform", "ddim:log:5", "euler:uniform:5", "ddim:uniform:0"):
        with pytest.raises(SystemExit, match="SAMPLER:SPACING:STEPS|the sampler is one of"):
            sampler_convergence.main(["--ckpt", tiny_checkpoint, "--phase", "dense", "--settings", bad])


def test_export_keeps_the_ema_weights_in_bf16_and_never_replaces_a_training_checkpoint(tiny_checkpoint, tmp_path,
                                                                                        capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import export_checkpoint

    training = tmp_path / "training.pt"  # as train.py writes it: the weights, their EMA, the optimizer's state
    saved = torch.load(tiny_checkpoint)
    checkpoints.save_checkpoint(training, {**saved, "ema": saved["model"], "optimizer": {"state": {}}, "step": 5})
    before = training.read_bytes()
    export_checkpoint.main([str(training), str(tmp_path / "out.pt"), "--set", "pivot_cfg=7"])
    out = torch.load(tmp_path / "out.pt")
    assert set(out) == {"config", "ema", "step"} and out["step"] == 5 and out["config"]["sampling"]["pivot_cfg"] == 7
    assert all(v.dtype == torch.bfloat16 for v in out["ema"].values() if v.is_floating_point())
    for argv, says in ([[str(training), str(training)], "is a training checkpoint"],  # its only copy: refused
                       [[str(training), str(tmp_path / "o.pt"), "--set", "pivot_cfg=-1"], "pivot_cfg must be"],
                       [[str(training), str(tmp_path / "o.pt"), "--set", "depth=2"], "only sampling settings"],
                       [[str(training), str(tmp_path)], "must end in .pt"]):
        with pytest.raises(SystemExit) as stopped:
            export_checkpoint.main(argv)
        assert says in str(stopped.value.code) + capsys.readouterr().err
    assert training.read_bytes() == before
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint at"):  # (the script prints it as an error)
        export_checkpoint.main([str(tmp_path / "missing.pt"), str(tmp_path / "o.pt")])


def test_the_scripts_stop_on_bad_counts_and_paths_before_they_sample(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import sampling_sweep

    def sweep(*flags):
        monkeypatch.setattr(sys, "argv", ["sampling_sweep.py", "--ckpt", tiny_checkpoint, "--device", "cpu", *flags])
        with pytest.raises(SystemExit) as stopped, sample.errors_for_people():
            sampling_sweep.main()
        return str(stopped.value.code) + capsys.readouterr().err  # (sys.exit's message, or argparse's)

    assert "must be a positive whole number, got 0" in sweep("--num-images", "0")
    assert "must be a positive whole number, got -1" in sweep("--batch-size", "-1")
    assert "no such file" in sweep("--scorer", str(tmp_path / "nothing.py"))
    assert "is a folder" in sweep("--out", str(tmp_path))
    assert "take true or false" in sweep("--settings", '{"drop_pivots": "yes"}')
    assert "no checkpoint at" in sweep("--ckpt", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="did not print its JSON line.*boom"):  # a scorer that fails says why
        (tmp_path / "bad_scorer.py").write_text("raise SystemExit('boom')\n")
        sampling_sweep.score(str(tmp_path / "bad_scorer.py"), np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2), "cpu")


def write_picture(path, size=32):
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_sample_edit_writes_one_named_row_per_label_the_input_the_kept_region_and_the_edit(
        tiny_checkpoint, tmp_path, capsys, heads_in_range):
    pixels = write_picture(tmp_path / "in.png")
    grid, trajectory = tmp_path / "edits.png", tmp_path / "t.png"
    sample.main(["--ckpt", tiny_checkpoint, "--edit", str(tmp_path / "in.png"), "--keep", "left",
                 "--labels", "0", "3", "3", "--grid", str(grid), "--trajectory", str(trajectory), "--device", "cpu"])
    shown = np.asarray(Image.open(grid))[..., :3]
    assert shown.shape[0] == 3 * 34 + 2 and shown.shape[1] > 3 * 34 + 2 + 30  # 3 rows of 3 (32 px + gaps), names
    right = shown[:, -(3 * 34 + 2):]  # the grid, at the right of its row names
    rows = [[right[2 + 34 * r:34 + 34 * r, 2 + 34 * i:34 + 34 * i] for i in range(3)] for r in range(3)]
    for given, kept, edit in rows:  # each row: the input, the kept region, the edit
        assert (given == pixels).all()
        assert (kept[:, :16] == pixels[:, :16]).all() and (kept[:, 16:] == [255, 0, 255]).all()  # the rest magenta
        assert (edit[:, :16] == pixels[:, :16]).all()  # each edit keeps the left half exactly
    assert saturated(rows[1][2][:, 16:]) < 0.05  # (guidance pushes a few to the ends)
    assert mean_difference(rows[1][2][:, 16:], rows[2][2][:, 16:]) > 3  # a class asked for twice: two completions
    margin = shown[:, :-(3 * 34 + 2)]
    assert all((margin[2 + 34 * r:34 + 34 * r] < 128).any() for r in range(3))  # each row named ("as cat")
    assert "as each of classes 0 3 3" in capsys.readouterr().out and trajectory.exists()
    assert sample.parse_args(["--edit", "in.png", "--keep", "left"]).grid == "edits.png"  # not the class grid's name
    assert sample.parse_args([]).grid == "samples.png"
    edit_defaults = sample.parse_args(["--edit", "in.png", "--keep", "left"])  # an edit keeps a plain run's trajectory
    assert edit_defaults.trajectory == "edit_trajectory.png" and sample.parse_args([]).trajectory == "trajectory.png"


def test_sample_edit_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(SystemExit, match="notes.png could not be read as an image"):
        sample.main(["--ckpt", tiny_checkpoint, "--edit", str(tmp_path / "notes.png"), "--keep", "left",
                     "--device", "cpu"])
    write_picture(tmp_path / "big.png", size=64)
    with pytest.raises(SystemExit, match="big.png is 64x64 pixels; this checkpoint's model edits 32x32 images"):
        sample.main(["--ckpt", tiny_checkpoint, "--edit", str(tmp_path / "big.png"), "--keep", "left",
                     "--device", "cpu", "--grid", str(tmp_path / "edits.png")])
    assert not (tmp_path / "edits.png").exists()
    with pytest.raises(SystemExit):
        sample.main(["--edit", str(tmp_path / "big.png"), "--keep", "middle"])
    assert "argument --keep: invalid choice: 'middle'" in capsys.readouterr().err


@pytest.mark.parametrize("region,share,kept,generated", [
    ("left", 0.5, (0, 0), (0, 31)), ("right", 0.5, (0, 31), (0, 0)), ("top", 0.5, (0, 31), (31, 0)),
    ("bottom", 0.5, (31, 0), (0, 0)), ("center", 0.25, (16, 16), (0, 0)), ("border", 0.75, (0, 0), (16, 16)),
])
def test_edit_regions_keep_whole_tokens(region, share, kept, generated):
    for patch in (2, 4):
        keep = sample.keep_mask(region, 32, patch)  # [H, W], True = kept
        assert keep.shape == (32, 32) and keep.float().mean() == share and keep[kept] and not keep[generated]
        assert (himar.whole_patches(keep[None], patch) == ~himar.whole_patches(~keep[None], patch)).all()


def test_hidden_files_in_an_image_folder_are_skipped(image_folder):
    Path(image_folder, "class0", "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    assert len(load_dataset("folder", image_folder, 32).labels) == 64


def test_show_grid_draws_every_image_with_its_title_and_blanks_short_rows():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = torch.rand(3, 3, 8, 8) * 2 - 1
    axes = pictures.show_grid([images, images[:2]], titles=[["a", "b", "c"], ["d", "e"]], row_names=["one", "two"])
    assert axes.shape == (2, 3)
    assert [[ax.get_title() for ax in row] for row in axes] == [["a", "b", "c"], ["d", "e", ""]]
    assert not axes[1, 2].axison and axes[1, 1].axison  # the short row's missing image is blank
    assert axes[0, 0].get_ylabel() == "one" and axes[1, 0].get_ylabel() == "two"
    drawn = axes[0, 1].get_images()[0].get_array()
    assert np.allclose(drawn, pictures.picture(images[1]))  # drawn with picture: [-1, 1] -> [0, 1]
    top_only = pictures.show_grid([images, images], titles=["x", "y", "z"])
    assert [ax.get_title() for ax in top_only[0]] == ["x", "y", "z"] and all(ax.get_title() == "" for ax in top_only[1])
    plt.close("all")


def test_the_token_grid_lines_fall_between_the_tokens():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    pictures.draw_token_grid(ax, 32, 8, color="white")  # 8 x 8 tokens of 4 x 4 pixels
    lines = ax.get_lines()
    rows = sorted(line.get_ydata()[0] for line in lines if line.get_ydata()[0] == line.get_ydata()[1])
    assert rows == [4 * k - 0.5 for k in range(1, 8)] and len(lines) == 14  # 7 between the rows, 7 between columns
    assert all(line.get_color() == "white" and line.get_linewidth() == 0.6 for line in lines)
    plt.close(fig)


def test_the_outline_of_revealed_tokens_is_their_border_one_line_per_straight_stretch():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def outline(revealed, s=2):
        fig, ax = plt.subplots()
        pictures.outline_revealed(ax, torch.tensor(revealed, dtype=torch.bool), s)
        black, yellow = ax.collections  # black under yellow, the same lines
        lines = {tuple(map(tuple, line)) for line in yellow.get_segments()}
        assert lines == {tuple(map(tuple, line)) for line in black.get_segments()}
        plt.close(fig)
        return lines

    p = lambda k: 2 * k - 0.5  # grid line k, 2 pixels per token
    block = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]  # a 2x2 block: its square, 4 lines, not 8 token sides
    assert outline(block) == {((p(0), p(0)), (p(2), p(0))), ((p(0), p(2)), (p(2), p(2))),
                              ((p(0), p(0)), (p(0), p(2))), ((p(2), p(0)), (p(2), p(2)))}
    assert len(outline([[1] * 4] * 4)) == 4  # the whole map: its frame
    assert len(outline([[1, 0], [0, 1]])) == 6  # two tokens corner to corner: their shared corner lines run on
    assert len(outline([[1, 0, 1]])) == 8 and outline([[0, 0]]) == set()  # apart: two squares; none: nothing
    assert pictures.runs(np.array([1, 1, 0, 1, 0, 0, 1])) == [(0, 2), (3, 4), (6, 7)]


def test_save_grid_names_its_rows_on_the_left_and_keeps_the_plain_grid_without_names(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1  # 2 rows of 3, the second short
    pictures.save_grid(images, 3, tmp_path / "plain.png")
    plain = np.asarray(Image.open(tmp_path / "plain.png"))[..., :3]
    expected = np.full((2 * 10 + 2, 3 * 10 + 2, 3), 255, dtype=np.uint8)  # white, 2-pixel gaps
    for i, tile in enumerate(pictures.to_uint8(images)):
        expected[2 + 10 * (i // 3):10 + 10 * (i // 3), 2 + 10 * (i % 3):10 + 10 * (i % 3)] = tile
    assert (plain == expected).all()  # the pixels alone, exactly as before row names existed

    pictures.save_grid(images, 3, tmp_path / "named.png", row_names=["airplane", "cat"])
    named = np.asarray(Image.open(tmp_path / "named.png"))[..., :3]
    assert named.shape[0] == plain.shape[0] and named.shape[1] > plain.shape[1] + 30  # a margin for the names
    assert (named[:, -plain.shape[1]:] == plain).all()  # the grid itself, unscaled, at the right
    margin = named[:, :-plain.shape[1]]
    for row in range(2):  # dark pixels (the name) in each row's band of the margin
        assert (margin[2 + 10 * row:10 + 10 * row] < 128).any()
    with pytest.raises(ValueError, match="3 row names for a grid of 2 rows"):
        pictures.save_grid(images, 3, tmp_path / "wrong.png", row_names=["a", "b", "c"])
    assert pictures.class_names([0, 9], 10) == ["airplane", "truck"] and pictures.class_names([2], 4) == ["class 2"]


def test_the_class_grid_of_sample_py_names_its_rows(tiny_checkpoint, tmp_path):
    grid = tmp_path / "grid.png"
    sample.main(["--ckpt", tiny_checkpoint, "--labels", "3", "5", "--per-class", "2", "--grid", str(grid),
                 "--trajectory", "", "--device", "cpu"])
    shown = np.asarray(Image.open(grid))[..., :3]
    assert shown.shape[0] == 2 * 34 + 2 and shown.shape[1] > 2 * 34 + 2 + 20  # 2 rows, the names at their left
    margin = shown[:, :-(2 * 34 + 2)]
    assert all((margin[2 + 34 * row:34 + 34 * row] < 128).any() for row in range(2))


def test_ddp_ranks_stop_with_a_message_when_rank_0_cannot_read_the_data(tmp_path):
    result = torchrun_two_cpu_processes(["--preset", "tiny", "--dataset", "folder",
                                         "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "run"),
                                         "--device", "cpu", "--max-steps", "2"])
    assert result.returncode != 0
    assert "rank 1: rank 0 could not read the data set" in result.stderr
    assert "[rank1]: Traceback" not in result.stderr  # the launcher's own report aside, no rank prints a traceback


def test_sample_draws_the_ema_or_the_raw_weights_as_asked(tmp_path, capsys, heads_in_range):
    torch.manual_seed(0)
    raw, ema = himar.HiMAR(himar.preset("tiny")), himar.HiMAR(himar.preset("tiny"))
    random_weights(raw), random_weights(ema)  # two sets of weights that draw different images
    path = tmp_path / "run.pt"
    checkpoints.save_checkpoint(path, {"config": himar.asdict(raw.cfg), "model": raw.state_dict(),
                                       "ema": ema.state_dict()})
    grids = {}
    for weights in ("ema", "model"):
        npz = tmp_path / f"{weights}.npz"
        sample.main(["--ckpt", str(path), "--weights", weights, "--num-images", "4", "--npz", str(npz), "--grid", "",
                     "--trajectory", "", "--device", "cpu"])
        grids[weights] = np.load(npz)["arr_0"]
        assert f"({weights} weights)" in capsys.readouterr().out
    assert saturated(grids["ema"]) < 0.01 and saturated(grids["model"]) < 0.01
    assert mean_difference(grids["ema"], grids["model"]) > 3
    exported = tmp_path / "exported.pt"  # EMA weights only, as scripts/export_checkpoint.py writes
    checkpoints.save_checkpoint(exported, {"config": himar.asdict(raw.cfg), "ema": ema.state_dict()})
    with pytest.raises(SystemExit, match="no 'model' weights"):
        sample.main(["--ckpt", str(exported), "--weights", "model", "--grid", str(tmp_path / "g.png"),
                     "--trajectory", "", "--device", "cpu"])


# ----- a run folder no one can turn against its user, metrics that never block a resume, no stop request ignored -----


def blank_samples(monkeypatch):
    """Training's sample grids drawn blank, at once: tests about files need no pictures (and sampling takes time)."""
    monkeypatch.setattr(himar.HiMAR, "sample",
                        lambda self, labels, *args, **kwargs: torch.zeros(len(labels), 3, 32, 32))


@pytest.mark.parametrize("name", [".lock", "checkpoint.pt", "metrics.jsonl", "loss.png", "samples_0000001.png"])
def test_a_link_in_the_run_folder_is_refused_and_never_written_through(image_folder, tmp_path, name):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("the user's own file")
    (out / name).symlink_to(victim)  # planted by anyone who can write in a shared run folder
    with pytest.raises(SystemExit, match=f"{name} is a link"):
        train.main(train_args(image_folder, out, 1, "--overwrite"))
    assert victim.read_text() == "the user's own file"


def test_a_link_planted_during_a_run_is_replaced_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    for name in ("grid.png", "checkpoint.pt", "metrics.jsonl"):
        (tmp_path / name).symlink_to(victim)
    pictures.save_grid(torch.zeros(2, 3, 8, 8), 2, tmp_path / "grid.png")
    checkpoints.save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    with pytest.raises(OSError):  # the metrics are appended, and never through a link
        train.append_metrics(tmp_path / "metrics.jsonl", {"step": 1})
    assert victim.read_text() == "the user's own file"
    assert not (tmp_path / "grid.png").is_symlink() and not (tmp_path / "checkpoint.pt").is_symlink()


def test_a_fresh_run_never_mixes_with_the_files_of_a_run_that_saved_no_checkpoint(image_folder, tmp_path, monkeypatch):
    blank_samples(monkeypatch)
    out = tmp_path / "run"  # a run stopped by a NaN, or killed, before its first save
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / "samples_0000009.png").write_bytes(b"an old grid")
    with pytest.raises(SystemExit, match=r"saved no checkpoint \(metrics.jsonl, samples_0000009.png\).*--overwrite"):
        train.main(train_args(image_folder, out, 1))
    assert (out / "samples_0000009.png").exists()
    train.main(train_args(image_folder, out, 1, "--overwrite"))
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]  # the old rows are gone
    assert not (out / "samples_0000009.png").exists()


def test_a_torn_metrics_line_never_stops_a_resume_and_a_failed_append_leaves_none(tmp_path, monkeypatch):
    log, rows = tmp_path / "metrics.jsonl", '{"step": 3, "loss": 0.9}\n{"step": 6, "loss": 0.8}\n'
    log.write_text(rows + '{"step": 9, "loss": 0.94, "pivot": ')  # a write cut short by a full disk
    train.plot_losses(log, tmp_path / "loss.png")
    train.drop_rows_after(log, 6)  # what --resume does with a checkpoint of step 6
    assert log.read_text() == rows
    write = os.write

    def disk_full(fd, data):
        write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", disk_full)
        with pytest.raises(OSError, match="No space left"):
            train.append_metrics(log, {"step": 9, "loss": 0.7})
    assert log.read_text() == rows  # the half-written row was taken back


def test_each_save_keeps_the_one_before_and_a_stopped_run_says_truly_what_it_saved(image_folder, tmp_path, monkeypatch):
    blank_samples(monkeypatch)
    out = tmp_path / "run"
    train.main(train_args(image_folder, out, 2, "--ckpt-every", "1"))  # saves at steps 1 and 2
    assert torch.load(out / "checkpoint.pt")["step"] == 2 and torch.load(out / "checkpoint.prev.pt")["step"] == 1
    forward = himar.HiMAR.forward
    with monkeypatch.context() as m:  # a NaN after step 2: that save may already hold diverging (finite) weights
        m.setattr(himar.HiMAR, "forward", lambda self, *a, **k: (forward(self, *a, **k)[0] * float("nan"), {}))
        with pytest.raises(SystemExit) as e:
            train.main(train_args(image_folder, out, 3, "--resume"))
    message = str(e.value)
    assert f"Nothing after step 2 was saved: {out / 'checkpoint.pt'} holds step 2" in message
    assert f"mv {out / 'checkpoint.prev.pt'} {out / 'checkpoint.pt'}" in message and "not touched" not in message
    assert "No checkpoint was saved: start again with --overwrite" in train.diverged("NaN", None, str(out))

    def disk_full(checkpoint, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    message = r"could not write in .* after step 3 \(No space left on device\).*holds step 2"
    with pytest.raises(SystemExit, match=message):
        train.main(train_args(image_folder, out, 4, "--resume", "--ckpt-every", "1"))
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt")["step"] == 2


def test_sampling_refuses_non_finite_settings_and_never_writes_non_finite_samples(tiny_checkpoint, tmp_path,
                                                                                  monkeypatch):
    grid, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    run = ["--ckpt", tiny_checkpoint, "--device", "cpu", "--trajectory", ""]
    for flags, message in ((["--pivot-cfg", "inf"], "pivot_cfg must be a finite number >= 0, got inf"),
                           (["--temperature", "nan"], "temperature must be a finite number > 0, got nan")):
        with pytest.raises(SystemExit, match=message):
            sample.main(run + ["--grid", str(grid), *flags])
    def gone_bad(self, labels, *args, trajectory=False, **kwargs):  # as diverged weights, or --dense-cfg 1e300, sample
        images = torch.full((len(labels), 3, 32, 32), float("nan"))
        return (images, []) if trajectory else images

    monkeypatch.setattr(himar.HiMAR, "sample", gone_bad)
    message = "4 of 4 generated images hold NaN or inf values, so they were not written"
    for flags in (["--grid", str(grid), "--labels", "0", "1"], ["--grid", "", "--num-images", "4", "--npz", str(npz)]):
        with pytest.raises(SystemExit, match=message):
            sample.main(run + flags)
    assert not grid.exists() and not npz.exists()
    with pytest.raises(pictures.NonFiniteImages):
        pictures.to_uint8(torch.tensor([[[[0.5, float("nan")]]]]))


@pytest.mark.parametrize("setting,message", [
    ("depth=0", "depth must be a whole number >= 1, got 0"), ("depth=-1", "depth must be a whole number >= 1, got -1"),
    ("class_dropout=2", "class_dropout must be a probability, in [0, 1], got 2.0"),
    ("mask_ratio_std=-1", "mask_ratio_std must be a finite number >= 0, got -1.0"),
    ("mask_ratio_min=1.5", "mask_ratio_min must be a number in [0, 1), got 1.5"),  # MAR's ratio loop would never end
    ("mask_ratio_min=nan", "mask_ratio_min must be a number in [0, 1), got nan"),
    ("scale_vector=maybe", "scale_vector must be true or false"),
    ("patch_size=0", "patch_size must be a whole number"),
    ("width=0", "width must be a whole number >= 1"), ("num_heads=0", "num_heads must be a whole number >= 1"),
    ("mlp_ratio=nan", "mlp_ratio must be a finite number > 0"), ("dropout=1.5", "dropout must be a number in [0, 1)"),
    ("buffer_tokens=-1", "buffer_tokens must be a whole number >= 1"), ("channels=1", "RGB, so channels must be 3"),
])
def test_every_config_field_is_checked_with_a_one_line_message(setting, message):
    with pytest.raises(SystemExit) as e:
        train.config_from_args(train.parse_args(["--preset", "tiny", "--set", setting]))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], "--seed must be a whole number from 0 to 2**63 - 1, got -1"),
    (["--seed", str(10**20)], "--seed must be a whole number from 0"),
    (["--micro-batch", str(10**20)], f"--micro-batch {10**20} is more than the batch (--batch-size 32)"),
    (["--lr", "1e300"], "--lr must be > 0 and at most 1"), (["--lr", "inf"], "--lr must be > 0 and at most 1"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite, got inf"),
    (["--max-steps", "100", "--keep-at", "50", "150"],
     "--keep-at takes step numbers from 1 to --max-steps, got [50, 150]"),
])
def test_flags_out_of_range_get_a_one_line_error(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", *flags])
    assert message in capsys.readouterr().err


def test_sighup_saves_and_stops_and_a_second_stop_request_stops_at_once(image_folder, tmp_path, monkeypatch, capsys):
    step = train.training_step

    def at_the_second_step(*signals):  # training_step, with these signals arriving in the middle of the second
        calls = []

        def training_step(*args):
            calls.append(1)
            if len(calls) == 2:
                for s in signals:
                    os.kill(os.getpid(), s)
            return step(*args)

        return training_step

    hangup = signal.signal(signal.SIGHUP, lambda *a: pytest.fail("SIGHUP was left to kill the run"))
    try:
        monkeypatch.setattr(train, "training_step", at_the_second_step(signal.SIGHUP))
        with pytest.raises(SystemExit) as e:
            train.main(train_args(image_folder, tmp_path / "hangup", 6))
        assert e.value.code == 130 and torch.load(tmp_path / "hangup" / "checkpoint.pt")["step"] == 2
        monkeypatch.setattr(train, "training_step", at_the_second_step(signal.SIGTERM, signal.SIGTERM))
        with pytest.raises((SystemExit, KeyboardInterrupt)) as e:
            train.main(train_args(image_folder, tmp_path / "twice", 6))
        assert e.type is SystemExit and e.value.code == 130 and not (tmp_path / "twice" / "checkpoint.pt").exists()
        assert "SIGTERM again: stopped at once, without saving" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGHUP, hangup)


class ClaimsTooMuch:
    """Unpickles as a numpy array of 10^15 bytes: a CIFAR file whose array header claims far more than it holds."""

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(1, np.uint8))[0], (np.ndarray, (10**15,), b"b")


def test_data_files_that_claim_too_much_or_hold_bad_labels_or_odd_shapes_get_a_sentence(tmp_path, image_folder):
    folder = write_cifar(tmp_path / "cifar")
    batch = cifar_batch(0)
    batch[b"labels"] = [0, 1, 10]
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_1.*its labels must be classes 0\.\.9, got 0\.\.10"):
        load_dataset("cifar10", str(tmp_path / "cifar"), 32)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": ClaimsTooMuch(), b"labels": [0]}, protocol=4))
    with pytest.raises(DataError, match="data_batch_1: it asks for more memory than this machine has"):
        load_dataset("cifar10", str(tmp_path / "cifar"), 32)
    (tmp_path / "imagenet").mkdir()
    with zipfile.ZipFile(tmp_path / "imagenet" / "train_data_batch_1.npz", "w") as zf:
        with zf.open("data.npy", "w") as f:  # a header that claims 10^13 images, and no pixels
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**13, 12288)})
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.ones(10, np.int64))
    with pytest.raises(DataError, match="claims 10000000000000 images, more than the file holds"):
        load_dataset("imagenet64", str(tmp_path / "imagenet"), 64)
    Image.new("RGB", (2, 100)).save(Path(image_folder, "class0", "narrow.png"))  # would be enlarged to 32x1600
    with pytest.raises(DataError, match="narrow.png is 2x100 pixels"):
        load_dataset("folder", image_folder, 32)


def untrained_run(out, data_dir, dataset="folder", **changes):
    """The checkpoint of a tiny run in `out` that has not trained yet, as train.py saves it, with `changes`."""
    args = train.parse_args(["--preset", "tiny", "--dataset", dataset, "--data-dir", str(data_dir),
                             "--out-dir", str(out)])
    model = himar.HiMAR(himar.preset("tiny"))
    checkpoint = {"config": himar.asdict(model.cfg), "model": model.state_dict(), "ema": model.state_dict(),
                  "optimizer": train.make_optimizer(model, args).state_dict(), "step": 0,
                  "rng": {"cpu": [torch.get_rng_state()], "cuda": []}, "args": vars(args)}
    checkpoints.save_checkpoint(out / "checkpoint.pt", {**checkpoint, **changes})


def test_train_says_in_a_sentence_what_is_wrong_with_a_checkpoint_a_folder_or_the_memory(image_folder, tmp_path,
                                                                                          tiny_checkpoint, monkeypatch):
    out, resume = tmp_path / "run", ["--out-dir", str(tmp_path / "run"), "--resume", "--device", "cpu"]
    for changes, message in (({"step": -5}, "its step is -5"), ({"rng": {}}, "holds no random-number state")):
        untrained_run(out, image_folder, **changes)
        with pytest.raises(SystemExit, match=message):
            train.main(resume)
    untrained_run(out, tmp_path / "moved", dataset="cifar10")  # its data folder has moved since
    message = "data folder .*moved is not there any more: give its new place with --data-dir"
    with pytest.raises(SystemExit, match=message):
        train.main(resume)
    assert not (tmp_path / "moved").exists()  # not made, and nothing downloaded into it
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot use --out-dir .*a_file as the run folder"):
        train.main(train_args(image_folder, tmp_path / "a_file", 1))
    with pytest.raises(SystemExit, match="--batch-size 50001 is more than the 64 images"):
        train.main(train_args(image_folder, tmp_path / "big_batch", 1, "--batch-size", "50001"))

    def too_large(self, cfg):  # what torch raises for a config of width 400,000
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 640000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(himar.HiMAR, "__init__", too_large)
    with pytest.raises(SystemExit, match="does not fit in the memory of cpu"):
        train.main(train_args(image_folder, tmp_path / "wide", 1))
    with pytest.raises(SystemExit, match="does not fit in the memory of cpu: is it the right file"):
        sample.main(["--ckpt", tiny_checkpoint, "--device", "cpu"])


@pytest.mark.parametrize("flags,message", [
    (["--device", "cpu:7"], "--device cpu:7: there is no such device"),
    (["--grid", "{folder}"], "--grid .*folder.png is a folder"),
    (["--edit", "{folder}", "--keep", "left"], "--edit .*folder.png is a folder"),
])
def test_sample_names_the_flag_at_fault_before_the_model_loads(flags, message, tmp_path, monkeypatch):
    (tmp_path / "folder.png").mkdir()
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit, match=message):
        sample.main([flag.format(folder=tmp_path / "folder.png") for flag in flags])


def test_sample_edit_checks_a_pictures_size_before_decoding_it(tiny_checkpoint, tmp_path, monkeypatch):
    from PIL import ImageFile

    write_picture(tmp_path / "big.png", size=64)
    edit = ["--ckpt", tiny_checkpoint, "--edit", str(tmp_path / "big.png"), "--keep", "left", "--device", "cpu"]
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before its size was checked"))
    with pytest.raises(SystemExit, match="is 64x64 pixels; this checkpoint's model edits 32x32 images"):
        sample.main(edit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL calls it a decompression bomb
    with pytest.raises(SystemExit, match=r"big.png could not be read as an image \(DecompressionBombError\)"):
        sample.main(edit)


def test_sample_leaves_no_temporary_file_after_a_kill_or_a_sigterm(tiny_checkpoint, tmp_path):
    stale = tmp_path / ".tmp-99999999-abc123"  # left by a sample.py killed while writing (no such process now)
    stale.mkdir()
    (stale / "samples.npz").write_bytes(b"half a file")
    sample.main(["--ckpt", tiny_checkpoint, "--device", "cpu", "--grid", "", "--trajectory", "", "--num-images", "2",
                 "--npz", str(tmp_path / "samples.npz")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz", "tiny.pt"]
    with pytest.raises(KeyboardInterrupt), sample.stopped_like_ctrl_c():  # SIGTERM: the clean-ups run, as on Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
