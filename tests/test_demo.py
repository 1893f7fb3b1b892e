"""``make demo`` (fastsample/jobs/demo.py): the best sampler beside the usual ones at the same NFE, with a
table, grids and a comparison image; the best row switches to a shipped tuned sampler file when one exists.

The real demo (1000 seeds, the whole test split as reference) is timed in README.md; here the same code
runs on 20 seeds against 200 reference images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fastsample.jobs import demo

# 20 seeds on purpose (the real demo scores 1000): the small-sample warnings are expected here
pytestmark = pytest.mark.filterwarnings("ignore:(FID|KID) from")

SMALL = ["dataset.val_subset=200", "evaluator.kid_subset_size=10", "evaluator.kid_subsets=5"]


def test_demo_rows_files_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    rows = demo.run_demo(5, 20, out, overrides=[*SMALL, f"paths.cache_dir={tmp_path / 'cache'}"])
    assert [row["sampler"] for row in rows[:2]] == [label for label, _ in demo.BASELINES]
    assert "quality schedule" in rows[2]["sampler"]  # the shipped NFE-5 schedule of DPM-Solver++(2M)
    assert all(row["nfe"] == 5 for row in rows)  # the same NFE for every row
    for row in rows:
        assert row["fid"] > 0 and 0 <= row["class_accuracy"] <= 1 and row["sampling_s"] > 0
    names = {path.name for path in out.iterdir()}
    assert {"demo.md", "demo.csv", "comparison.png", "grid-1.png", "grid-2.png", "grid-3.png"} <= names
    with (out / "demo.csv").open() as handle:
        assert [line["sampler"] for line in csv.DictReader(handle)] == [row["sampler"] for row in rows]
    line = demo.summary_line(rows)
    assert line.startswith("At NFE 5: FID") and "euler" in line


def test_best_sampler_prefers_a_shipped_tuned_file(tmp_path, monkeypatch):
    assert demo.best_sampler(5)[1].startswith("dpmpp_2m@file:")
    assert "quality" in demo.best_sampler(10)[1]
    assert "gits" in demo.best_sampler(4)[1]  # no quality schedule at NFE 4: the GITS one
    assert demo.best_sampler(7)[1] == "dpmpp_2m@loglinear"  # nothing shipped at NFE 7
    tuned = tmp_path / "tuned" / "tuned-nfe5.yaml"
    tuned.parent.mkdir()
    tuned.write_text("format: placeholder\n")
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    label, spec = demo.best_sampler(5)
    assert spec == f"tuned:{tuned}" and "tuned" in label
    assert demo.sampler_overrides(spec, 5) == ["sampler=tuned", f"sampler.path={tuned}"]


def test_demo_main_prints_table_time_and_files(tmp_path, capsys, monkeypatch):
    calls = {}

    def fake_run(nfe, seeds, out, best=None, overrides=()):
        calls.update(nfe=nfe, seeds=seeds, best=best)
        return [
            {"sampler": "euler (DDIM update)", "steps": 5, "nfe": 5, "fid": 0.12, "kid": 0.001,
             "class_accuracy": 0.84, "sampling_s": 9.0, "ms_per_image": 9.0},
            {"sampler": "dpmpp_2m, quality schedule (our best)", "steps": 5, "nfe": 5, "fid": 0.037,
             "kid": 0.0, "class_accuracy": 0.86, "sampling_s": 9.0, "ms_per_image": 9.0},
        ]  # fmt: skip

    monkeypatch.setattr(demo, "run_demo", fake_run)
    demo.main(["--nfe", "5", "--seeds", "40", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert calls == {"nfe": 5, "seeds": 40, "best": None}
    assert any(line.startswith("| euler (DDIM update) | 5 | 5 | 0.12 |") for line in printed)
    assert any(line.startswith("demo finished in") and "CPU" in line for line in printed)
    assert printed[-1].startswith(f"files: {Path(tmp_path) / 'comparison.png'}")
