import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msrdarts.data import (DeviceLoader, ImageData, StreamData, dataset_info, list_datasets, load_dataset,
                           search_split, subset_split)
from msrdarts.data.registry import DatasetInfo, dataset_spec, reader, reader_of
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


def test_registry_is_one_table_with_a_reader_per_name():
    fixed = {"digits": (10, 1, 8, "cifar"), "cifar10": (10, 3, 32, "cifar"), "cifar100": (100, 3, 32, "cifar"),
             "svhn": (10, 3, 32, "cifar"), "imagenet": (1000, 3, 224, "imagenet")}
    assert list_datasets() == ["digits", "cifar10", "cifar100", "svhn", "npz", "folder", "imagenet"]
    for name in list_datasets():
        assert callable(reader_of(name)) and dataset_spec(name).name == name
        if name in fixed:
            info = dataset_info(name)
            assert isinstance(info, DatasetInfo) and tuple(vars(info).values()) == fixed[name]
        else:   # npz, folder: the shape comes from the files
            with pytest.raises(ConfigError, match=f"dataset '{name}' takes its shape from its files; "
                                                  f"allowed: digits, cifar10, cifar100, svhn, imagenet"):
                dataset_info(name)
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'; allowed: digits, cifar10, cifar100, svhn, "
                                          "imagenet$"):
        dataset_info("mnist")
    # A second reader for a name, or a reader for a name outside the table, is refused.
    before = reader_of("cifar10")
    with pytest.raises(ValueError, match="'cifar10' already has a reader"):
        reader("cifar10")(lambda opts, spec: None)
    with pytest.raises(ValueError, match="'mnist' is not in the registry table"):
        reader("mnist")
    assert reader_of("cifar10") is before and "mnist" not in list_datasets()


