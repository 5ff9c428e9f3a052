"""Tests of data.py: the data loaders on tiny files in the real formats (and what they say when a file is missing or
broken), and the batch of each training step."""
import hashlib
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import data as data_py  # (the tests name their ImageData `data`)
from data import DataError, ImageData, batch_at, load_dataset

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----- CIFAR-10 -----
def cifar_batch(first, n=3):
    """n images whose pixels encode (image number, channel, row, column); labels first, first+1, ..."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            plane = (np.arange(32)[:, None] * 3 + np.arange(32)[None, :] + 50 * c + 7 * (first + i)) % 256
            data[i, c * 1024:(c + 1) * 1024] = plane.reshape(-1)  # one row-major 32x32 plane per channel
    return {b"batch_label": b"training batch", b"labels": [(first + i) % 10 for i in range(n)],
            b"data": data, b"filenames": [b"x.png"] * n}


def write_cifar(root, n=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(cifar_batch(b * n, n)))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    return folder


def expected_cifar_pixel(k, y, x):
    return [(y * 3 + x + 50 * c + 7 * k) % 256 for c in range(3)]


def test_cifar10_reads_official_pickles(tmp_path):
    write_cifar(tmp_path)
    d = load_dataset("cifar10", str(tmp_path), 32)
    assert d.images.shape == (15, 32, 32, 3) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == [k % 10 for k in range(15)]
    for k, y, x in [(0, 0, 0), (0, 1, 2), (0, 2, 1), (4, 31, 0), (14, 5, 30)]:  # batches in order 1..5
        assert d.images[k, y, x].tolist() == expected_cifar_pixel(k, y, x), (k, y, x)


def test_cifar10_as_an_imagenet64_stand_in_reads_back_through_the_imagenet64_loader(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import cifar10_to_imagenet64 as convert

    write_cifar(tmp_path)  # 15 images
    convert.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "in64"), "--per-file", "4"])
    files = sorted(os.listdir(tmp_path / "in64"))
    assert files == [f"train_data_batch_{k}.npz" for k in range(1, 5)]
    # converted again into the same folder, in larger files: the earlier files do not stay to be read twice
    convert.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "in64"), "--per-file", "8"])
    assert sorted(os.listdir(tmp_path / "in64")) == ["train_data_batch_1.npz", "train_data_batch_2.npz"]
    convert.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "in64"), "--per-file", "4"])
    first = np.load(tmp_path / "in64" / "train_data_batch_1.npz")
    assert first["data"].shape == (4, 12288) and first["data"].dtype == np.uint8
    assert first["labels"].tolist() == [1, 2, 3, 4]
    big = load_dataset("imagenet64", str(tmp_path / "in64"), 64)
    small = load_dataset("cifar10", str(tmp_path), 32)
    assert big.images.shape == (15, 64, 64, 3) and torch.equal(big.labels, small.labels)
    # enlarged 2x and shrunk back (2x2 means), the images are the CIFAR images again, up to interpolation error
    back = big.images.float().view(15, 32, 2, 32, 2, 3).mean(dim=(2, 4))
    inner = (slice(None), slice(1, -1), slice(1, -1))  # the border rows are extrapolated
    assert (back - small.images.float())[inner].abs().mean() < 12


def test_the_imagenet64_stand_in_needs_cifar10_and_says_so(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import cifar10_to_imagenet64 as convert

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="cifar-10-batches-py"):
        convert.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])


def test_a_data_dir_that_is_a_file_is_named_as_one(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DataError, match="is a file: give the folder"):
        load_dataset("cifar10", str(tmp_path / "data"), 32)


def test_cifar10_wrong_image_size(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(DataError, match="must be 32"):
        load_dataset("cifar10", str(tmp_path), 64)


def test_cifar10_offline_names_folder_files_and_url(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path / "data"), 32)
    msg = str(e.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "data_batch_5" in msg and data_py.CIFAR_URL in msg
    assert not (tmp_path / "data").exists()  # no half-written archive, nor the folder made for it, left behind
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(DataError):
        load_dataset("cifar10", str(tmp_path / "mine"), 32)
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_cifar10_md5_rejects_wrong_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(data_py, "_download", lambda url, path: open(path, "wb").write(b"not a tarball"))
    with pytest.raises(DataError, match="md5"):
        load_dataset("cifar10", str(tmp_path), 32)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_cifar10_download_unpacks_archive(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src")
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(data_py, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(data_py, "_download", lambda url, path: open(path, "wb").write(archive.read_bytes()))
    d = load_dataset("cifar10", str(tmp_path / "data"), 32)
    assert d.images.shape == (15, 32, 32, 3)
    assert d.images[3, 4, 5].tolist() == expected_cifar_pixel(3, 4, 5)


def test_cifar10_truncated_batch_names_file(tmp_path):
    folder = write_cifar(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path), 32)


def test_cifar10_missing_batch_names_file(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_dataset("cifar10", str(tmp_path), 32)


def test_cifar10_data_dir_is_the_parent_folder(tmp_path):
    folder = write_cifar(tmp_path)
    with pytest.raises(DataError, match="CONTAINS cifar-10-batches-py") as e:
        load_dataset("cifar10", str(folder), 32)  # one level too deep
    assert f"pass {tmp_path} instead" in str(e.value)


# ----- ImageNet 64x64 -----
def imagenet_pixels(n, offset):
    """n planar images; pixel (channel c, row y, column x) of image i is (offset + i + 3y + 5x + 60c) % 256."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(64), np.arange(64), indexing="ij")
    return np.stack([((offset + i + 3 * y + 5 * x + 60 * c) % 256).astype(np.uint8).reshape(-1)
                     for i in range(n)])


