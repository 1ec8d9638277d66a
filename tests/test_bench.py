"""The benchmark machinery: regression check on synthetic measurements, one sleep-based real measurement
(ratio ~10x by construction, so no timing flakiness), the CLI end to end on fake cases, and the pieces of
the GPU suite that need no GPU (FLOP formulas, table rendering)."""

from __future__ import annotations

import json
import time

import pytest

from fxfuse.bench import Registry, SkipCase, TimingConfig, check, load_baseline, paired_ratio, write_baseline
from fxfuse.bench.cli import main, render_table, run_suite
from fxfuse.bench.gpu import (
    attention_flops,
    attention_shape,
    device_slug,
    gbps,
    merge_results,
    render_markdown,
    tflops,
)
from fxfuse.bench.measure import Measurement, quartiles

BASELINE = {"op/attention": 3.0, "op/spp": 2.0, "model/no-pattern": 0.95}


def synthetic(ratio: float) -> Measurement:
    ratios = [ratio * f for f in (0.96, 0.98, 1.0, 1.0, 1.02, 1.04, 0.99)]
    q1, med, q3 = quartiles(ratios)
    return Measurement(med, q1, q3, min(ratios), max(ratios), len(ratios), 1, 1e-3 * ratio, 1e-3, ratios)


def test_30_percent_slowdown_of_one_case_fails_naming_it():
    measured = {name: synthetic(r) for name, r in BASELINE.items()}
    measured["op/spp"] = measured["op/spp"].scaled(1 / 0.7)  # its speedup drops by 30%
    result = check({n: m.ratio for n, m in measured.items()}, BASELINE, tolerance=0.15)
    assert not result.ok
    assert len(result.failures) == 1 and result.failures[0].startswith("op/spp:")
    assert any("REGRESSION op/spp" in line for line in result.lines())


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.0, 1.1, 3.0])
def test_noise_within_tolerance_passes(factor):
    result = check({n: r * factor for n, r in BASELINE.items()}, BASELINE, tolerance=0.15)
    assert result.ok and sorted(result.passed) == sorted(BASELINE)


def test_new_cases_are_reported_and_missing_ones_warned_not_failed():
    result = check({"op/attention": 3.0, "op/brand-new": 0.5}, BASELINE)
    assert result.ok
    assert result.new == ["op/brand-new"]
    assert sorted(result.missing) == ["model/no-pattern", "op/spp"]
    text = "\n".join(result.lines())
    assert "new case" in text and "warning: baseline case not run: op/spp" in text


def test_tolerance_is_validated():
    with pytest.raises(ValueError, match="tolerance"):
        check({}, {}, tolerance=1.5)


def test_timing_config_needs_five_pairs():
    with pytest.raises(ValueError, match="at least 5"):
        TimingConfig(pairs=3)


def test_paired_ratio_on_sleeps_sees_a_large_deterministic_speedup():
    # 100 ms vs 5 ms: 20x by construction; even a wake-up delayed by 10 ms on a loaded machine leaves > 7x.
    m = paired_ratio(lambda: time.sleep(0.1), lambda: time.sleep(0.005), TimingConfig(5, 1, 0.001, 1, clock="wall"))
    assert m.pairs == 5 and len(m.ratios) == 5 and m.inner == 1
    assert 3.0 < m.ratio < 21.0
    assert m.min <= m.q1 <= m.ratio <= m.q3 <= m.max
    assert m.baseline_s > m.optimized_s


def test_cpu_clock_ignores_time_spent_waiting():
    # Busy work 20:1 in CPU time; the sleep added to the fast side is waiting, which the CPU clock skips.
    def busy(n: int) -> None:
        sum(range(n))

    m = paired_ratio(
        lambda: busy(400_000), lambda: (busy(20_000), time.sleep(0.02)), TimingConfig(5, 1, 0.001, 1, clock="cpu")
    )
    assert m.ratio > 5.0


def sleep_registry(opt_sleep_s: float) -> Registry:
    reg = Registry()

    @reg.case("fake/sleep")
    def sleep_case():
        return (lambda: time.sleep(0.05)), (lambda: time.sleep(opt_sleep_s))

    @reg.case("fake/not-here")
    def missing_case():
        raise SkipCase("its module does not exist yet")

    @reg.case("fake/full-only", quick=False)
    def full_only():
        raise AssertionError("a full-only case must not run in --quick")

    @reg.family("fake/family")
    def family():
        raise ImportError("no module named fake_family")

    return reg


