"""Search spaces and the random-search baseline (msrdarts.methods.space), against brute-force enumeration."""

import json
from collections import Counter
from itertools import combinations, product

import pytest
import torch
from scipy.stats import chisquare

from msrdarts.errors import ConfigError
from msrdarts.zoo import load_genotype
from msrdarts.methods.space import count_cells, sample_cell, sample_genotypes, space_ops
from msrdarts.runs.sample import run_sample


def _all_cells(ops, steps):
    """Every cell, enumerated by brute force: per node an unordered pair of distinct inputs and two ops."""
    per_node = [[((o1, a), (o2, b)) for a, b in combinations(range(2 + i), 2) for o1, o2 in product(ops, ops)]
                for i in range(steps)]
    return [tuple(p for node in cell for p in node) for cell in product(*per_node)]


@pytest.mark.parametrize("num_ops,steps", [(1, 2), (2, 2), (2, 3), (3, 2)])
def test_count_cells_matches_enumeration(num_ops, steps):
    assert count_cells(num_ops, steps) == len(set(_all_cells([f"op{k}" for k in range(num_ops)], steps)))


def test_the_spaces():
    assert space_ops("msr") == ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert "none" not in space_ops("darts") and len(space_ops("darts")) == 7
    assert count_cells(4) == 1 * 3 * 6 * 10 * 4 ** 8
    with pytest.raises(ConfigError, match="allowed: msr, darts"):
        space_ops("nas-bench")


def test_random_cells_are_uniform_over_every_valid_cell():
    ops, steps = ("a", "b"), 2
    cells = _all_cells(ops, steps)                                  # 1 * 4 + 3 * 4 -> 48 cells
    g = torch.Generator().manual_seed(0)
    n = 48 * 200
    counts = Counter(tuple(sample_cell(ops, g, steps)) for _ in range(n))
    assert set(counts) <= set(cells)                                # only valid cells, canonical order
    observed = [counts[c] for c in cells]
    assert min(observed) > 0
    assert chisquare(observed).pvalue > 1e-3
    # The same test rejects a sampler that favours one op, so it can fail.
    biased = Counter(tuple(sample_cell(("a", "a", "b"), g, steps)) for _ in range(n))
    assert chisquare([biased[c] for c in cells]).pvalue < 1e-6


def test_a_parameter_budget_keeps_uniformity_within_it():
    ops = space_ops("msr")
    # A stand-in "parameter count": the number of sep convs in the normal cell.
    seps = lambda geno: float(sum(op.startswith("sep") for op, _ in geno.normal))
    drawn = sample_genotypes("msr", 400, seed=1, params_m=4.0, tolerance=0.2, count_params_m=seps)
    assert all(seps(g) == 4.0 for g, _ in drawn) and all(d >= 1 for _, d in drawn)
    # Within the budget every op still appears equally often in the reduction cell (untouched by it).
    counts = Counter(op for g, _ in drawn for op, _ in g.reduce)
    assert chisquare([counts[o] for o in ops]).pvalue > 1e-3
    with pytest.raises(ConfigError, match="no genotype within 10%"):
        sample_genotypes("msr", 1, seed=0, params_m=100.0, count_params_m=seps, max_draws_per_sample=20)


def test_sample_writes_genotypes_with_their_parameter_count(tmp_path):
    from msrdarts.nn.metrics import count_parameters
    from msrdarts.nn.network import Network

    folders = run_sample("darts", 3, 7, tmp_path / "s", params_m=0.25, tolerance=0.2, layers=8, channels=16,
                         log=lambda m: None)
    assert [f.name for f in folders] == ["sample-00", "sample-01", "sample-02"]
    for f in folders:
        geno = load_genotype(f / "genotype.json", primitives=space_ops("darts"))
        meta = json.loads((f / "sample.json").read_text())
        params = count_parameters(Network(geno, 10, 8, 16, auxiliary=True)) / 1e6
        assert meta["params_m"] == pytest.approx(params, abs=1e-4) and abs(params - 0.25) <= 0.05
        assert meta["method"] == "random" and meta["space"] == "darts" and meta["seed"] == 7
    again = run_sample("darts", 3, 7, tmp_path / "t", params_m=0.25, tolerance=0.2, layers=8, channels=16,
                       log=lambda m: None)
    assert [(a / "genotype.json").read_text() for a in again] == [(f / "genotype.json").read_text() for f in folders]
    with pytest.raises(ConfigError, match="already holds samples"):
        run_sample("msr", 1, 0, tmp_path / "s", log=lambda m: None)