def write_imagenet(root):
    np.savez(root / "train_data_batch_10.npz", data=imagenet_pixels(7, 100), labels=[1000] * 7)
    np.savez(root / "train_data_batch_2.npz", data=imagenet_pixels(5, 0), labels=[1, 2, 3, 4, 5],
             mean=np.zeros(12288))  # the real files also carry a 'mean'


def test_imagenet64_reads_npz_in_numeric_order(tmp_path):
    write_imagenet(tmp_path)
    d = load_dataset("imagenet64", str(tmp_path), 64)
    assert d.images.shape == (12, 64, 64, 3) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == [0, 1, 2, 3, 4] + [999] * 7
    for k, offset, i in [(0, 0, 0), (4, 0, 4), (5, 100, 0), (11, 100, 6)]:
        for y, x in [(0, 0), (1, 2), (2, 1), (63, 10)]:
            want = [(offset + i + 3 * y + 5 * x + 60 * c) % 256 for c in range(3)]
            assert d.images[k, y, x].tolist() == want, (k, y, x)


def test_imagenet64_chunked_read_matches(tmp_path):
    write_imagenet(tmp_path)
    whole = load_dataset("imagenet64", str(tmp_path), 64).images
    chunked = data_py._load_imagenet64(str(tmp_path), 64, chunk=2).images  # chunks of 2, 2, 1 and 2, 2, 2, 1
    assert torch.equal(whole, chunked)


def test_imagenet64_missing_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("imagenet64", str(tmp_path), 64)
    msg = str(e.value)
    assert str(tmp_path) in msg and "train_data_batch_1.npz" in msg and "Imagenet64_train_npz" in msg


def test_imagenet64_corrupt_npz_names_file(tmp_path):
    write_imagenet(tmp_path)
    path = tmp_path / "train_data_batch_10.npz"
    path.write_bytes(path.read_bytes()[:30000])
    with pytest.raises(DataError, match="train_data_batch_10.npz"):
        load_dataset("imagenet64", str(tmp_path), 64)


def test_imagenet64_wrong_image_size(tmp_path):
    write_imagenet(tmp_path)
    with pytest.raises(DataError, match="must be 64"):
        load_dataset("imagenet64", str(tmp_path), 32)


