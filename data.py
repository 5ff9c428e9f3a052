"""The training data: a loader per data set, each returning the whole training set in memory (uint8), and the batch
of each training step as a pure function of (seed, step, rank), so a resumed run needs no loader state.

    load_dataset("cifar10", "./data", 32)     # ImageData(images uint8 [50000, 32, 32, 3], labels int64 [50000])
    batch_at(data, step, 256, seed, "cuda")   # images float [256, 3, 32, 32] in [-1, 1], labels [256]

Every problem with a data set (missing, corrupt, offline) is a DataError whose message says what to do.
"""

import contextlib
import functools
import hashlib
import http.client
import os
import pickle
import re
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGENET_HINT = ("Get 'Imagenet64_train_npz' from the downsampled-image page of image-net.org "
                 "(https://image-net.org/download-images.php, needs an account) and unpack it so that "
                 "{d} holds train_data_batch_1.npz ... train_data_batch_10.npz.")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
MAX_ASPECT = 16  # a folder's pictures: the long side at most this many times the short one


class DataError(Exception):
    """A data set is missing or broken; the message says what to do about it."""


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, H, W, 3], channel-last
    labels: torch.Tensor  # int64 [N]


@contextlib.contextmanager
def _reading(path, hint):
    """Turn any error raised while reading `path` into a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except MemoryError as e:  # (numpy's _ArrayMemoryError too) a file whose header claims far more than it holds
        raise DataError(f"Could not read {path}: it asks for more memory than this machine has ({e}), so it is likely "
                        f"corrupt (its header claims more data than the file holds). {hint}") from e
    except Exception as e:
        raise DataError(f"Could not read {path}: it looks corrupt or truncated ({type(e).__name__}: {e}). "
                        f"{hint}") from e


def load_dataset(name: str, data_dir: str, image_size: int) -> ImageData:
    """The whole training set as uint8 images [N, H, W, 3] and int64 labels [N].

    'cifar10':    data_dir contains cifar-10-batches-py/ (downloaded there if missing); image_size 32.
    'imagenet64': data_dir holds the train_data_batch_*.npz files of ImageNet 64x64; image_size 64.
    'folder':     data_dir/<class_name>/*.png|jpg|jpeg, resized and center-cropped to image_size.
    """
    loaders = {"cifar10": _load_cifar10, "imagenet64": _load_imagenet64, "folder": _load_folder}
    if name not in loaders:
        raise DataError(f"Unknown dataset {name!r}; choose one of: {', '.join(loaders)}.")
    if os.path.isfile(os.path.expanduser(data_dir)):
        raise DataError(f"--data-dir {data_dir} is a file: give the folder that holds the data set (for CIFAR-10, the "
                        "folder with cifar-10-batches-py/ in it)")
    return loaders[name](os.path.expanduser(data_dir), image_size)


# CIFAR-10: data_dir contains cifar-10-batches-py/, as in torchvision.
def _download(url, path):
    """Fetch `url` into `path` with a progress bar; a broken download leaves no `path` behind."""
    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def _fetch_cifar10(data_dir, folder):
    """Download, check and unpack the official archive so that `folder` exists."""
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    how = (f"To install it by hand, download {CIFAR_URL} and unpack it in {data_dir} "
           f"(tar xzf cifar-10-python.tar.gz), so that {folder} holds {', '.join(CIFAR_FILES)}.")
    created = not os.path.isdir(data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
        if not os.path.exists(archive):
            _download(CIFAR_URL, archive)
    except (OSError, http.client.HTTPException) as e:
        if created and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)  # a failed first download leaves no empty folder behind
        raise DataError(f"CIFAR-10 is not in {folder} and downloading it failed ({e}). {how}") from e
    with open(archive, "rb") as f:
        md5 = hashlib.file_digest(f, "md5").hexdigest()
    if md5 != CIFAR_MD5:
        os.remove(archive)
        raise DataError(f"{archive} has md5 {md5}, not {CIFAR_MD5}: it is not the CIFAR-10 archive "
                        f"(or was damaged), so it was deleted. Run again to download it afresh. {how}")
    with _reading(archive, how), tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")  # the "data" filter refuses paths leaving data_dir


class CifarUnpickler(pickle.Unpickler):
    """Reads the official CIFAR-10 pickles (Python 2 pickles of dicts, lists, bytes and numpy arrays) and nothing
    else: an object of any other kind, which unpickling would build and which could run code, is refused."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {
        (f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}

    def __init__(self, f, path, hint):
        super().__init__(f, encoding="bytes")
        self.path, self.hint = path, hint

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"{self.path} is not an official CIFAR-10 file: it holds a {module}.{name} object, so it "
                            f"was not read (loading it could run code). {self.hint}")
        return super().find_class(module, name)


def _load_cifar10(data_dir, image_size):
    if image_size != 32:
        raise DataError(f"CIFAR-10 images are 32x32, so image_size must be 32 (got {image_size}); "
                        "use the 'folder' dataset to train at other sizes.")
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(data_dir, "data_batch_1")):
        raise DataError(f"data_dir must be the folder that CONTAINS cifar-10-batches-py/: pass "
                        f"{os.path.dirname(os.path.abspath(data_dir))} instead of {data_dir}.")
    if not os.path.isdir(folder):
        _fetch_cifar10(data_dir, folder)
    hint = f"Replace it: delete {folder} and run again to download it, or unpack {CIFAR_URL} there."
    images, labels = [], []
    for name in CIFAR_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{folder} lacks {name}. Delete the folder and run again to download it, "
                            f"or unpack {CIFAR_URL} into {data_dir} by hand.")
        with _reading(path, hint), open(path, "rb") as f:
            batch = CifarUnpickler(f, path, hint).load()
            data, y = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
            if data.dtype != np.uint8 or data.shape != (len(y), 3072):
                raise ValueError(f"expected uint8 data [N, 3072] for its {len(y)} labels, got {data.dtype} "
                                 f"{data.shape}")
            if len(y) and not 0 <= y.min() <= y.max() < 10:
                raise ValueError(f"its labels must be classes 0..9, got {y.min()}..{y.max()}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R,G,B planes -> HWC
        labels.append(y)
    return ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


# ImageNet 64x64 (Chrabaszcz et al. 2017): data_dir holds train_data_batch_<k>.npz, pixels in R,G,B planes.
def _npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream `f`, leaving `f` at the start of the data."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy version {version}")
    return read[version](f)


def _load_imagenet64(data_dir, image_size, chunk=4096):
    if image_size != 64:
        raise DataError(f"ImageNet 64x64 images are 64x64, so image_size must be 64 (got {image_size}); "
                        "use the 'folder' dataset to train at other sizes.")
    hint = IMAGENET_HINT.format(d=data_dir)
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    found = {int(m[1]): f for f in names if (m := re.fullmatch(r"train_data_batch_(\d+)\.npz", f))}
    paths = [os.path.join(data_dir, found[k]) for k in sorted(found)]  # by number: 2 before 10
    if not paths:
        raise DataError(f"No train_data_batch_*.npz files in {data_dir}. {hint}")
    # Pass 1: shapes and labels only, so the pixels can go straight into one preallocated array (no second copy).
    sizes, labels = [], []
    for path in paths:
        with _reading(path, hint), zipfile.ZipFile(path) as zf:
            with zf.open("data.npy") as f:
                shape, fortran, dtype = _npy_header(f)
                header_bytes = f.tell()
            if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3 * 64 * 64 or fortran:
                raise ValueError(f"'data' is {dtype} {shape}, expected C-ordered uint8 (N, 12288)")
            if header_bytes + shape[0] * shape[1] > zf.getinfo("data.npy").file_size:
                raise ValueError(f"'data' claims {shape[0]} images, more than the file holds")
            with zf.open("labels.npy") as f:
                y = np.lib.format.read_array(f).astype(np.int64)
            if y.shape != shape[:1] or (len(y) and not 1 <= y.min() <= y.max() <= 1000):
                raise ValueError(f"'labels' must be {shape[0]} ints in 1..1000")
        sizes.append(shape[0])
        labels.append(y - 1)  # the files count classes from 1
    # Pass 2: each file's pixels in chunks, R,G,B planes -> HWC on the way.
    try:
        images = np.empty((sum(sizes), 64, 64, 3), dtype=np.uint8)
    except MemoryError:
        raise DataError(f"The {sum(sizes)} images in {data_dir} need {sum(sizes) * 3 * 64 * 64 / 1e9:.1f} GB of "
                        "memory, more than this machine can give.") from None
    pos = 0
    with tqdm(total=len(images), unit="img", desc="imagenet64") as bar:
        for path, n in zip(paths, sizes):
            with _reading(path, hint), zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
                _npy_header(f)
                for k in [min(chunk, n - s) for s in range(0, n, chunk)]:
                    buf = f.read(k * 3 * 64 * 64)
                    if len(buf) != k * 3 * 64 * 64:
                        raise ValueError("'data' ends early")
                    images[pos:pos + k] = np.frombuffer(buf, np.uint8).reshape(k, 3, 64, 64).transpose(0, 2, 3, 1)
                    pos += k
                    bar.update(k)
    return ImageData(torch.from_numpy(images), torch.from_numpy(np.concatenate(labels)))


# Image folder: data_dir/<class_name>/*.png|jpg|jpeg, classes sorted by name.
def _load_folder(data_dir, image_size):
    layout = "Expected data_dir/<class_name>/<image>.png|.jpg|.jpeg, one sub-folder per class."
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir} is not a folder. {layout}")
    classes = sorted(d for d in os.listdir(data_dir)
                     if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"{data_dir} has no class sub-folders. {layout}")
    files = []
    for label, c in enumerate(classes):
        names = sorted(f for f in os.listdir(os.path.join(data_dir, c))
                       if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))  # not macOS's ._x.jpg
        if not names:
            raise DataError(f"Class folder {os.path.join(data_dir, c)} holds no images. {layout}")
        files += [(os.path.join(data_dir, c, f), label) for f in names]
    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(files, unit="img", desc="images")):
        with _reading(path, "Delete or replace that file."), Image.open(path) as img:
            if max(img.size) > MAX_ASPECT * min(img.size):  # (its size, from the header: nothing decoded yet)
                raise DataError(f"{path} is {img.width}x{img.height} pixels: its center crop would keep less than "
                                f"1/{MAX_ASPECT} of it (and enlarging it could take gigabytes). Delete or crop that "
                                "file.")
            img = img.convert("RGB")
            scale = image_size / min(img.size)  # short side -> image_size (PIL antialiases when shrinking), center crop
            w, h = (max(image_size, round(side * scale)) for side in img.size)
            img = img.resize((w, h), Image.Resampling.BICUBIC) if (w, h) != img.size else img
            left, top = (w - image_size) // 2, (h - image_size) // 2
            images[i] = np.asarray(img.crop((left, top, left + image_size, top + image_size)))
    return ImageData(torch.from_numpy(images), torch.tensor([label for _, label in files], dtype=torch.int64))


# Batches: a pure function of (seed, step, rank, world_size), so a resumed run needs no loader state.
def _mix(*ints):
    """A well-spread 63-bit seed from non-negative ints."""
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> np.uint64(1))


@functools.lru_cache(maxsize=4)
def _epoch_shard(seed, epoch, rank, world_size, n, device):
    """This rank's indices for `epoch`: every world_size-th entry of one shared permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 0, epoch)))
    return perm[rank:(n // world_size) * world_size:world_size].to(device)


def batch_at(data: ImageData, step: int, batch_size: int, seed: int, device,
             rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step` for `rank`: images float [B, 3, H, W] in [-1, 1] and labels int64 [B],
    on `device`. Epochs are fresh permutations, each rank takes its own shard, the last incomplete batch
    is dropped, and half the images (on average) are flipped horizontally."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    device = torch.device(device)
    per_epoch = len(data.images) // world_size // batch_size
    if per_epoch == 0:
        raise DataError(f"{len(data.images)} images cannot fill one batch of {batch_size} on each of "
                        f"{world_size} rank(s); lower batch_size.")
    epoch, i = divmod(step, per_epoch)
    rows = slice(i * batch_size, (i + 1) * batch_size)
    # Index where the data lives (the shard is cached there), then move only the batch.
    idx = _epoch_shard(seed, epoch, rank, world_size, len(data.images), data.images.device)[rows]
    x = data.images[idx].to(device, non_blocking=True)
    y = data.labels[_epoch_shard(seed, epoch, rank, world_size, len(data.labels), data.labels.device)[rows]]
    flip = torch.rand(batch_size, generator=torch.Generator().manual_seed(_mix(seed, 1, step, rank))) < 0.5
    flip = flip.to(device, non_blocking=True).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(2), x)  # x is [B, H, W, 3]: dim 2 is the width
    # Multiply by the float32 reciprocal, as CUDA's division by a scalar does: same bits on CPU and GPU.
    x = x.permute(0, 3, 1, 2).contiguous().float().mul_(1 / 127.5).sub_(1.0)
    return x, y.to(device, non_blocking=True)