def test_registry_imports_no_torch_numpy_or_torchvision():
    """config.py validates --dataset with the registry: it must stay pure (stdlib and ..errors)."""
    import ast
    import sys
    from pathlib import Path

    import msrdarts.data.registry as registry

    tree = ast.parse(Path(registry.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 2 and node.module == "errors", ast.unparse(node)
                continue
            roots = [node.module.split(".")[0]]
        else:
            continue
        assert all(r in sys.stdlib_module_names or r == "__future__" for r in roots), ast.unparse(node)


def test_image_loaders_share_one_copy_per_device():
    d = load_dataset("digits")
    idx = torch.arange(0, 100, 3)
    a = d.loader("train", 8, "meta", indices=idx)
    b = d.loader("train", 8, "meta", augment=True, shuffle=True, cutout=2)
    t = d.loader("test", 8, "meta")
    assert a.images.device.type == "meta" and a.images is b.images and a.labels is b.labels
    assert a.images.shape == d.x_train.shape and len(a) == 5 and t.images.shape == d.x_test.shape
    # Restricting to indices selects from the shared copy: the batches are those of x_train[indices].
    sub = DeviceLoader(d.x_train[idx], d.y_train[idx], 8, d.mean, d.std, "cpu", shuffle=True, crop_padding=1,
                       cutout=2, generator=torch.Generator().manual_seed(1))
    full = d.loader("train", 8, "cpu", indices=idx, augment=True, shuffle=True, cutout=2,
                    generator=torch.Generator().manual_seed(1))
    for (x1, y1), (x2, y2) in zip(sub, full, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


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


def _noise_tree(root, split, classes, n, size, seed=0):
    """Random RGB images (PNG, lossless) so that every crop and resize is visible in the pixels."""
    from PIL import Image

    g = np.random.default_rng(seed)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_loading_modes_agree_on_unaugmented_images(tmp_path):
    """The same folder in memory and streamed: identical decoded test images and labels."""
    _noise_tree(tmp_path, "train", ["a", "b", "c"], 4, (20, 13))
    _noise_tree(tmp_path, "val", ["a", "b", "c"], 2, (9, 30), seed=1)
    mem = load_dataset("folder", tmp_path, image_size=16, loading="memory")
    st = load_dataset("folder", tmp_path, image_size=16, loading="stream")
    auto = load_dataset("folder", tmp_path, image_size=16)
    assert isinstance(mem, ImageData) and isinstance(st, StreamData) and isinstance(auto, ImageData)
    assert st.stem == mem.stem == "cifar" and st.input_size == mem.input_size == 16
    assert st.num_classes == 3 and torch.equal(st.train_labels, mem.train_labels)
    # Same channel statistics (the stream estimates them from all 12 images here).
    assert st.mean == pytest.approx(mem.mean) and st.std == pytest.approx(mem.std)
    xs, ys = zip(*st.loader("test", 4, "cpu"))
    xm, ym = zip(*mem.loader("test", 4, "cpu"))
    torch.testing.assert_close(torch.cat(xs), torch.cat(xm), rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(ys), torch.cat(ym))
    # The in-memory images are exactly torchvision's Resize of the decoded files.
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor, resize

    path = sorted((tmp_path / "val" / "b").glob("*.png"))[1]
    ref = pil_to_tensor(resize(Image.open(path).convert("RGB"), [16, 16]))
    assert torch.equal(mem.x_test[3], ref)


def test_stream_loader_is_reproducible_whatever_the_workers(tmp_path):
    _noise_tree(tmp_path, "train", ["a", "b"], 5, (40, 30))
    _noise_tree(tmp_path, "val", ["a", "b"], 1, (40, 30))
    d = load_dataset("folder", tmp_path, image_size=72)        # > 64 px: streamed, ImageNet pipeline
    assert isinstance(d, StreamData) and d.stem == "imagenet"

    def epoch(workers, state=None):
        g = torch.Generator().manual_seed(3)
        if state is not None:
            g.set_state(state)
        loader = d.loader("train", 4, "cpu", indices=torch.arange(1, 10), augment=True, shuffle=True, cutout=8,
                          generator=g, workers=workers)
        batches = list(loader)
        return batches, g.get_state()

    b0, after0 = epoch(0)
    b2, after2 = epoch(2)
    assert [x.shape for x, _ in b0] == [(4, 3, 72, 72), (4, 3, 72, 72), (1, 3, 72, 72)]
    assert sorted(torch.cat([y for _, y in b0]).tolist()) == sorted(d.train_labels[1:10].tolist())
    for (x0, y0), (x2, y2) in zip(b0, b2):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert torch.equal(after0, after2)
    second, _ = epoch(0, after0)                                 # the next epoch differs, and
    assert not torch.equal(second[0][0], b0[0][0])
    again, _ = epoch(2, after0)                                  # restoring the generator repeats it
    assert all(torch.equal(a[0], b[0]) for a, b in zip(second, again))
    # The test pipeline is deterministic: resize the short side to 72*256/224, centre crop.
    x, _ = next(iter(d.loader("test", 2, "cpu")))
    assert x.shape == (2, 3, 72, 72)


def test_stream_loader_names_an_unreadable_image_from_a_worker(tmp_path):
    _noise_tree(tmp_path, "train", ["a", "b"], 3, (70, 70))
    _noise_tree(tmp_path, "val", ["a", "b"], 1, (70, 70))
    d = load_dataset("folder", tmp_path, image_size=66)
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"truncated")
    with pytest.raises(DataError) as info:
        list(d.loader("train", 2, "cpu", workers=1))
    message = str(info.value)
    assert "\n" not in message and message.endswith("unreadable image (cannot identify image file "
                                                     f"'{tmp_path / 'train' / 'b' / '1.png'}')")


def test_imagenet_folder_layout_and_errors(tmp_path):
    with pytest.raises(DataError, match="imagenet data set needs a train/ folder and a val/ folder"):
        load_dataset("imagenet", tmp_path)
    _noise_tree(tmp_path, "train", ["n01", "n02"], 2, (50, 40))
    (tmp_path / "val").mkdir()   # the raw ILSVRC layout: validation images not sorted into class folders
    _noise_tree(tmp_path, "val_flat", ["x"], 1, (50, 40))
    (tmp_path / "val_flat" / "x" / "0.png").replace(tmp_path / "val" / "ILSVRC2012_val_00000001.png")
    with pytest.raises(DataError, match="val: no images in class subfolders"):
        load_dataset("imagenet", tmp_path)
    _noise_tree(tmp_path, "val", ["n01", "n02"], 1, (50, 40))
    d = load_dataset("imagenet", tmp_path)
    assert isinstance(d, StreamData) and d.input_size == 224 and d.stem == "imagenet"
    assert d.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError, match="--loading=memory: 224 px images"):
        load_dataset("imagenet", tmp_path, loading="memory")
    with pytest.raises(ConfigError, match="--image-size=64: cifar10 images are 32 px"):
        load_dataset("cifar10", tmp_path, image_size=64)
    with pytest.raises(ConfigError, match="--loading=stream: digits is always held in memory"):
        load_dataset("digits", loading="stream")


def test_subset_split_is_class_balanced_disjoint_and_seeded():
    labels = torch.tensor([0] * 400 + [1] * 200 + [2] * 120)[torch.randperm(720, generator=torch.Generator().manual_seed(5))]
    tr, va = subset_split(labels, 0.1, 0.025, seed=7)
    assert [int((labels[tr] == c).sum()) for c in range(3)] == [40, 20, 12]
    assert [int((labels[va] == c).sum()) for c in range(3)] == [10, 5, 3]
    assert not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = subset_split(labels, 0.1, 0.025, seed=7)
    tr3, _ = subset_split(labels, 0.1, 0.025, seed=8)
    assert torch.equal(tr, tr2) and torch.equal(va, va2) and not torch.equal(tr, tr3)
    # Every image of a class is equally likely to be drawn: over many seeds, the counts are flat.
    hits = torch.zeros(720)
    for s in range(400):
        hits[subset_split(labels, 0.1, 0.025, seed=s)[0]] += 1
    for c in range(3):   # each image is drawn in Binomial(400, 0.1) runs: variance 36
        h = hits[labels == c]
        assert 25 < h.var().item() < 48 and h.min() > 10 and h.max() < 70
    with pytest.raises(ConfigError, match="--subset=0.9, --subset-valid=0.2"):
        subset_split(labels, 0.9, 0.2)


def test_npz_dataset_reads_arrays_without_pickle(tmp_path):
    import numpy as np

    g = np.random.default_rng(0)
    x_tr = g.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    x_te = g.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x_tr, y_train=np.arange(20) % 4, x_test=x_te, y_test=np.arange(6) % 4)
    d = load_dataset("npz", tmp_path / "d.npz")
    assert d.x_train.shape == (20, 3, 16, 16) and d.num_classes == 4 and d.input_size == 16
    assert torch.equal(d.x_train[3], torch.from_numpy(x_tr[3]).permute(2, 0, 1))   # NHWC -> NCHW
    assert d.mean == pytest.approx(tuple(x_tr.reshape(-1, 3).mean(0) / 255), rel=1e-5)
    assert d.crop_padding == 2 and d.flip
    np.savez(tmp_path / "bad.npz", x_train=x_tr.astype(np.float32), y_train=np.zeros(20), x_test=x_te,
             y_test=np.zeros(6))
    with pytest.raises(DataError, match="x_train must be uint8"):
        load_dataset("npz", tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", x_train=x_tr, y_train=np.zeros(20))
    with pytest.raises(DataError, match=r"missing array\(s\) x_test, y_test"):
        load_dataset("npz", tmp_path / "short.npz")
    with pytest.raises(DataError, match="no such .npz file"):
        load_dataset("npz", tmp_path / "none.npz")


@pytest.mark.parametrize("y_train, classes, message", [
    (np.array([0, 1, -2, 3, -2, 1]), None, "y_train holds label(s) -2 outside 0..3 (2 of 6 labels;"),
    (np.array([0, 1, 2, 3, 4, 1]), ["a", "b", "c", "d"], "y_train holds label(s) 4 outside 0..3 (1 of 6 labels; "
                                                         "4 classes named in 'classes')"),
    (np.array([0.0, 1.0, 2.0, 3.0, 1.0, 1.0]), None, "y_train must hold integer class labels, got float64"),
])
def test_npz_labels_outside_the_classes_are_named_when_read(tmp_path, y_train, classes, message):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    extra = {} if classes is None else {"classes": np.array(classes)}
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y_train, x_test=x[:2], y_test=np.array([0, 3]), **extra)
    with pytest.raises(DataError) as info:
        load_dataset("npz", tmp_path / "d.npz")
    assert str(info.value).startswith(f"{tmp_path / 'd.npz'}: {message}") and "\n" not in str(info.value)
