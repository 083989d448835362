"""common/data.py: datasets, image conversion, the seeded infinite iterator."""
import numpy as np
import pytest
import torch
from PIL import Image

from common.data import FEW_SHOT, batch_indices, infinite_batches, list_images, load_dataset, load_image, resolve_folder
from common.run import UserError


def test_digits_real_data_as_rgb():
    ds = load_dataset("digits", 16)
    assert len(ds) == 1797 and ds.images.shape == (1797, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 1], ds.images[:, 2])
    assert ds.images.min() == 0 and ds.images.max() >= 250
    # background (corners) is dark, the strokes are bright: the mean image is brighter in the centre
    m = ds.images.float().mean(0)[0]
    assert m[6:10, 6:10].mean() > 100 and m[:2, :2].mean() < 5


@pytest.fixture
def folder(tmp_path):
    """A folder with every image kind the loader must handle, nested, with odd extensions."""
    d = tmp_path / "set"
    (d / "img" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(d / "img" / "a.JPG")
    Image.new("L", (20, 20), 128).save(d / "img" / "b.png")
    Image.new("P", (20, 20), 3).save(d / "img" / "sub" / "c.Png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(d / "img" / "d.jpeg")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(d / "img" / "e.png")  # 16-bit white
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.save(d / "img" / "f.webp")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(d / "img" / "g.bmp")
    (d / "img" / "notes.txt").write_text("not an image")
    return d


def test_folder_every_mode_becomes_rgb(folder):
    paths = list_images(folder)
    assert [p.split("/")[-1] for p in paths] == ["a.JPG", "b.png", "d.jpeg", "e.png", "f.webp", "g.bmp", "c.Png"]
    ds = load_dataset(str(folder), 8)
    x = ds.images
    assert x.shape == (7, 3, 8, 8)
    assert (x[0, :, 4, 4].int() - torch.tensor([255, 0, 0])).abs().max() <= 2  # JPEG
    assert x[1, :, 4, 4].tolist() == [128, 128, 128]
    assert x[2, 1, 4, 4] < 30 and x[2, 0, 4, 4] > 200  # CMYK magenta: high R, low G
    assert x[3, :, 4, 4].tolist() == [255, 255, 255]  # 16-bit full scale -> 255, not clipped garbage
    assert x[4, :, 4, 4].tolist() == [255, 255, 255]  # transparent composited on white
    assert x[5, :, 4, 4].tolist() == [0, 0, 255]


def test_corrupt_files_skipped_with_one_counting_warning(folder):
    (folder / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    good = folder / "img" / "g.bmp"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "img" / "trunc.png")
    data = (folder / "img" / "trunc.png").read_bytes()
    (folder / "img" / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) of 9"):
        ds = load_dataset(str(folder), 8)
    assert len(ds) == 7 and good.exists()


def test_center_crop_vs_squash(tmp_path):
    a = np.zeros((20, 80, 3), np.uint8)
    a[:, :20] = a[:, 60:] = (255, 0, 0)
    a[:, 20:60] = (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    sq = load_image(tmp_path / "wide.png", 8, "squash")
    cc = load_image(tmp_path / "wide.png", 8, "center")
    assert sq[:, 4, 0].tolist() == [255, 0, 0] and sq[:, 4, 4].tolist() == [0, 0, 255]
    assert (cc[2] == 255).all() and (cc[0] == 0).all()  # the centre square is all blue


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_dataset(str(tmp_path / "empty"), 8)
    with pytest.raises(UserError, match=r"shells.*huggan/few-shot-<name>.*unpack"):
        load_dataset("shells", 8, data_root=str(tmp_path))
    with pytest.raises(UserError, match="neither a folder nor a known dataset"):
        load_dataset("no-such-thing", 8, data_root=str(tmp_path))
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="none of the 1 image files"), pytest.warns(UserWarning):
        load_dataset(str(tmp_path / "only_bad"), 8)


def test_named_dataset_resolves_under_data_root(tmp_path):
    (tmp_path / "shells" / "img").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(tmp_path / "shells" / "img" / "1.jpg")
    assert resolve_folder("shells", str(tmp_path)) == str(tmp_path / "shells")
    assert len(load_dataset("shells", 8, data_root=str(tmp_path))) == 1
    assert FEW_SHOT["shells"] == 64 and FEW_SHOT["100-shot-obama"] == 100


def test_batch_indices_epochs_ranks_and_resume():
    n, b = 12, 3
    first_epoch = torch.cat([batch_indices(n, b, 5, s) for s in range(4)])
    assert sorted(first_epoch.tolist()) == list(range(n))  # an epoch visits every image once
    assert torch.equal(batch_indices(n, b, 5, 2), batch_indices(n, b, 5, 2))  # pure function of the step
    assert not torch.equal(batch_indices(n, b, 5, 0), batch_indices(n, b, 6, 0))  # seed matters
    # two ranks: disjoint slices of the same global permutation, together one global batch of 2*b
    r0, r1 = batch_indices(n, b, 5, 0, 0, 2), batch_indices(n, b, 5, 0, 1, 2)
    assert not set(r0.tolist()) & set(r1.tolist())
    assert torch.equal(torch.cat([r0, r1]), torch.cat([batch_indices(n, b, 5, 0), batch_indices(n, b, 5, 1)]))


def test_iterator_resumes_identically_and_flips(folder):
    ds = load_dataset("digits", 8)
    it = infinite_batches(ds, 4, seed=3)
    seq = [next(it) for _ in range(5)]
    again = infinite_batches(ds, 4, seed=3, start_step=3)
    assert torch.equal(next(again), seq[3]) and torch.equal(next(again), seq[4])
    assert seq[0].min() >= -1 and seq[0].max() <= 1 and seq[0].dtype == torch.float32
    # flips: with flip on, some of 64 samples are mirrored copies of the stored image
    idx = batch_indices(len(ds), 64, 3, 0)
    ref = ds.images[idx].float() / 127.5 - 1
    x = next(infinite_batches(ds, 64, seed=3, flip=True))
    same = (x == ref).flatten(1).all(1)
    mirrored = (x == ref.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < (mirrored & ~same).sum() < 54
    assert torch.equal(next(infinite_batches(ds, 64, seed=3, flip=False)), ref)


def test_streaming_matches_in_memory(folder):
    mem = load_dataset(str(folder), 8)
    stream = load_dataset(str(folder), 8, in_memory=False)
    assert stream.images is None and len(stream) == 7
    a = infinite_batches(mem, 3, seed=1, flip=False)
    s = infinite_batches(stream, 3, seed=1, flip=False, workers=0)
    for _ in range(4):
        assert torch.equal(next(a), next(s))
