"""The benchmark's verdicts: target lines, growth per doubling, sizes too big for the machine."""

from __future__ import annotations

from benchmarks import run_benchmark as rb


def _row(events, wall, peak_mib, ratio, unresolved=0, runner="local", oracle_eps=12_500):
    return {
        "events": events,
        "runner": runner,
        "wall_s": wall,
        "events_per_s": round(events / wall),
        "peak_rss_mib": peak_mib,
        "ratio_to_oracle": ratio,
        "unresolved_links": unresolved,
        "oracle_events_per_s": oracle_eps,
    }


def test_targets_pass_and_fail_per_size_and_per_doubling():
    rows = [
        _row(1_000_000, 90.0, 3000, 1.8),
        _row(1_000_000, 80.0, 3000, 1.6, runner="prism"),
        _row(2_000_000, 210.0, 5000, 2.5, unresolved=3, oracle_eps=9_000),
    ]
    lines = rb.check_targets(rows)
    assert lines[0].startswith("1,000,000 local ")
    assert "events/s 11,111 PASS" in lines[0] and "peak 2.93 GiB PASS" in lines[0]
    assert "1.8x PASS" in lines[0] and "unresolved_links 0 PASS" in lines[0]
    assert "oracle 12,500 ev/s PASS" in lines[0]
    assert lines[1].startswith("1,000,000 prism")
    assert "events/s 9,524 FAIL" in lines[2] and "peak 4.88 GiB FAIL" in lines[2]
    assert "2.5x FAIL" in lines[2] and "unresolved_links 3 FAIL" in lines[2]
    assert "oracle 9,000 ev/s FAIL" in lines[2]
    # Growth per doubling is the default runner's only.
    assert lines[3] == "time(2,000,000)/time(1,000,000) = 2.33 FAIL (<= 2.2)"
    assert len(lines) == 4


def test_skipped_size_is_reported_and_left_out_of_growth():
    rows = [
        _row(250_000, 100.0, 4000, 6.0),
        _row(500_000, 210.0, 8000, 6.1),
        {"events": 1_000_000, "skipped": "not run: too big"},
    ]
    lines = rb.check_targets(rows)
    assert lines[2] == "1,000,000 local                : not run: too big"
    assert lines[3] == "time(500,000)/time(250,000) = 2.10 PASS (<= 2.2)"
    assert len(lines) == 4


def test_too_big_extrapolates_from_the_largest_measured_size(monkeypatch):
    monkeypatch.setattr(rb, "machine_gib", lambda: 24.0)
    rows = [_row(250_000, 100.0, 3 * 1024, 6.0), _row(500_000, 200.0, 6 * 1024, 6.0)]
    assert rb.too_big(rows, 1_000_000) is None  # 12 GiB fits
    reason = rb.too_big(rows, 2_000_000)  # 24 GiB does not
    assert reason.startswith("not run: peak memory extrapolated from 500,000 events is 24.0 GiB")
    assert rb.too_big([], 2_000_000) is None


def test_lookup_benchmark_runs_end_to_end_and_every_lookup_finds_its_profile(tmp_path):
    """The lookup benchmark on a small SQLite store: every phase answers, no request fails (the
    keys are all identifiers of loaded profiles, so a 404 would be a lookup bug)."""
    import json

    from benchmarks.lookup_latency import main

    out = tmp_path / "lookup.json"
    assert main(["--profiles", "300", "--seconds", "0.3", "--stores", "sqlite", "--rate", "100",
                 "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())["stores"]["sqlite"]
    for phase in ("closed_1", "closed_16", "open"):
        assert res[phase]["requests"] > 0 and res[phase]["errors"] == 0
    assert res["write_profiles_per_s"] > 0


def test_element_steps_are_summed_per_top_level_transform():
    from benchmarks.where_time_goes import element_steps

    producers = {
        "PCollection_1": "Read[web]/ReadLines/ReadRange",
        "PCollection_2": "StitchIdentities/Connect[1]/ParDo(_ConnectGroupedFn)",
        "PCollection_3": "StitchIdentities/Pair",
    }
    counts = {
        "ref_PCollection_PCollection_1": 100,
        "ref_PCollection_PCollection_2": 250,
        "PCollection_3": 50,
        "pcollection_7": 9,  # made by the runner (a lifted combiner): no step names it
    }
    assert element_steps(counts, producers) == [
        ("StitchIdentities", 300),
        ("Read", 100),
        ("(runner)", 9),
    ]


def test_stitching_cost_runs_and_reports_state_and_time(capsys):
    """The stitching cost benchmark (README: state per identifier, time per event) runs on a
    small input and prints each of its numbers (it once broke silently when ``_step`` changed)."""
    from benchmarks.stitching_cost import main

    main(["--events", "300", "--persons", "30"])
    out = capsys.readouterr().out
    for expected in (
        "Link cell per identifier",
        "Connect clusters",
        "bounded stages",
        "streaming stages",
    ):
        assert expected in out, out
