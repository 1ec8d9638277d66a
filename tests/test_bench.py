"""The benchmark machinery: regression check on synthetic measurements, one sleep-based real measurement
(ratio ~10x by construction, so no timing flakiness), the CLI end to end on fake cases, and the pieces of
the GPU suite that need no GPU (FLOP formulas, table rendering)."""

from __future__ import annotations

import json
import time

import pytest

from fxfuse.bench import Registry, SkipCase, TimingConfig, check, load_baseline, paired_ratio, write_baseline
from fxfuse.bench.cli import gate, main, pool_rounds, render_table, run_suite
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
from fxfuse.bench.regression import DEFAULT_TOLERANCE, NO_PATTERN_FLOOR, RECHECK_PAIRS_FACTOR

BASELINE = {"op/attention": 3.0, "op/spp": 2.0, "model/no-pattern": 1.0}
FLOORS = {"model/no-pattern": 0.95}


def synthetic(ratio: float, pairs: int = 7) -> Measurement:
    spread = (0.96, 0.98, 1.0, 1.0, 1.02, 1.04, 0.99)
    ratios = [ratio * spread[i % len(spread)] for i in range(pairs)]
    q1, med, q3 = quartiles(ratios)
    return Measurement(med, q1, q3, min(ratios), max(ratios), len(ratios), 1, 1e-3 * ratio, 1e-3, ratios)


def scaled(**factors: float) -> dict[str, float]:
    """The baseline's medians, with the named cases' speedups multiplied (ops/spp -> ops_spp)."""
    return {n: r * factors.get(n.replace("/", "_").replace("-", "_"), 1.0) for n, r in BASELINE.items()}


@pytest.mark.parametrize("slowdown", [0.25, 0.3, 0.5])
def test_a_25_percent_regression_of_any_case_fails_naming_it(slowdown):
    for name in ("op/attention", "op/spp"):
        measured = {n: synthetic(r) for n, r in BASELINE.items()}
        measured[name] = measured[name].scaled(1 / (1 - slowdown))  # its speedup drops by `slowdown`
        result = check({n: m.ratio for n, m in measured.items()}, BASELINE, floors=FLOORS)
        assert not result.ok and result.regressed == [name]
        assert len(result.failures) == 1 and result.failures[0].startswith(f"REGRESSION {name}:")
        assert "FAILED" in result.lines()[-1]


@pytest.mark.parametrize("factor", [0.85, 0.9, 0.95, 1.0, 1.1, 3.0])
def test_a_wobble_of_up_to_15_percent_passes(factor):
    result = check({n: r * factor for n, r in BASELINE.items() if n != "model/no-pattern"} | {"model/no-pattern": 1.0},
                   BASELINE, floors=FLOORS)  # fmt: skip
    assert result.ok and sorted(result.passed) == sorted(BASELINE) and not result.regressed


@pytest.mark.parametrize(("ratio", "ok"), [(0.94, False), (0.949, False), (0.95, True), (0.97, True)])
def test_a_model_with_nothing_to_fuse_fails_below_the_absolute_floor(ratio, ok):
    # The floor holds whatever the baseline says: here the baseline itself recorded the slow ratio.
    result = check(scaled(model_no_pattern=ratio), BASELINE | {"model/no-pattern": ratio}, floors=FLOORS)
    assert result.ok is ok
    if not ok:
        assert result.regressed == ["model/no-pattern"] and result.failures[0].startswith("SLOWER model/no-pattern")


def test_a_case_that_could_not_run_fails_with_its_error():
    measured = scaled()
    del measured["op/spp"]
    result = check(measured, BASELINE, errors={"op/spp": "ImportError: no module named fxfuse.fusion.spp"})
    assert not result.ok and not result.regressed  # an error is not measured again
    assert result.failures == ["ERROR op/spp: could not run: ImportError: no module named fxfuse.fusion.spp"]


def test_a_baseline_case_not_run_fails_and_a_new_case_fails_with_how_to_record_it():
    measured = scaled() | {"op/brand-new": 0.5}
    del measured["op/spp"]
    result = check(measured, BASELINE)
    assert not result.ok and not result.regressed
    text = "\n".join(result.lines())
    assert "MISSING op/spp: in the baseline but not run" in text
    assert "NEW op/brand-new: not in the baseline" in text and "--cases 'op/brand-new' --write-baseline" in text


def test_tolerance_is_validated():
    with pytest.raises(ValueError, match="tolerance"):
        check({}, {}, tolerance=1.5)
    assert DEFAULT_TOLERANCE == 0.2 and NO_PATTERN_FLOOR == 0.95


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

    @reg.case("fake/full-only", quick=False)
    def full_only():
        raise AssertionError("a full-only case must not run in --quick")

    return reg


