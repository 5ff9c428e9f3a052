"""Pictures of images and of generation: the PNG grids that train.py and sample.py write, the unmasking figure, and
the grids the notebooks draw. Images are [C, H, W] or [B, C, H, W] tensors in [-1, 1]; tokens not yet revealed (or
not given) are painted magenta everywhere, and the tokens revealed at a step are outlined."""

import math

import numpy as np
import torch

import checkpoints

MAGENTA = torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)  # tokens not given or not yet revealed, in the pictures



class NonFiniteImages(ValueError):
    """Generated images with NaN or inf values (diverged weights, or extreme sampling settings): never written."""


def to_uint8(images):
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (numpy); NonFiniteImages if any value is NaN or inf (which
    would otherwise come out as black or white pixels that look like a picture)."""
    bad = int((~torch.isfinite(images.float())).flatten(1).any(dim=1).sum())
    if bad:
        raise NonFiniteImages(f"{bad} of {len(images)} generated images hold NaN or inf values")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def neighbour_difference(images):
    """How grainy images [B, C, H, W] in [-1, 1] are: the mean |difference| between horizontally and vertically
    adjacent pixels, the two directions averaged (notebook 5 and scripts/sampler_convergence.py compare samples
    with real images by it)."""
    across = (images[..., 1:] - images[..., :-1]).abs().mean()
    down = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return 0.5 * float(across + down)


def save_grid(images, ncol, path, pad=2, row_names=None):
    """Save images [N, C, H, W] in [-1, 1] as one PNG, ncol images per row, with white gaps; written whole (see
    `written`), and not at all if an image holds NaN or inf (NonFiniteImages). row_names (one per row): each row's
    name written at its left (with matplotlib, 10 pt at 110 dpi), the grid's pixels drawn unscaled beside them; without
    them, the grid's pixels alone."""
    import matplotlib.pyplot as plt

    pictures = to_uint8(images)
    n, h, w, c = pictures.shape
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, picture in enumerate(pictures):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top:top + h, left:left + w] = picture
    with checkpoints.written(path) as tmp:
        if row_names is None:
            plt.imsave(tmp, grid)
        else:
            labelled_grid(grid, list(row_names), h + pad, pad).savefig(tmp, dpi=LABEL_DPI, facecolor="white")


LABEL_DPI, LABEL_POINTS = 110, 10  # the row names of a labelled grid: 10 pt at 110 dpi, about 15 pixels high


def labelled_grid(grid, row_names, row_height, pad):
    """A matplotlib figure: the grid [H, W, C] uint8 at its own pixels (figimage: not resampled), with each row's
    name right-aligned in a white margin at its left."""
    from matplotlib.figure import Figure
    from matplotlib.textpath import TextPath
    from matplotlib.font_manager import FontProperties

    if len(row_names) != (grid.shape[0] - pad) // row_height:
        raise ValueError(f"{len(row_names)} row names for a grid of {(grid.shape[0] - pad) // row_height} rows")
    font = FontProperties(size=LABEL_POINTS)
    widest = max(TextPath((0, 0), str(name), prop=font).get_extents().width for name in row_names)  # in points
    margin = int(math.ceil(widest * LABEL_DPI / 72)) + 12  # pixels
    height, width = grid.shape[:2]
    fig = Figure(figsize=((width + margin) / LABEL_DPI, height / LABEL_DPI), dpi=LABEL_DPI, facecolor="white")
    fig.figimage(grid if grid.shape[2] == 3 else grid[..., :3], xo=margin, yo=0, origin="upper")
    for r, name in enumerate(row_names):
        middle = height - (pad + r * row_height + (row_height - pad) / 2)  # pixels from the bottom
        fig.text((margin - 5) / (width + margin), middle / height, str(name), ha="right", va="center",
                 fontsize=LABEL_POINTS, color="black")
    return fig


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_names(labels, num_classes):
    """Names for class indices: CIFAR-10's for a 10-class model, else "class k"."""
    return [CIFAR10_CLASSES[k] if num_classes == 10 else f"class {k}" for k in labels]


def masked(images, masks):
    """Images [B, C, h, w] with the tokens where masks [B, h/p, w/p] are True painted magenta."""
    p = images.shape[-1] // masks.shape[-1]
    hidden = masks.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]  # [B, 1, h, w]
    return torch.where(hidden, MAGENTA, images)


def unmasked_picture(frame):
    """A trajectory frame as uint8 pictures [B, H, W, 3] at full size: masked tokens magenta, pivots upsampled."""
    image = masked(frame["image"], frame["mask"])  # [B, 3, h, w]
    if frame["phase"] == "pivot":
        image = image.repeat_interleave(2, 2).repeat_interleave(2, 3)
    return to_uint8(image)


