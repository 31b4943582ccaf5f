import pytest
import torch

from msrdarts.genotype import edge_index, num_edges
from msrdarts.methods.derive import derive_cell, derive_genotype
from msrdarts.primitives import DARTS_PRIMITIVES, MSR_PRIMITIVES

# A hand-made cost table (lower is better) for 4 steps x 4 ops, with ties on purpose.
COSTS = torch.tensor([
    [5, 3, 4, 6],      # e0  0->2: op 1, cost 3
    [2, 7, 7, 7],      # e1  1->2: op 0, cost 2
    [9, 9, 1, 9],      # e2  0->3: op 2, cost 1
    [8, 8, 8, 0.5],    # e3  1->3: op 3, cost 0.5
    [4, 4, 4, 4],      # e4  2->3: all tied -> op 0, cost 4
    [3, 3, 5, 5],      # e5  0->4: tie ops 0/1 -> op 0, cost 3
    [6, 6, 6, 6],      # e6  1->4
    [5, 3, 5, 5],      # e7  2->4: op 1, cost 3 (ties e5; lower source wins)
    [7, 7, 7, 1],      # e8  3->4: op 3, cost 1
    [10, 10, 10, 10],  # e9  0->5
    [10, 2, 10, 10],   # e10 1->5: op 1, cost 2
    [2, 10, 10, 10],   # e11 2->5: op 0, cost 2 (ties e10; lower source wins)
    [10, 10, 10, 10],  # e12 3->5
    [10, 10, 1.5, 10], # e13 4->5: op 2, cost 1.5
], dtype=torch.float64)

# Worked out by hand from the table above: cheapest edge first within each node.
EXPECTED = [
    ("sep_conv_3x3", 1), ("sep_conv_5x5", 0),
    ("dil_conv_5x5", 1), ("dil_conv_3x3", 0),
    ("dil_conv_5x5", 3), ("sep_conv_3x3", 0),
    ("dil_conv_3x3", 4), ("sep_conv_5x5", 1),
]


def test_edge_numbering():
    assert num_edges(4) == 14
    assert edge_index(4)[:5] == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    assert edge_index(4)[-1] == (4, 5)


def test_hand_computed_cell():
    assert derive_cell(COSTS, MSR_PRIMITIVES) == EXPECTED


def test_genotype_from_two_tables():
    g = derive_genotype(COSTS, COSTS.flip(1), MSR_PRIMITIVES)
    assert list(g.normal) == EXPECTED
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    assert list(g.reduce) == derive_cell(COSTS.flip(1), MSR_PRIMITIVES)
    g.validate(MSR_PRIMITIVES)


def test_reduce_table_with_flipped_ops():
    flipped = derive_cell(COSTS.flip(1), MSR_PRIMITIVES)
    # Flipping the op axis maps op i -> 3 - i; e5's tie (ops 2/3 after the flip) goes to op 2.
    assert flipped[0] == ("dil_conv_5x5", 1)      # e1 row [7,7,7,2]
    assert flipped[1] == ("dil_conv_3x3", 0)      # e0 row [6,4,3,5]
    assert flipped[4] == ("sep_conv_3x3", 3)      # e8 row [1,7,7,7]
    assert flipped[5] == ("dil_conv_3x3", 0)      # e5 row [5,5,3,3] ties e7 row [5,5,3,5]: lower source


def test_darts_style_scores_exclude_none():
    torch.manual_seed(0)
    alpha = torch.randn(14, len(DARTS_PRIMITIVES))
    alpha[:, 0] = 10.0  # 'none' dominates every edge but must never be chosen
    cost = -torch.softmax(alpha, dim=-1)
    cell = derive_cell(cost, DARTS_PRIMITIVES, exclude=("none",))
    assert all(op != "none" for op, _ in cell)
    # Reference by brute force: per node, rank edges by max non-none weight.
    w = torch.softmax(alpha, dim=-1)[:, 1:]
    start = 0
    for node in range(4):
        n = node + 2
        strength = w[start:start + n].max(1).values
        top = sorted(range(n), key=lambda s: (-float(strength[s]), s))[:2]
        assert [s for _, s in cell[2 * node:2 * node + 2]] == top
        for (op, s) in cell[2 * node:2 * node + 2]:
            assert op == DARTS_PRIMITIVES[1 + int(w[start + s].argmax())]
        start += n


