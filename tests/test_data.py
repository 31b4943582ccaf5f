import pytest
import torch
import torch.nn.functional as F

from msrdarts.data import DeviceLoader, list_datasets, load_dataset, search_split
from msrdarts.errors import ConfigError, DataError


def test_digits_is_offline_real_and_split():
    d = load_dataset("digits")
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape == (1437, 1, 8, 8)
    assert d.x_test.shape == (360, 1, 8, 8) and d.num_classes == 10
    assert set(d.y_train.tolist()) == set(range(10))
    assert int(d.x_train.max()) == 255  # 0..16 rescaled to 0..255
    # Fixed split: the same whatever the global seed.
    torch.manual_seed(123)
    assert torch.equal(load_dataset("digits").y_test, d.y_test)


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="CIFAR-10 not found in .*pass --download"):
        load_dataset("cifar10", tmp_path / "nowhere")
    assert {"digits", "cifar10"} <= set(list_datasets())


def test_search_split_is_disjoint_4_to_1_and_seeded():
    a, b = search_split(50, 0.8, seed=0)
    assert len(a) == 40 and len(b) == 10
    assert sorted(torch.cat([a, b]).tolist()) == list(range(50))
    a2, _ = search_split(50, 0.8, seed=0)
    a3, _ = search_split(50, 0.8, seed=1)
    assert torch.equal(a, a2) and not torch.equal(a, a3)
    with pytest.raises(ConfigError):
        search_split(50, 1.0)


