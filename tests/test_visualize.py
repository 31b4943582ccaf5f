from msrdarts.visualize import cell_edges, node_positions, plot_genotype
from msrdarts.zoo import get_genotype


def test_drawn_edges_are_the_genotype():
    g = get_genotype("MSR_DARTS")
    edges = cell_edges(g.normal, g.normal_concat)
    # By hand from SPEC section 5: node 2 <- (sep_conv_3x3, 1), (sep_conv_3x3, 0); node 5 <- ..., (dil_conv_5x5, 2)
    assert edges[:2] == [("c_{k-1}", "0", "sep_conv_3x3"), ("c_{k-2}", "0", "sep_conv_3x3")]
    assert edges[4] == ("1", "2", "dil_conv_3x3")       # input node 3 is intermediate node "1"
    assert edges[7] == ("0", "3", "dil_conv_5x5")
    assert edges[8:] == [(str(i), "c_{k}", "") for i in range(4)]
    assert set(node_positions(4)) == {"c_{k-2}", "c_{k-1}", "0", "1", "2", "3", "c_{k}"}


def test_plot_writes_png_and_svg(tmp_path):
    g = get_genotype("DARTS_V2")
    assert plot_genotype(g, tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_genotype(g, tmp_path / "g.svg").read_text()
    assert "<svg" in svg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g.svg"]   # no temporary files left