def test_cli_fails_on_a_real_injected_slowdown_and_names_the_case(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    out = tmp_path / "results.json"
    # 50 ms vs 2 ms: ~25x (> 5x even with 5 ms wake-up delays); that run's median becomes the baseline.
    assert (
        main(
            ["--quick", "--clock", "wall", "--pairs", "5", "--json", str(out), "--write-baseline", str(baseline)],
            registry=sleep_registry(0.002),
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert [c["name"] for c in results["cases"]] == ["fake/sleep"] and not results["errors"]
    assert {"platform", "cpu_count"} <= results["machine"].keys()
    assert {"python", "torch", "triton", "fxfuse"} <= results["versions"].keys()
    assert load_baseline(baseline)["fake/sleep"] == pytest.approx(results["cases"][0]["ratio"], rel=1e-2)
    capsys.readouterr()
    # The optimized side now sleeps 25 ms: at most 2x, far below 80% of the baseline, twice.
    assert (
        main(
            ["--quick", "--clock", "wall", "--pairs", "5", "--baseline", str(baseline)], registry=sleep_registry(0.025)
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "REGRESSION fake/sleep" in captured.out and "measuring again with 15 pairs" in captured.err
    assert "both pooled" in captured.err


def broken_registry() -> Registry:
    reg = Registry()

    @reg.case("fake/crashes")
    def crashes():
        raise RuntimeError("optimize crashed")

    @reg.case("fake/not-importable")
    def not_importable():
        raise ImportError("no module named fxfuse.fusion.ssm")

    @reg.case("fake/skips")
    def skips():
        raise SkipCase("needs a module that is not there")

    @reg.family("fake/family")
    def family():
        raise ImportError("no module named fake_family")

    return reg


def test_cases_that_cannot_run_fail_the_run_with_their_errors(tmp_path, capsys):
    assert main(["--quick"], registry=broken_registry()) == 1
    err = capsys.readouterr().err
    for name, reason in [
        ("fake/crashes", "RuntimeError: optimize crashed"),
        ("fake/not-importable", "ImportError: no module named fxfuse.fusion.ssm"),
        ("fake/skips", "SkipCase: needs a module"),
        ("fake/family", "cannot list its cases: ImportError: no module named fake_family"),
    ]:
        assert f"ERROR {name}: {reason}" in err
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"suite": "cpu", "quick": True, "cases": {"fake/crashes": {"median": 2.0}}}))
    assert main(["--quick", "--baseline", str(baseline)], registry=broken_registry()) == 1
    out = capsys.readouterr().out
    assert "ERROR fake/crashes: could not run: RuntimeError: optimize crashed" in out and "FAILED" in out
    # ... and no baseline is written from such a run
    assert main(["--quick", "--write-baseline", str(tmp_path / "new.json")], registry=broken_registry()) == 1
    assert not (tmp_path / "new.json").exists() and "not writing a baseline" in capsys.readouterr().err


def one_case_registry() -> Registry:
    reg = Registry()

    @reg.case("fake/op")
    def op():
        return (lambda: None), (lambda: None)

    return reg


@pytest.mark.parametrize(
    ("second", "ok"),
    [(1.0, True), (0.75, False)],
    ids=["a burst of load passes", "a regression seen twice fails"],
)
def test_a_failing_case_is_measured_again_with_more_pairs_and_that_decides(monkeypatch, second, ok):
    # Synthetic measurements: the first run of the case comes out 30% low, the second as given.
    pairs = []

    def fake_paired_ratio(base, opt, config):
        pairs.append(config.pairs)
        return synthetic(3.0 * (0.7 if len(pairs) == 1 else second), config.pairs)

    monkeypatch.setattr("fxfuse.bench.cli.paired_ratio", fake_paired_ratio)
    config = TimingConfig(pairs=7)
    results = run_suite(one_case_registry(), quick=True, config=config)
    outcome = gate(one_case_registry(), results, {"fake/op": 3.0}, DEFAULT_TOLERANCE, config)
    assert pairs == [7, 7 * RECHECK_PAIRS_FACTOR]
    assert outcome.ok is ok
    record = results["cases"][0]  # both measurements pooled: the second one's 21 pairs outvote the first's 7
    assert record["round_medians"] == pytest.approx([2.1, 3.0 * second]) and record["pairs"] == 28
    assert record["ratio"] == pytest.approx(3.0 * second, rel=0.03)


def test_baseline_records_this_runs_medians_up_or_down_never_a_ratchet(tmp_path):
    def run(**ratios: float) -> dict:
        cases = [
            {"name": n, "ratio": r, "q1": 0.9 * r, "q3": 1.1 * r, "iqr_rel": 0.2, "pairs": 15}
            for n, r in ratios.items()
        ]
        return {"suite": "cpu", "quick": True, "date": "2026-12-03", "machine": {"cpu_count": 2}, "versions": {},
                "cases": cases, "errors": []}  # fmt: skip

    path = tmp_path / "b.json"
    write_baseline(run(a=3.0, b=2.0), path)
    assert load_baseline(path) == {"a": 3.0, "b": 2.0}
    write_baseline(run(a=3.6, b=1.5), path)  # a new run replaces both values, the lower one too
    data = json.loads(path.read_text())
    assert load_baseline(path) == {"a": 3.6, "b": 1.5}
    assert data["cases"]["b"] == {"median": 1.5, "q1": 1.35, "q3": 1.65, "iqr_rel": 0.2, "pairs": 15,
                                  "date": "2026-12-03"}  # fmt: skip
    assert data["source"]["machine"] == {"cpu_count": 2} and "never lowered" in data["how"]
    write_baseline(run(c=1.2), path, previous=path)  # --cases: one entry added, the others kept
    assert load_baseline(path) == {"a": 3.6, "b": 1.5, "c": 1.2}


def test_rounds_pool_each_cases_pairs(monkeypatch):
    # Three rounds at 2.0x, 3.0x and 2.5x: the pooled median is the middle round's level, not the lowest.
    levels = iter([2.0, 3.0, 2.5])
    monkeypatch.setattr("fxfuse.bench.cli.paired_ratio", lambda base, opt, config: synthetic(next(levels)))
    rounds = [run_suite(one_case_registry(), quick=True, config=TimingConfig(pairs=7)) for _ in range(3)]
    record = pool_rounds(rounds)["cases"][0]
    assert record["pairs"] == 21 and record["round_medians"] == [2.0, 3.0, 2.5]
    assert record["ratio"] == pytest.approx(2.5) and record["q1"] < record["ratio"] < record["q3"]


def test_baselines_of_the_old_rule_or_of_another_kind_of_run_are_refused(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"suite": "cpu", "quick": True, "cases": {"fake/op": {"ratio": 2.5}}}))
    with pytest.raises(ValueError, match="no recorded median"):
        load_baseline(old)
    assert main(["--quick", "--baseline", str(old)], registry=one_case_registry()) == 1
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"suite": "cpu", "quick": False, "cases": {"fake/op": {"median": 1.0}}}))
    assert main(["--quick", "--baseline", str(full)], registry=one_case_registry()) == 1
    assert "recorded by a full run" in capsys.readouterr().err


