"""Run reports and method comparisons written from synthetic metrics."""

import json

from PIL import Image

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
    for expected in ("12.35", "9.88", "123.46", "0.43", "285.71×", "2 min 05 s", "3.20 TFLOPs", "734.0 MB"):
        assert expected in text
    # Byte totals come from the records when the summary has none: (4 x 1.5 + 4 x 3.0) MB up, 8 x 3 MB down.
    assert "18.0 MB" in text and "24.0 MB" in text
    # Stage table: per-stage bytes and the last evaluation of each stage (rounds 4 and 8).
    assert "| 1 | 1–4 (4) | 6.0 MB | 12.0 MB | 4 | 80.00 | 8.00 | 7.00 |" in text
    assert "| 2 | 5–8 (4) | 12.0 MB | 12.0 MB | 8 | 120.00 | 12.00 | 11.00 |" in text
    for name in ("retrieval", "bytes", "loss"):
        assert f"(plots/{name}.png)" in text
        assert (tmp_path / "plots" / f"{name}.png").is_file()


def test_comparison_writes_table_plots_and_json(tmp_path):
    runs = {
        "e2e": retrieval_metrics("e2e", 4_000_000),
        "lw": retrieval_metrics("lw", 1_000_000),
        "prog": retrieval_metrics("prog", 2_000_000),
    }
    summaries = {
        "e2e": {
            "rsum": 150.0,
            "i2t_r1": 20.0,
            "t2i_r1": 15.0,
            "bytes_up_total": 48_000_000,
            "wall_time_s": 90,
        },
        "lw": {
            "rsum": 120.0,
            "i2t_r1": 16.0,
            "t2i_r1": 12.0,
            "bytes_up_total": 12_000_000,
            "wall_time_s": 40,
        },
        "prog": {"rsum": 155.5, "i2t_r1": 21.0, "t2i_r1": 16.0, "wall_time_s": 3725},
    }
    path = write_comparison(tmp_path, summaries, runs, preset="emoji")
    text = path.read_text()
    assert text.startswith("# Comparison on emoji")
    assert "| e2e | 150.00 | 20.00 | 15.00 | 48.0 MB | 64.0 MB | 1.00× | 1 min 30 s |" in text
    assert "| lw | 120.00 | 16.00 | 12.00 | 12.0 MB | 16.0 MB | 0.25× | 40.0 s |" in text
    # prog has no byte total in its summary, so it is summed from its records: 4 x 2 + 4 x 4 MB.
    assert "| prog | 155.50 | 21.00 | 16.00 | 24.0 MB | 32.0 MB | 0.50× | 1 h 02 min 05 s |" in text
    assert json.loads((tmp_path / "comparison.json").read_text()) == summaries
    for name in ("comparison_rsum", "comparison_rsum_vs_bytes", "comparison_bytes"):
        assert f"({name}.png)" in text
    assert_pngs(plot_comparison(runs, tmp_path / "again"))


def test_comparison_of_classification_runs_uses_accuracy(tmp_path):
    runs = {"e2e": classification_metrics(), "lw": classification_metrics()}
    summaries = {"e2e": {"accuracy": 47.0, "macro_f1": 0.36}, "lw": {"accuracy": 45.25, "macro_f1": 0.34}}
    text = write_comparison(tmp_path, summaries, runs, preset="fashion").read_text()
    assert "accuracy (%)" in text and "rsum" not in text
    assert "| lw | 45.25 | 0.34 |" in text
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
