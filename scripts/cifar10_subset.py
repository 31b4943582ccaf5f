"""Write a class-balanced CIFAR-10 subset as one .npz file for `--dataset npz` (and
scripts/table1-reduced.sh): 500 training and 100 test images per class by default.

    python scripts/cifar10_subset.py data cifar10-5k.npz [--train-per-class 500] [--test-per-class 100] [--download]
"""

import argparse

import numpy as np
from torchvision.datasets import CIFAR10


def balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="CIFAR-10 folder (as for msrdarts --data)")
    p.add_argument("out", help="the .npz file to write")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 (163 MB)")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, train, n in (("train", True, args.train_per_class), ("test", False, args.test_per_class)):
        ds = CIFAR10(args.root, train=train, download=args.download)
        labels = np.asarray(ds.targets)
        idx = balanced(labels, n, rng)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = ds.data[idx], labels[idx]
    np.savez_compressed(args.out, classes=np.array(ds.classes), **arrays)
    print(f"{args.out}: {len(arrays['x_train'])} train / {len(arrays['x_test'])} test images")


if __name__ == "__main__":
    main()