def test_results_round_trip_as_baseline_and_table(tmp_path):
    reg = sleep_registry(0.002)
    results = run_suite(reg, quick=True, contains="sleep", config=TimingConfig(5, 1, 0.001, 1, clock="wall"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert set(load_baseline(path)) == {"fake/sleep"}  # a results file serves as a baseline too
    table = render_table(results, {"other": 1.0})
    assert "fake/sleep" in table and "new" in table
    data = write_baseline(results, tmp_path / "b.json")
    assert data["cases"]["fake/sleep"]["median"] == pytest.approx(results["cases"][0]["ratio"], rel=1e-3)


def test_the_committed_baseline_covers_the_quick_suite_and_the_suite_labels_what_it_times():
    import fxfuse.bench.cases  # noqa: F401  (registers the CPU suite)
    from fxfuse.bench import REGISTRY
    from fxfuse.bench.registry import REPO_ROOT

    quick = [c for c in REGISTRY.select("cpu", quick=True)]
    assert all(not isinstance(c, tuple) for c in quick), quick  # every family lists its cases
    baseline = load_baseline(REPO_ROOT / "benchmarks/baselines/cpu.json")
    assert sorted(baseline) == sorted(c.name for c in quick)
    floors = {c.name: c.floor for c in quick if c.floor is not None}
    assert floors == {"model/no-pattern": NO_PATTERN_FLOOR, "model/plain_cnn": NO_PATTERN_FLOOR}
    for c in REGISTRY.select("cpu", quick=False):
        # fxfuse::attention runs ATen SDPA on CPU, so its op cases say so; linear attention is our own code
        if c.name.startswith("op/") and "attention" in c.name and not c.name.startswith("op/linear_attention"):
            assert "sdpa-vs-naive" in c.name and c.note.startswith("ATen SDPA vs naive eager")


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
