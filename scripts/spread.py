"""Is a reduced recipe able to tell genotypes apart? Compare the spread of the test errors of
different genotypes (random ones of a space) with the seed-to-seed spread of one genotype.

    python scripts/spread.py --genotypes RUN_DIR... --seeds RUN_DIR... [--json OUT.json]

Each RUN_DIR is a finished `msrdarts train` folder (its results.json). Prints one JSON object:
the errors, their sample standard deviations and the ratio genotype-spread / seed-spread (a
recipe can rank methods only where the ratio is well above 1).
"""

import argparse
import json
import statistics
from pathlib import Path


def errors(folders: list[str]) -> list[float]:
    return [json.loads((Path(f) / "results.json").read_text())["test_top1_error"] for f in folders]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotypes", nargs="+", required=True, help="trainings of different genotypes, one seed")
    p.add_argument("--seeds", nargs="+", required=True, help="trainings of one genotype, different seeds")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args()
    g, s = errors(a.genotypes), errors(a.seeds)
    out = {"genotype_errors": g, "seed_errors": s,
           "genotype_std": statistics.stdev(g) if len(g) > 1 else None,
           "seed_std": statistics.stdev(s) if len(s) > 1 else None,
           "genotype_range": max(g) - min(g), "seed_range": max(s) - min(s)}
    if out["genotype_std"] is not None and out["seed_std"]:
        out["ratio"] = out["genotype_std"] / out["seed_std"]
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
