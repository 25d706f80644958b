from actcomp.app.cli import main
from actcomp.app.compare import ComparePoint, variants
from actcomp.app.plots import plot_compare


def test_variants_expand_gradient_filter_patches():
    labels = [label for label, _ in variants(("none", "hosvd", "gradient_filter"), 0.8, (2, 4, 7))]
    assert labels == ["none", "hosvd", "gradient_filter R2", "gradient_filter R4", "gradient_filter R7"]


def test_compare_writes_csv_and_png(tmp_path, capsys):
    argv = [
        "compare", "--methods", "none,hosvd,gradient_filter", "--patches", "2", "--max-layers", "2",
        "--epochs", "1", "--pretrain-epochs", "1", "--no-progress", "--out", str(tmp_path),
    ]
    assert main(argv) == 0
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert rows[0] == "method,layers,layer_bytes,accuracy" and len(rows) == 1 + 2 * 3
    by_key = {(r.split(",")[0], r.split(",")[1]): int(r.split(",")[2]) for r in rows[1:]}
    for n in ("1", "2"):
        assert by_key[("hosvd", n)] < by_key[("none", n)]
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_plot_handles_zero_bytes(tmp_path):
    points = [ComparePoint("none", 1, 0, 0.5), ComparePoint("none", 2, 100, 0.6)]
    assert plot_compare(points, tmp_path / "p.png").stat().st_size > 1000