def test_loader_visits_every_image_once_per_epoch():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    loader = DeviceLoader(x, y, 4, (0.0,), (1 / 255,), "cpu", shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    seen = torch.cat([yb for _, yb in loader])
    assert sorted(seen.tolist()) == list(range(10))
    for xb, yb in loader:  # normalisation: (x/255 - 0) / (1/255) == x
        torch.testing.assert_close(xb[:, 0, 0, 0], yb.float())
    dl = DeviceLoader(x, y, 4, (0.0,), (1.0,), "cpu", drop_last=True)
    assert len(dl) == 2 and sum(len(b) for _, b in dl) == 8


def test_device_crop_and_flip_match_torchvision_semantics():
    """Every augmented image is a window of the zero-padded image (maybe mirrored), offsets uniform."""
    torch.manual_seed(0)
    n, p = 4000, 2
    img = torch.randint(1, 255, (1, 3, 5, 5), dtype=torch.uint8)
    x = img.expand(n, -1, -1, -1).contiguous()
    loader = DeviceLoader(x, torch.zeros(n, dtype=torch.long), n, (0.0, 0.0, 0.0), (1 / 255,) * 3, "cpu",
                          crop_padding=p, flip=True, generator=torch.Generator().manual_seed(1))
    out = next(iter(loader))[0].round().to(torch.uint8)
    padded = F.pad(img, (p, p, p, p))[0]
    windows = {}
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            win = padded[:, dy:dy + 5, dx:dx + 5]
            windows[(dy, dx, False)] = win
            windows[(dy, dx, True)] = win.flip(-1)
    counts = {k: 0 for k in windows}
    for o in out:
        matches = [k for k, w in windows.items() if torch.equal(o, w)]
        assert matches, "an augmented image is not a padded crop of the original"
        counts[matches[0]] += 1
    # 25 offsets x 2 flips, uniform: chi-square with 49 degrees of freedom, p ~ 1e-4 bound.
    expected = n / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 95
    flipped = sum(c for k, c in counts.items() if k[2])
    assert abs(flipped / n - 0.5) < 0.04


def test_loader_is_reproducible_from_generator_state():
    x = torch.randint(0, 255, (20, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(20)
    g = torch.Generator().manual_seed(5)
    loader = DeviceLoader(x, y, 8, (0.5,), (0.25,), "cpu", shuffle=True, crop_padding=1, flip=True, generator=g)
    list(loader)
    state = g.get_state()
    first = [b for b in loader]
    g.set_state(state)
    again = [b for b in loader]
    for (a, ya), (b, yb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_cutout_zeroes_one_square_per_image():
    n, size, L = 2000, 6, 2
    x = torch.full((n, 1, size, size), 200, dtype=torch.uint8)
    loader = DeviceLoader(x, torch.zeros(n, dtype=torch.long), n, (0.0,), (1 / 255,), "cpu", cutout=L,
                          generator=torch.Generator().manual_seed(3))
    out = next(iter(loader))[0][:, 0]
    holes = out == 0
    counts = holes.flatten(1).sum(1)
    assert counts.max() == L * L and counts.min() >= 1     # clipped at the border, never empty
    for img, hole in zip(out[:50], holes[:50]):            # the hole is one axis-aligned rectangle
        r, c = hole.nonzero(as_tuple=True)
        assert hole[r.min():r.max() + 1, c.min():c.max() + 1].all()
        assert torch.all(img[~hole] == 200)
    # Centres are uniform: every pixel is covered about equally often away from the border.
    cover = holes.float().mean(0)
    interior = cover[1:-1, 1:-1]
    assert (interior.max() - interior.min()) < 0.05


def _image_tree(root, split, classes, n=2, size=(10, 7)):
    from PIL import Image

    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, color=(40 * i, 100, 200)).save(d / f"{i}.png")


def test_folder_dataset_decodes_a_users_images(tmp_path):
    from msrdarts.data import FOLDER_SIZE

    _image_tree(tmp_path, "train", ["cat", "dog"], n=3)
    _image_tree(tmp_path, "test", ["cat", "dog"], n=1)
    d = load_dataset("folder", tmp_path)
    assert d.x_train.shape == (6, 3, FOLDER_SIZE, FOLDER_SIZE) and d.x_test.shape == (2, 3, FOLDER_SIZE, FOLDER_SIZE)
    assert d.num_classes == 2 and sorted(d.y_train.tolist()) == [0, 0, 0, 1, 1, 1]
    assert d.x_train[:, 2].float().mean().item() == pytest.approx(200, abs=1)   # blue channel kept


@pytest.mark.parametrize("problem, fragment", [
    ("no_root", "no such folder"),
    ("no_test", "needs a train/ folder and a val/ or test/ folder"),
    ("empty", "no images"),
    ("classes", "classes differ (only in train: ['dog']"),
    ("unreadable", "bad.png: unreadable image"),
])
def test_folder_dataset_bad_input(tmp_path, problem, fragment):
    root = tmp_path / "data"
    if problem != "no_root":
        _image_tree(root, "train", ["cat", "dog"])
        if problem != "no_test":
            _image_tree(root, "val", ["cat"] if problem == "classes" else ["cat", "dog"])
        if problem == "empty":
            for f in (root / "val").rglob("*.png"):
                f.unlink()
        if problem == "unreadable":
            (root / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        load_dataset("folder", root)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name, label", [("cifar100", "CIFAR-100"), ("svhn", "SVHN")])
def test_torchvision_datasets_missing(tmp_path, name, label):
    with pytest.raises(DataError, match=f"{label} not found in .*pass --download"):
        load_dataset(name, tmp_path)


def test_device_augmentation_has_the_distribution_of_torchvision_transforms():
    """Same image through torchvision's RandomCrop(padding) + RandomHorizontalFlip and through the
    DeviceLoader: the frequency of every (window, flip) outcome must agree (two-sample chi-square)."""
    from torchvision import transforms

    torch.manual_seed(0)
    n, p, size = 3000, 2, 5
    img = torch.randint(1, 255, (3, size, size), dtype=torch.uint8)
    tv = transforms.Compose([transforms.RandomCrop(size, padding=p), transforms.RandomHorizontalFlip()])
    ours = DeviceLoader(img.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long), n, (0.0,) * 3,
                        (1 / 255,) * 3, "cpu", crop_padding=p, flip=True, generator=torch.Generator().manual_seed(2))
    ours_out = next(iter(ours))[0].round().to(torch.uint8)
    tv_out = torch.stack([tv(img) for _ in range(n)])

    def counts(batch):
        keys = {}
        for o in batch:
            k = o.flatten().tolist().__repr__()
            keys[k] = keys.get(k, 0) + 1
        return keys

    a, b = counts(ours_out), counts(tv_out)
    assert set(a) == set(b)                       # exactly the same set of possible outputs
    chi2 = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in a)
    dof = len(a) - 1                              # 49 outcomes (25 windows x 2 flips, minus coincidences)
    assert chi2 < dof + 4 * (2 * dof) ** 0.5      # ~4 sigma above the mean of a chi-square