def test_shape_and_nan_errors():
    with pytest.raises(ValueError, match="shape"):
        derive_cell(COSTS[:5], MSR_PRIMITIVES)
    bad = COSTS.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        derive_cell(bad, MSR_PRIMITIVES)


# --select max (the authors' ablation) on the same table, by hand: per edge the op of HIGHEST cost
# (ties: lower op), per node the 2 edges of highest such cost (ties: lower source).
#   node 2: e0 max 6 (op 3), e1 max 7 (op 1)              -> e1, e0
#   node 3: e2 9 (op 0), e3 8 (op 0), e4 4                -> e2, e3
#   node 4: e5 5 (op 2), e6 6 (op 0), e7 5, e8 7 (op 0)   -> e8, e6
#   node 5: every edge's max is 10 (op 0, or op 1 for e11) -> sources 0 and 1
MAX_EXPECTED = [
    ("sep_conv_5x5", 1), ("dil_conv_5x5", 0),
    ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 3), ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
]


def test_select_max_is_the_hand_computed_opposite_choice():
    from msrdarts.methods.msr import select_by_rank

    table = torch.stack([COSTS, COSTS])
    geno, cells = select_by_rank(table, table.clone(), [False, True], MSR_PRIMITIVES, select="max")
    assert list(geno.normal) == list(geno.reduce) == MAX_EXPECTED
    assert [list(c.pairs) for c in cells.cells] == [MAX_EXPECTED, MAX_EXPECTED]
    geno, _ = select_by_rank(table, table.clone(), [False, True], MSR_PRIMITIVES, select="min")
    assert list(geno.normal) == EXPECTED


def test_per_cell_genotypes_come_from_each_cells_own_table():
    from msrdarts.methods.derive import derive_cells
    from msrdarts.methods.msr import select_by_rank

    flipped = COSTS.flip(1)
    ranks = torch.stack([COSTS, flipped, COSTS + 100.0])   # cell 2: the same choice as cell 0
    cells = derive_cells(ranks, [False, True, False], MSR_PRIMITIVES)
    assert [c.type for c in cells.cells] == ["normal", "reduce", "normal"]
    assert list(cells.cells[0].pairs) == EXPECTED == list(cells.cells[2].pairs)
    assert list(cells.cells[1].pairs) == derive_cell(flipped, MSR_PRIMITIVES)
    assert all(c.concat == (2, 3, 4, 5) for c in cells.cells)
    # Two normal cells that disagree: each keeps its own choice, the mean table makes a third one.
    a = torch.full((14, 4), 5.0)
    a[:, 0] = 1.0                      # cell a: sep_conv_3x3 everywhere
    b = torch.full((14, 4), 5.0)
    b[:, 3] = 0.5                      # cell b: dil_conv_5x5 everywhere (mean: 2.75 < 3.0 -> dil_conv_5x5)
    ranks = torch.stack([a, b])
    table = torch.stack([ranks.mean(0), ranks.mean(0)])
    geno, cells = select_by_rank(table, ranks, [False, False], MSR_PRIMITIVES)
    assert {op for op, _ in cells.cells[0].pairs} == {"sep_conv_3x3"}
    assert {op for op, _ in cells.cells[1].pairs} == {"dil_conv_5x5"}
    assert {op for op, _ in geno.normal} == {"dil_conv_5x5"}


def test_cells_with_one_table_equal_the_mean_derivation():
    from msrdarts.methods.msr import select_by_rank

    ranks = torch.stack([COSTS, COSTS.flip(1), COSTS, COSTS, COSTS.flip(1), COSTS])
    red = [False, True, False, False, True, False]
    table = torch.stack([ranks[[0, 2, 3, 5]].mean(0), ranks[[1, 4]].mean(0)])
    for select in ("min", "max"):
        geno, cells = select_by_rank(table, ranks, red, MSR_PRIMITIVES, select)
        for c in cells.cells:
            assert c.pairs == (geno.reduce if c.type == "reduce" else geno.normal)
    with pytest.raises(ValueError, match="3 cost tables for 2 cells"):
        from msrdarts.methods.derive import derive_cells
        derive_cells(ranks[:3], [False, True], MSR_PRIMITIVES)
