import json

import pytest

from msrdarts.genotype import Genotype, GenotypeError, parse_genotype
from msrdarts.zoo import load_genotype
from msrdarts.primitives import DARTS_PRIMITIVES, MSR_PRIMITIVES
from msrdarts.zoo import get_genotype, list_genotypes

DARTS_V2_STRING = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)


def test_parse_darts_string_matches_zoo():
    assert parse_genotype(DARTS_V2_STRING) == get_genotype("DARTS_V2")


def test_parse_accepts_range_and_positional_fields():
    g = get_genotype("MSR_DARTS")
    text = str(g)
    assert "range(2, 6)" in text
    assert parse_genotype(text) == g
    positional = f"Genotype({list(g.normal)!r}, range(2, 6), {list(g.reduce)!r}, range(2, 6))"
    assert parse_genotype(positional) == g


def test_json_round_trip(tmp_path):
    g = get_genotype("PC_DARTS")
    d = g.to_dict()
    assert d["normal"][0] == ["sep_conv_3x3", 1] and d["normal_concat"] == [2, 3, 4, 5]
    path = tmp_path / "g.json"
    g.save(path)
    assert json.loads(path.read_text()) == d
    assert load_genotype(path) == g
    assert Genotype.from_dict(json.loads(json.dumps(d))) == g


def test_load_genotype_from_zoo_name_string_and_darts_file(tmp_path):
    assert load_genotype("P_DARTS") == get_genotype("P_DARTS")
    assert load_genotype(DARTS_V2_STRING) == get_genotype("DARTS_V2")
    f = tmp_path / "g.txt"
    f.write_text(DARTS_V2_STRING + "\n")
    assert load_genotype(f) == get_genotype("DARTS_V2")


@pytest.mark.parametrize("text, fragment", [
    ("__import__('os').system('true')", "expected Genotype"),
    ("Genotype(normal=__import__('os'), normal_concat=[2], reduce=[], reduce_concat=[2])", "only literals"),
    ("Genotype(normal=[('sep_conv_3x3', 0)] * 8, normal_concat=[2], reduce=[], reduce_concat=[2])", "only literals"),
    ("Genotype(normal=[('sep_conv_3x3', 0)", "not a valid"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2])", "missing field"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "normal[1] feeds node 2 from node 2"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[('sep_conv_3x3', 0)], reduce_concat=[2])",
     "two (op, input) pairs per node"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2, 7], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "normal_concat"),
    ("Genotype(normal=[('sep_conv_3x3', 0), (3, 1)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "normal[1]"),
])
def test_malformed_strings_are_rejected_with_a_reason(text, fragment):
    with pytest.raises(GenotypeError, match=None) as info:
        parse_genotype(text)
    assert fragment in str(info.value)


def test_unknown_op_is_named():
    with pytest.raises(GenotypeError, match="reduce\\[0\\] has op 'max_pool_3x3'"):
        load_genotype("DARTS_V2", primitives=("max_pool_3x3",)[:0] + MSR_PRIMITIVES + ("skip_connect",))


def test_bad_json_file_names_file_and_position(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"normal": [["sep_conv_3x3", 0],}')
    with pytest.raises(GenotypeError, match="bad.json: invalid JSON at line 1"):
        load_genotype(f)
    f.write_text('{"normal": [], "normal_concat": [2], "reduce": [], "reduce_concat": [2], "extra": 1}')
    with pytest.raises(GenotypeError, match="unknown field\\(s\\) extra"):
        load_genotype(f)
    with pytest.raises(GenotypeError, match="neither a file"):
        load_genotype(tmp_path / "missing.json")


def test_zoo_is_complete_and_valid():
    assert set(list_genotypes()) == {"MSR_DARTS", "DARTS_V1", "DARTS_V2", "PC_DARTS", "P_DARTS", "PC_DARTS_IMAGENET"}
    for name in list_genotypes():
        g = get_genotype(name)
        g.validate(DARTS_PRIMITIVES)
        assert len(g.normal) == len(g.reduce) == 8
    assert get_genotype("MSR_DARTS").ops() <= set(MSR_PRIMITIVES)
    # SPEC section 5, written out by hand: node 4's edges of the published normal cell.
    assert get_genotype("MSR_DARTS").normal[4:6] == (("dil_conv_3x3", 3), ("dil_conv_3x3", 0))


def _cells_dict():
    g = get_genotype("MSR_DARTS")
    return {"cells": [{"type": "reduce" if k in (2, 5) else "normal",
                       "pairs": [list(p) for p in (g.reduce if k in (2, 5) else g.normal)], "concat": [2, 3, 4, 5]}
                      for k in range(8)]}


def test_per_cell_genotype_round_trips_through_its_file_and_string(tmp_path):
    from msrdarts.genotype import CellGenotypes

    cells = CellGenotypes.from_dict(_cells_dict(), source="x")
    assert cells.layers == 8 and cells.reduction_layers() == (2, 5) and cells.steps == 4
    cells.save(tmp_path / "genotype-cells.json")
    assert load_genotype(tmp_path / "genotype-cells.json") == cells
    assert load_genotype(str(cells)) == cells                      # the JSON string itself
    assert json.loads((tmp_path / "genotype-cells.json").read_text()) == _cells_dict()
    assert cells.ops() == get_genotype("MSR_DARTS").ops()


@pytest.mark.parametrize("change, message", [
    (lambda d: d["cells"][3].pop("type"), "f.json: cells[3]: missing field(s) type"),
    (lambda d: d["cells"][3].update(type="reduction"), "f.json: cells[3]: type 'reduction'; allowed: normal, reduce"),
    (lambda d: d["cells"][1].update(colour=1), "f.json: cells[1]: unknown field(s) colour"),
    (lambda d: d["cells"][0]["pairs"].pop(), "f.json: cells[0] must hold two (op, input) pairs per node, got 7"),
    (lambda d: d["cells"][4]["pairs"][2].__setitem__(1, 3), "f.json: cells[4][2] feeds node 3 from node 3"),
    (lambda d: d.update(extra=1), "f.json: a per-cell genotype is an object with one field, cells"),
    (lambda d: d["cells"].clear(), "f.json: cells is empty"),
])
def test_every_bad_per_cell_file_gets_its_one_line_error(tmp_path, change, message):
    d = _cells_dict()
    change(d)
    path = tmp_path / "f.json"
    path.write_text(json.dumps(d))
    with pytest.raises(GenotypeError) as info:
        load_genotype(path)
    assert str(info.value).startswith(str(path) + message[len("f.json"):]) and "\n" not in str(info.value)
