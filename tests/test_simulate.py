"""``balancekit simulate``: the discrete-event simulator and its command."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from balancekit import ConfigError
from balancekit._plugins import make_plugin_manager
from balancekit.cli import cli
from balancekit.simulate import SCENARIOS, BackendModel, Scenario, load_scenario, run, simulate

ALGORITHMS = {
    name: cls
    for name, (cls, _) in make_plugin_manager(entry_points=False).classes("algorithm").items()
}


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["simulate", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_the_same_seed_gives_the_same_numbers() -> None:
    chosen = {n: ALGORITHMS[n] for n in ("random", "p2c", "least_response_time")}
    first = run(SCENARIOS["flaky-backend"], chosen, requests=5000, seed=7)
    assert run(SCENARIOS["flaky-backend"], chosen, requests=5000, seed=7) == first
    assert run(SCENARIOS["flaky-backend"], chosen, requests=5000, seed=8) != first


@pytest.mark.parametrize("seed", [1, 2])
def test_an_mm1_backend_matches_queueing_theory(seed: int) -> None:
    # M/M/1: Poisson arrivals at lambda, exponential service at mu: the mean
    # time in the system is 1 / (mu - lambda). mu = 100/s, lambda = 50/s: 20 ms.
    single = Scenario("mm1", "one server", (BackendModel("only", slots=1, latency_ms=10.0),))
    result = simulate(single, ALGORITHMS["round_robin"], requests=200_000, load=0.5, seed=seed)
    assert result.mean_ms == pytest.approx(20.0, rel=0.05)


def test_json_has_the_contract_shape() -> None:
    code, out, _ = invoke("--json", "--requests", "3000", "--algorithms", "round_robin,p2c")
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"scenario", "seed", "requests", "algorithms"}
    assert (report["scenario"], report["seed"], report["requests"]) == ("slow-backend", 1, 3000)
    assert set(report["algorithms"]) == {"round_robin", "p2c"}
    for result in report["algorithms"].values():
        assert set(result) == {
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "mean_ms",
            "error_rate",
            "share",
            "max_share_ratio",
        }
        assert set(result["share"]) == {"b1", "b2", "b3", "b4", "b5"}
        assert sum(result["share"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
        mean_share = 1 / 5
        assert result["max_share_ratio"] == pytest.approx(
            max(result["share"].values()) / mean_share, abs=1e-3
        )


def test_latency_aware_algorithms_beat_round_robin_with_a_slow_backend() -> None:
    chosen = {n: ALGORITHMS[n] for n in ("round_robin", "least_response_time", "p2c")}
    results = run(SCENARIOS["slow-backend"], chosen, requests=30_000)["algorithms"]
    assert results["p2c"]["p99_ms"] < results["round_robin"]["p99_ms"]
    assert results["least_response_time"]["p99_ms"] < results["round_robin"]["p99_ms"]
    assert results["p2c"]["share"]["b5"] < 0.05  # the slow one is avoided


def test_weighted_shares_match_the_weights() -> None:
    chosen = {n: ALGORITHMS[n] for n in ("weighted_round_robin", "weighted_random")}
    results = run(SCENARIOS["heterogeneous"], chosen, requests=100_000)["algorithms"]
    for result in results.values():
        for i in range(1, 6):
            assert result["share"][f"b{i}"] == pytest.approx(i / 15, abs=0.01)


def test_failures_are_counted_and_fast_failing_backends_avoided() -> None:
    chosen = {n: ALGORITHMS[n] for n in ("round_robin", "least_response_time")}
    results = run(SCENARIOS["flaky-backend"], chosen, requests=20_000)["algorithms"]
    assert results["round_robin"]["error_rate"] == pytest.approx(0.2 * 0.3, abs=0.01)
    assert results["least_response_time"]["error_rate"] < results["round_robin"]["error_rate"]


def test_the_table_and_the_recommendation(tmp_path: Path) -> None:
    plot = tmp_path / "sim.png"
    code, out, err = invoke("--requests", "4000", "--plot", str(plot))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["algorithm", "p50", "ms", "p95"]
    rows = lines[3 : lines.index(next(x for x in lines if x.startswith("recommendation")))]
    p99s = [float(row.split()[3]) for row in rows]
    assert len(p99s) == len(ALGORITHMS)
    assert p99s == sorted(p99s), "sorted by p99"
    assert any(line.startswith("recommendation for slow-backend: ") for line in lines)
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 550)


def test_a_third_party_algorithm_runs_with_options_from_a_scenario_file(tmp_path: Path) -> None:
    code, _, err = invoke("--requests", "2000", "--json")
    assert code == 0
    assert "skipped header_canary: " in err, "needs its canaries: said, not crashed"
    scenario = tmp_path / "fleet.toml"
    scenario.write_text(
        'name = "fleet"\nload = 0.6\n'
        '[[backends]]\nname = "stable"\nslots = 4\n'
        '[[backends]]\nname = "canary"\nslots = 4\nlatency_ms = 30\ndistribution = "lognormal"\n'
        '[algorithms.header_canary]\ncanaries = ["http://canary"]\npercent = 10\n'
    )
    code, out, err = invoke("--scenario-file", str(scenario), "--requests", "5000", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["scenario"] == "fleet"
    canary = report["algorithms"]["header_canary"]
    assert canary["share"]["canary"] == pytest.approx(0.10, abs=0.02)


def test_scenario_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "load = 1.5\nspeed = 3\n"
        '[[backends]]\nslots = 0\ndistribution = "pareto"\n'
        '[[backends]]\nname = "x"\nfailure_rate = 1.2\ncolour = "red"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_scenario(bad)
    message = str(caught.value)
    for expected in (
        "bad.toml: load: must be a share of capacity in (0, 1), got 1.5",
        "bad.toml: speed: unknown key",
        "bad.toml: backends[0].slots: must be a positive integer, got 0",
        "bad.toml: backends[0].distribution: must be one of",
        "bad.toml: backends[1].failure_rate: must be in [0, 1)",
        "bad.toml: backends[1].colour: unknown key",
    ):
        assert expected in message
    code, _, err = invoke("--scenario-file", str(bad))
    assert code == 1 and "invalid scenario" in err


def test_unknown_algorithm_is_refused() -> None:
    code, _, err = invoke("--algorithms", "round_robin,fastest")
    assert code == 1 and "unknown algorithm fastest" in err
