"""The embedded-world benchmarks run end to end in --quick mode (what CI exercises); no timings asserted."""

import json

import pytest
from conftest import load_benchmark


def test_quality_per_compute_quick(tmp_path):
    result = load_benchmark("quality_per_compute").main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
    runs = {r["run"] for r in result["rows"]}
    assert runs == {"base", "SPO", "Diffusion-DPO β=2000"}
    for name in runs - {"base"}:
        rows = sorted((r for r in result["rows"] if r["run"] == name), key=lambda r: r["epoch"])
        assert [r["epoch"] for r in rows] == [1, 2]
        compute = [r["forward_equivalents"] for r in rows]
        assert 0 < compute[0] < compute[1] and compute[1] == 2 * compute[0] or name == "SPO"
        assert all(0 <= r["utility"] <= 1 and r["diversity"] >= 0 for r in rows)
    dpo = [r for r in result["rows"] if r["run"].startswith("Diffusion-DPO")]
    assert all(r["train_rows"] == r["forward_rows"] for r in dpo)  # policy and reference, one row each per image
    for suffix in (".md", ".json", ".png", "_samples.png"):
        assert (tmp_path / f"quality_per_compute_quick{suffix}").stat().st_size > 0
    assert json.loads((tmp_path / "quality_per_compute_quick.json").read_text())["machine"]["torch"]


def test_ablations_quick_runs_each_distinct_variant_once(tmp_path):
    result = load_benchmark("ablations").main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "w"),
                                      "--only", "labels,candidates K"])
    labels = {r["run"]: r for r in result["tables"]["labels"]}
    ks = {r["run"]: r for r in result["tables"]["candidates K"]}
    assert ks["K=4"]["utility"] == labels["step-aware SPM (default)"]["utility"]  # the same run, reused
    assert len(list((tmp_path / "w").iterdir())) == 5  # 3 label variants + K=2 + K=6
    trajectory = labels["trajectory-level (final image's preference)"]
    assert trajectory["forward_rows"] > 0 and trajectory["pairs_trained"] >= 0
    assert "## labels" in (tmp_path / "ablations_quick.md").read_text()


@pytest.mark.parametrize("bad", [["--epochs", "x"]])
def test_bad_arguments_exit_with_usage(bad, tmp_path):
    with pytest.raises(SystemExit):
        load_benchmark("ablations").main(bad)