def test_cli_fails_on_a_real_injected_slowdown_and_names_the_case(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    out = tmp_path / "results.json"
    # 50 ms vs 2 ms: ~25x (> 5x even with 5 ms wake-up delays); that run's q1 becomes the baseline.
    assert (
        main(
            ["--quick", "--clock", "wall", "--pairs", "5", "--json", str(out), "--write-baseline", str(baseline)],
            registry=sleep_registry(0.002),
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert [c["name"] for c in results["cases"]] == ["fake/sleep"]
    assert {s["name"] for s in results["skipped"]} == {"fake/not-here", "fake/family"}
    assert {"platform", "cpu_count"} <= results["machine"].keys()
    assert {"python", "torch", "triton", "fxfuse"} <= results["versions"].keys()
    first = results["cases"][0]
    assert load_baseline(baseline)["fake/sleep"] == pytest.approx(min(first["q1"], 0.9 * first["ratio"]), rel=1e-2)
    capsys.readouterr()
    # The optimized side now sleeps 25 ms: at most 2x, far below 85% of the baseline.
    assert (
        main(
            ["--quick", "--clock", "wall", "--pairs", "5", "--baseline", str(baseline)], registry=sleep_registry(0.025)
        )
        == 1
    )
    assert "REGRESSION fake/sleep" in capsys.readouterr().out


def test_setup_errors_are_reported_and_fail_the_run(capsys):
    reg = Registry()

    @reg.case("fake/broken")
    def broken():
        raise RuntimeError("optimize crashed")

    assert main(["--quick"], registry=reg) == 1
    assert "fake/broken" in capsys.readouterr().err


def test_results_round_trip_as_baseline_and_table(tmp_path):
    reg = sleep_registry(0.002)
    results = run_suite(reg, quick=True, contains="sleep", config=TimingConfig(5, 1, 0.001, 1, clock="wall"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert set(load_baseline(path)) == {"fake/sleep"}  # a results file serves as a baseline too
    table = render_table(results, {"other": 1.0})
    assert "fake/sleep" in table and "new" in table
    data = write_baseline(results, tmp_path / "b.json")
    assert data["cases"]["fake/sleep"]["ratio"] <= data["cases"]["fake/sleep"]["last_run"]["median"]
    assert "q1" in data["how"]


def test_rewriting_a_baseline_keeps_the_lower_value(tmp_path):
    results = {
        "suite": "cpu",
        "quick": True,
        "date": "d",
        "machine": {},
        "versions": {},
        "cases": [{"name": "a", "ratio": 3.0, "q1": 2.8, "q3": 3.1, "pairs": 9}],
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"cases": {"a": {"ratio": 2.5}}}))
    assert write_baseline(results, path, previous=path)["cases"]["a"]["ratio"] == 2.5


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fxfuse.bench.plot import plot_speedups

    results = {
        "suite": "cpu",
        "cases": [
            {"name": "a", "ratio": 2.0, "q1": 1.9, "q3": 2.1},
            {"name": "b", "ratio": 0.97, "q1": 0.95, "q3": 1.0},
        ],
    }
    path = plot_speedups(results, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_flop_formulas():
    assert attention_flops(1, 1, 1024, 64, causal=False) == 4 * 1024 * 1024 * 64
    assert attention_flops(2, 8, 1024, 64, causal=True) == 0.5 * attention_flops(2, 8, 1024, 64, causal=False)
    fwd = attention_flops(2, 8, 1024, 64, causal=False)
    assert attention_flops(2, 8, 1024, 64, causal=False, mode="fwd+bwd") == pytest.approx(3.5 * fwd)
    assert tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert gbps(2e9, 1000.0) == pytest.approx(2.0)
    assert attention_shape(16384, 128) == (1, 16) and attention_shape(1024, 64) == (16, 32)
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 8, 8, causal=False, mode="bwd")


def test_gpu_markdown_tables_and_merge(tmp_path):
    def rec(impl, ms, mode="fwd"):
        r = {
            "section": "attention",
            "impl": impl,
            "b": 16,
            "h": 32,
            "n": 1024,
            "d": 64,
            "variant": "causal",
            "mode": mode,
            "name": f"attention/{impl}[{mode}]",
            "ms": ms,
            "tflops": 100.0 / ms,
        }
        return r

    from fxfuse.bench.gpu import add_ratios

    attention = add_ratios(
        [
            rec("fxfuse", 1.0),
            rec("sdpa-flash", 0.8),
            {**rec("sdpa-cudnn", 1.0), "skipped": "RuntimeError: no kernel"},
        ]
    )
    attention[2].pop("ms"), attention[2].pop("tflops")
    spp = [
        {
            "section": "spp",
            "name": "spp/yolo",
            "eager_ms": 2.0,
            "fused_ms": 0.5,
            "eager_gbps": 100.0,
            "fused_gbps": 400.0,
            "ratio": 4.0,
        }
    ]
    path = tmp_path / "2026-01-01-nvidia-h200.json"
    merge_results(path, {"device": "NVIDIA H200", "date": "2026-01-01"}, attention)
    data = merge_results(path, {"device": "NVIDIA H200", "date": "2026-01-01"}, spp)
    assert len(data["cases"]) == 4  # the second section did not drop the first
    md = path.with_suffix(".md").read_text()
    assert "| fwd d=64 causal" in md and "125 (0.80x)" in md and "n/a" in md
    assert "| spp/yolo" in md and "4.00x" in md
    assert render_markdown(data) == md
    assert device_slug("NVIDIA H200") == "nvidia-h200"