def picture(image, mask=None):
    """One image [C, h, w] in [-1, 1] as [h, w, 3] values in [0, 1] for matplotlib's imshow; with a token mask
    [h/p, w/p] (True = not yet revealed), those tokens magenta. The notebooks draw with it."""
    if mask is not None:
        image = masked(image[None], mask[None])[0]
    return ((image.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def draw_token_grid(ax, pixels, tokens, **style):
    """Lines between the tokens of a picture drawn pixels x pixels by imshow, cut into tokens x tokens tokens (thin
    grey unless `style` says otherwise): the 16 x 16 dense tokens or the 8 x 8 pivots of the notebooks' pictures."""
    style = {"color": "0.5", "lw": 0.6, **style}
    for k in range(1, tokens):
        ax.axhline(k * pixels / tokens - 0.5, **style)  # imshow's pixel k spans k - 0.5 to k + 0.5
        ax.axvline(k * pixels / tokens - 0.5, **style)


def outline_revealed(ax, revealed, pixels_per_token):
    """Outline, on an imshow axis, the tokens revealed at this step (revealed [h/p, w/p] bool): the border of the
    region they cover, yellow over black, so that it shows on light and on dark pixels alike. A lone token gets a
    square; neighbouring tokens one outline around them all (a step that reveals the whole map: its frame). Each
    straight stretch of the border is one line, so that no joint shows along it."""
    from matplotlib.collections import LineCollection

    inside = np.pad(np.asarray(revealed, dtype=bool), 1)  # False around the map
    across = inside[:-1, 1:-1] != inside[1:, 1:-1]  # [rows + 1, cols]: on grid line k, revealed on one side only
    down = inside[1:-1, :-1] != inside[1:-1, 1:]  # [rows, cols + 1]: the same across the columns' grid lines
    at = lambda k: k * pixels_per_token - 0.5  # grid line k in imshow's pixel coordinates
    lines = [[(at(a), at(k)), (at(b), at(k))] for k, row in enumerate(across) for a, b in runs(row)]
    lines += [[(at(k), at(a)), (at(k), at(b))] for k, column in enumerate(down.T) for a, b in runs(column)]
    for colour, width, z in zip(("black", "yellow"), OUTLINE_POINTS, (3, 4)):  # black under yellow
        ax.add_collection(LineCollection(lines, colors=colour, linewidths=width, capstyle="projecting", zorder=z,
                                         clip_on=False), autolim=False)  # (unclipped: whole on the picture's border)


def runs(flags):
    """(start, end) of each run of True in a 1-D bool array, the end excluded."""
    change = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(flags, dtype=int), [0]])))
    return list(zip(change[::2].tolist(), change[1::2].tolist()))


OUTLINE_POINTS = (2.4, 1.0)  # the widths of the outline's black and yellow lines


def show_grid(rows, titles=None, row_names=None, size=1.2):
    """The notebooks' image grid: rows of images [C, h, w] in [-1, 1] (lists, or batches [n, C, h, w]) drawn with
    picture; `titles` over the top row (one per column) or over every image (one list per row); `row_names` on the
    left. Text is black, at 9 pt. Returns the matplotlib axes [rows, columns] (assign them, `_ = show_grid(...)`, so
    that a notebook does not print them under the figure)."""
    import matplotlib.pyplot as plt

    columns = max(len(row) for row in rows)
    every_image = titles is not None and isinstance(titles[0], (list, tuple))
    width = size * columns + (1.2 if row_names else 0.2)  # inches
    height = (size + (0.2 if titles else 0.05)) * len(rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(width, height), squeeze=False)
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(row):  # a shorter row: blank
                ax.axis("off")
                continue
            ax.imshow(picture(row[c]), interpolation="nearest")
            if titles is not None and (every_image or r == 0):
                ax.set_title((titles[r] if every_image else titles)[c], fontsize=9, pad=2)
        if row_names:
            axes[r, 0].set_ylabel(row_names[r], fontsize=9, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    return axes


def trajectory_figure(frames, path, num_show, row_names=None):
    """The two-phase unmasking as one figure: a row per sample, a column per step. Phase 1 shows the pivot
    image (upsampled 2x), phase 2 the dense image; tokens not yet revealed are magenta, those revealed at that
    step outlined (yellow over black: outline_revealed) at every step; row_names (one per sample) at the left. A .gif
    path also writes an animation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pivot_frames = [{**f, "step": k + 1} for k, f in enumerate(f for f in frames if f["phase"] == "pivot")]
    dense_frames = [{**f, "step": k + 1} for k, f in enumerate(f for f in frames if f["phase"] == "dense")]
    if len(pivot_frames) > 16:  # a long phase 1 is shown at 16 evenly spaced steps, its last one included
        keep = {round(i * (len(pivot_frames) - 1) / 15) for i in range(16)}
        pivot_frames = [f for i, f in enumerate(pivot_frames) if i in keep]
    frames = pivot_frames + dense_frames
    pictures = [unmasked_picture(f)[:num_show] for f in frames]  # each [S, H, W, 3] uint8
    steps = len(frames)
    fig, axes = plt.subplots(num_show, steps, figsize=(1.1 * steps, 1.15 * num_show + 0.3), squeeze=False)
    for j, frame in enumerate(frames):
        side = frame["mask"].shape[-1]
        for i in range(num_show):
            ax = axes[i, j]
            ax.imshow(pictures[j][i], interpolation="nearest")
            outline_revealed(ax, frame["revealed"][i], pictures[j].shape[1] // side)
            ax.set_xticks([]), ax.set_yticks([])
        title = "pivots" if frame["phase"] == "pivot" else "dense"
        axes[0, j].set_title(f"{title} {frame['step']}", fontsize=9)
    for i, name in enumerate(row_names or []):
        axes[i, 0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    if path.endswith(".gif"):
        from matplotlib.animation import FuncAnimation, PillowWriter

        plt.close(fig)
        fig, axes = plt.subplots(1, num_show, figsize=(1.3 * num_show, 1.5), squeeze=False)
        artists = [axes[0, i].imshow(pictures[0][i], interpolation="nearest") for i in range(num_show)]
        for ax in axes[0]:
            ax.set_xticks([]), ax.set_yticks([])

        def show(j):
            for i, artist in enumerate(artists):
                artist.set_data(pictures[j][i])
            fig.suptitle(f"{frames[j]['phase']} step", fontsize=9)
            return artists

        FuncAnimation(fig, show, frames=steps, interval=400).save(path, writer=PillowWriter(fps=3))
    else:
        fig.savefig(path, dpi=110)
    plt.close(fig)
