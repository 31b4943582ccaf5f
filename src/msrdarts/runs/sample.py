"""``msrdarts sample``: random genotypes of a search space written as run folders (the random
baseline of ``msrdarts compare``), optionally within a parameter budget."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .._io import write_json
from ..data.registry import dataset_info
from ..errors import ConfigError
from ..genotype import Genotype
from ..methods.space import sample_genotypes
from ..nn.metrics import count_parameters
from ..nn.network import Network
from .folder import GENOTYPE, SAMPLE


def run_sample(space: str, n: int, seed: int, out: str | Path, params_m: float | None = None,
               tolerance: float = 0.1, dataset: str = "cifar10", layers: int = 20, channels: int = 36,
               log: Callable[[str], None] = print) -> list[Path]:
    """Write ``n`` random genotypes into ``out``/sample-KK/ (genotype.json and sample.json).

    Parameters are counted for the evaluation network of ``dataset`` at ``layers`` x ``channels``
    (auxiliary head excluded). Refuses a folder that already holds samples.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.glob("sample-*"))):
        raise ConfigError(f"--out {out}: already holds samples (or is not a folder); choose another --out")
    shape = dataset_info(dataset)

    def count(geno: Genotype) -> float:
        net = Network(geno, shape.num_classes, layers, channels, stem=shape.stem, in_channels=shape.in_channels,
                      input_size=shape.input_size, auxiliary=True)
        return count_parameters(net) / 1e6

    drawn = sample_genotypes(space, n, seed, params_m, tolerance, count)
    width = max(2, len(str(n - 1)))
    folders = []
    for k, (geno, draws) in enumerate(drawn):
        folder = out / f"sample-{k:0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        geno.save(folder / GENOTYPE)
        write_json(folder / SAMPLE, {
            "method": "random", "space": space, "seed": seed, "index": k, "draws": draws,
            "params_m": round(count(geno), 4), "dataset": dataset, "layers": layers, "channels": channels,
            "params_budget_m": params_m, "tolerance": tolerance if params_m is not None else None})
        folders.append(folder)
        log(f"{folder / GENOTYPE}: {geno}")
    return folders