# ----- Image folder -----
def test_folder_resizes_crops_and_labels(tmp_path):
    (tmp_path / "b_dogs").mkdir()
    (tmp_path / "a_cats").mkdir()
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :] = (0, 0, 255)
    wide[:, 10:30] = (255, 0, 0)  # the centre square is red, the sides (cropped away) blue
    Image.fromarray(wide).save(tmp_path / "b_dogs" / "wide.png")
    Image.new("L", (16, 30), 200).save(tmp_path / "b_dogs" / "tall_gray.JPG")
    Image.new("RGBA", (8, 8), (0, 255, 0, 128)).save(tmp_path / "a_cats" / "small.png")
    (tmp_path / "a_cats" / "notes.txt").write_text("not an image")
    d = load_dataset("folder", str(tmp_path), 8)
    assert d.images.shape == (3, 8, 8, 3) and d.images.dtype == torch.uint8
    assert d.labels.tolist() == [0, 1, 1]  # classes in the order of their folders' names: a_cats, b_dogs
    assert d.images[0].reshape(-1, 3).tolist() == [[0, 255, 0]] * 64  # small.png, RGBA -> RGB
    assert (d.images[1].int() - 200).abs().max() <= 2  # tall_gray.JPG (sorts first), gray -> RGB
    assert torch.equal(d.images[2, 2:6, 2:6], torch.tensor([255, 0, 0], dtype=torch.uint8).expand(4, 4, 3))


def test_folder_empty_dir(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("folder", str(tmp_path), 8)


def test_folder_unreadable_image_names_file(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset("folder", str(tmp_path), 8)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "/nowhere", 32)
    assert all(name in str(e.value) for name in ["cifar10", "imagenet64", "folder"])


# ----- batch_at -----
def make_data(n=40, size=8):
    """Image i has red = i everywhere and green rising from left to right, so index and flip are visible."""
    images = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    images[..., 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    images[..., 1] = (torch.arange(size, dtype=torch.uint8) * 30)[None, None, :]
    return ImageData(images, torch.arange(n) % 7 + 100)


def decode(x):
    """(image indices, flipped flags) of a batch made from make_data()."""
    pixels = ((x + 1) * 127.5).round().long()
    return pixels[:, 0, 0, 0].tolist(), (pixels[:, 1, 0, 0] > pixels[:, 1, 0, -1]).tolist()


def test_batch_at_shapes_values_and_labels():
    data = make_data()
    x, y = batch_at(data, step=3, batch_size=4, seed=0, device="cpu")
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (4,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    idx, flipped = decode(x)
    assert y.tolist() == [i % 7 + 100 for i in idx]
    for b, (i, f) in enumerate(zip(idx, flipped)):
        src = data.images[i].flip(1) if f else data.images[i]
        torch.testing.assert_close(x[b], src.permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6, rtol=0)


def test_batch_at_is_a_pure_function():
    data = make_data()
    a = batch_at(data, 7, 4, seed=1, device="cpu", rank=1, world_size=2)
    data_py._epoch_shard.cache_clear()  # a resumed run starts with an empty cache
    batch_at(data, 0, 4, seed=5, device="cpu")
    b = batch_at(data, 7, 4, seed=1, device="cpu", rank=1, world_size=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_at_steps_and_seeds_differ():
    data = make_data()
    x0, _ = batch_at(data, 0, 4, seed=0, device="cpu")
    x1, _ = batch_at(data, 1, 4, seed=0, device="cpu")
    x2, _ = batch_at(data, 0, 4, seed=1, device="cpu")
    assert not torch.equal(x0, x1) and not torch.equal(x0, x2)


def test_batch_at_flips_about_half():
    data = make_data()
    flips = [f for s in range(10) for f in decode(batch_at(data, s, 4, seed=0, device="cpu")[0])[1]]
    assert 8 <= sum(flips) <= 32  # 40 coin tosses


def test_batch_at_epochs_cover_each_image_once():
    data = make_data(n=42)  # 10 full batches of 4 per epoch; 2 images left out each epoch
    epochs = [[i for s in range(e * 10, e * 10 + 10) for i in decode(batch_at(data, s, 4, 0, "cpu")[0])[0]]
              for e in range(2)]
    for seen in epochs:
        assert len(seen) == 40 and len(set(seen)) == 40
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch


def test_batch_at_rank_shards_are_disjoint():
    data = make_data(n=41)  # 20 images per rank, 5 batches of 4
    shards = [[i for s in range(5) for i in decode(batch_at(data, s, 4, 0, "cpu", rank=r, world_size=2)[0])[0]]
              for r in range(2)]
    assert len(set(shards[0])) == 20 and len(set(shards[1])) == 20
    assert not set(shards[0]) & set(shards[1])


def test_batch_at_batch_too_large():
    with pytest.raises(DataError, match="lower batch_size"):
        batch_at(make_data(n=10), 0, 8, 0, "cpu", world_size=2)
