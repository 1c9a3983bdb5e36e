"""Run reports and method comparisons written from synthetic metrics."""

import json
import statistics

import pytest
from PIL import Image
from scipy import stats

from fedmml.comparison import combine
from fedmml.report import plot_comparison, plot_run, write_comparison, write_run_report


def retrieval_metrics(method: str, up_per_round: int, rounds_per_stage: int = 4) -> list[dict]:
    """Two stages of per-round records, evaluated every other round."""
    records = []
    for i in range(2 * rounds_per_stage):
        record = {
            "round": i + 1,
            "stage": i // rounds_per_stage + 1,
            "method": method,
            "bytes_up": up_per_round * (1 + i // rounds_per_stage),
            "bytes_down": 2 * up_per_round,
            "train_loss": 3.0 / (i + 1),
        }
        if i % 2:
            record.update(rsum=50.0 + 10 * i, i2t_r1=5.0 + i, t2i_r1=4.0 + i)
        records.append(record)
    return records


def classification_metrics() -> list[dict]:
    """A single-stage classification run."""
    return [
        {"round": r, "stage": 1, "method": "e2e", "bytes_up": 1000, "bytes_down": 1000, "train_loss": 1.0 / r}
        | ({"accuracy": 40.0 + r, "macro_f1": 0.3 + r / 100} if r % 2 == 0 else {})
        for r in range(1, 7)
    ]


def assert_pngs(paths):
    assert paths
    for path in paths:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"


def test_plot_run_writes_valid_pngs(tmp_path):
    paths = plot_run(retrieval_metrics("lw", 1_000_000), tmp_path)
    assert [p.name for p in paths] == ["retrieval.png", "bytes.png", "loss.png"]
    assert_pngs(paths)


def test_plot_run_picks_classification_plots_by_key(tmp_path):
    paths = plot_run(classification_metrics(), tmp_path)
    assert [p.name for p in paths] == ["classification.png", "bytes.png", "loss.png"]
    assert_pngs(paths)


def test_run_report_has_summary_stages_and_plots(tmp_path):
    metrics = retrieval_metrics("lw", 1_500_000)
    summary = {
        "i2t_r1": 12.3456,
        "t2i_r1": 9.876,
        "rsum": 123.456,
        "chance_rsum": 0.4321,
        "wall_time_s": 125.0,
        "clients": 4,
        "rounds": 8,
        "stages": 2,
        "client_flops_total": 3.2e12,
        "client_peak_mem_bytes": 734_003_200,
        "skipped": ["flops"],
    }
    config = {"preset": "emoji", "federation": {"method": "lw"}}
    path = write_run_report(tmp_path, config, summary, metrics)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert text.startswith("# lw on emoji")
    for expected in ("12.35", "9.88", "123.46", "0.43", "285.71×", "2 min 05 s", "3.20 TFLOPs", "700.0 MiB"):
        assert expected in text
    # Byte totals come from the records when the summary has none: (4 x 1.5 + 4 x 3.0) MB up, 8 x 3 MB down.
    assert "18.0 MB" in text and "24.0 MB" in text
    # Stage table: per-stage bytes and the last evaluation of each stage (rounds 4 and 8).
    assert "| 1 | 1–4 (4) | 6.0 MB | 12.0 MB | 4 | 80.00 | 8.00 | 7.00 |" in text
    assert "| 2 | 5–8 (4) | 12.0 MB | 12.0 MB | 8 | 120.00 | 12.00 | 11.00 |" in text
    for name in ("retrieval", "bytes", "loss"):
        assert f"(plots/{name}.png)" in text
        assert (tmp_path / "plots" / f"{name}.png").is_file()
    assert "neck fit" not in text  # only runs that fit necks have the column
    fitted = {"image": {"r2": 0.9612, "width": 80}}
    metrics[4]["neck_fit"] = {"clients": [0, 1], "samples": 64, "encoders": fitted}
    text = write_run_report(tmp_path, config, summary, metrics).read_text()
    assert "| 1 | 1–4 (4) | 6.0 MB | 12.0 MB | 4 | 80.00 | 8.00 | 7.00 | — |" in text
    assert "| 8 | 120.00 | 12.00 | 11.00 | image 0.961 |" in text


def _summary(rsum: float, mem_mib: float, flops: float, up: float, wall: float) -> dict:
    return {
        "rsum": rsum,
        "i2t_r1": rsum / 10,
        "t2i_r1": rsum / 12,
        "client_peak_mem_bytes": mem_mib * 2**20,
        "client_flops_total": flops,
        "bytes_up_total": up,
        "bytes_down_total": 2 * up,
        "wall_s": wall,
    }


def test_comparison_over_seeds_gives_spreads_and_paired_ratios(tmp_path):
    per_seed = {
        "e2e": {0: _summary(150.0, 200, 4e12, 48e6, 90), 1: _summary(160.0, 200, 4e12, 48e6, 100)},
        "lw": {0: _summary(120.0, 100, 1e12, 12e6, 40), 1: _summary(152.0, 100, 1e12, 12e6, 50)},
    }
    combined = combine(per_seed, ("rsum", "i2t_r1", "t2i_r1"))
    runs = {"e2e": retrieval_metrics("e2e", 4_000_000), "lw": retrieval_metrics("lw", 1_000_000)}
    text = write_comparison(tmp_path, combined, runs, preset="emoji").read_text()
    lw = json.loads((tmp_path / "comparison.json").read_text())["lw"]
    assert lw["seeds"]["1"]["rsum"] == 152.0
    assert lw["mean"]["rsum"] == 136.0 and lw["sd"]["rsum"] == pytest.approx(22.627, abs=1e-3)
    # Paired per seed: 120/150 and 152/160; Student's t with one degree of freedom.
    ratio = lw["vs_e2e"]["rsum"]
    assert ratio["per_seed"] == {"0": 0.8, "1": 0.95}
    half = stats.t.ppf(0.975, 1) * statistics.stdev([0.8, 0.95]) / 2**0.5
    assert ratio["mean"] == pytest.approx(0.875) and ratio["high"] == pytest.approx(0.875 + half)
    assert lw["vs_e2e"]["client_peak_mem_bytes"]["mean"] == 0.5
    assert "mean ± sd over seeds 0, 1" in text
    row = next(line for line in text.splitlines() if line.startswith("| lw |"))
    assert "136.00 ± 22.63" in row and f"0.88× [{0.875 - half:.2f}, {0.875 + half:.2f}]" in row
    assert "| 100.0 MiB ± 0.0 MiB | 0.50× | 1.00 TFLOPs ± 0 FLOPs | 0.25× | 12.0 MB ± 0.0 MB | 0.25× |" in row
    for name in ("comparison_rsum", "comparison_rsum_vs_bytes", "comparison_bytes"):
        assert f"({name}.png)" in text
    assert_pngs(plot_comparison(runs, tmp_path / "again"))


def test_comparison_of_one_seed_and_classification_runs(tmp_path):
    runs = {"e2e": classification_metrics(), "lw": classification_metrics()}
    per_seed = {
        "e2e": {3: {"accuracy": 47.0, "macro_f1": 0.36, "bytes_up_total": 1000}},
        "lw": {3: {"accuracy": 45.25, "macro_f1": 0.34, "bytes_up_total": 250}},
    }
    text = write_comparison(
        tmp_path, combine(per_seed, ("accuracy", "macro_f1")), runs, "fashion"
    ).read_text()
    assert "accuracy (%)" in text and "rsum" not in text and "seed 3;" in text
    assert "| lw | 45.25 | 0.34 | 0.96× |" in text  # one seed: no spread, no interval
    assert (tmp_path / "comparison_accuracy.png").is_file()


def test_run_report_splits_the_upload_and_shows_task_figures(tmp_path):
    metrics = retrieval_metrics("lw", 1_000_000)
    for record in metrics:
        blocks = 1_000_000 * record["stage"]
        record["upload_parts"] = {"encoder_blocks": blocks, "stems": 0, "norms_necks": 0, "heads": 3_000_000}
    Image.new("RGB", (8, 8)).save(tmp_path / "confusion.png")
    summary = {"accuracy": 50.0, "confusion": [[1, 2], [3, 4]], "classes": ["a", "b"]}
    text = write_run_report(tmp_path, {"preset": "tiny-av"}, summary, metrics).read_text()
    assert "## Where a client's upload goes" in text
    assert "| 1 | 1.0 MB | 0.0 MB | 0.0 MB | 3.0 MB | 75% |" in text
    assert "| 2 | 2.0 MB | 0.0 MB | 0.0 MB | 3.0 MB | 60% |" in text
    assert "(confusion.png)" in text
    assert "[[1, 2], [3, 4]]" not in text  # lists have their own figure, not a table cell
