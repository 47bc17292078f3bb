"""Fleet rounds without Flower: the per-array weighted average, and the status a server writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecl.fleet.rounds import FleetStatus, RoundRecord, aggregate, prom_path, prom_text
from edgecl.fleet.wire import Share


def share(**named: tuple[list, float]) -> Share:
    """share(body__w=([1, 2], 3.0)): `__` stands for `/` in array names."""
    arrays = {k.replace("__", "/"): np.asarray(v, dtype=np.float32) for k, (v, _) in named.items()}
    weights = {k.replace("__", "/"): float(w) for k, (_, w) in named.items()}
    return Share(arrays, weights)


def test_weighted_mean_per_array() -> None:
    agg = aggregate([share(body__w=([0.0, 0.0], 1.0)), share(body__w=([4.0, 8.0], 3.0))])
    np.testing.assert_allclose(agg.arrays["body/w"], [3.0, 6.0])
    assert agg.arrays["body/w"].dtype == np.float32
    assert agg.weights == {"body/w": 4.0}


def test_each_array_averages_over_its_own_participants() -> None:
    a = share(body__w=([1.0], 1.0), head__t1__w=([10.0], 5.0))
    b = share(body__w=([3.0], 1.0), head__t2__w=([7.0], 2.0))
    agg = aggregate([a, b])
    np.testing.assert_allclose(agg.arrays["body/w"], [2.0])
    np.testing.assert_allclose(agg.arrays["head/t1/w"], [10.0])  # only a has task t1
    np.testing.assert_allclose(agg.arrays["head/t2/w"], [7.0])
    assert agg.weights == {"body/w": 2.0, "head/t1/w": 5.0, "head/t2/w": 2.0}


def test_zero_weight_takes_no_part() -> None:
    agg = aggregate([share(head__t__w=([100.0], 0.0)), share(head__t__w=([2.0], 4.0))])
    np.testing.assert_allclose(agg.arrays["head/t/w"], [2.0])
    assert agg.weights["head/t/w"] == 4.0


def test_names_nobody_learned_are_left_out() -> None:
    agg = aggregate([share(body__w=([1.0], 1.0), head__u__w=([5.0], 0.0)),
                     share(body__w=([1.0], 1.0), head__u__w=([6.0], 0.0))])
    assert set(agg.arrays) == {"body/w"} == set(agg.weights)


def test_nothing_to_aggregate() -> None:
    assert aggregate([]).arrays == {}
    assert aggregate([share(body__w=([1.0], 0.0))]).arrays == {}


def test_shape_mismatch_names_the_array() -> None:
    a = share(body__w=([[1.0, 2.0]], 1.0), body__b=([0.0], 1.0))
    b = share(body__w=([1.0, 2.0], 1.0), body__b=([0.0], 1.0))
    with pytest.raises(ValueError, match=r"'body/w'.*\(1, 2\).*\(2,\)|'body/w'.*\(2,\).*\(1, 2\)"):
        aggregate([a, b])


def test_shape_mismatch_counts_even_at_zero_weight() -> None:
    with pytest.raises(ValueError, match="head/t/w"):
        aggregate([share(head__t__w=([1.0], 1.0)), share(head__t__w=([1.0, 2.0], 0.0))])


def test_mean_is_exact_for_large_weights() -> None:
    """Accumulating in float64: big sample counts do not round the mean away."""
    big = 1e9
    agg = aggregate([share(body__w=([1.0], big)), share(body__w=([1.0 + 2**-10], big))])
    np.testing.assert_allclose(agg.arrays["body/w"], [1.0 + 2**-11], rtol=0, atol=1e-7)


def test_rounds_import_neither_flower_nor_torch() -> None:
    """The fleet server's pure parts load on a machine without the `fleet` extra or torch."""
    code = ("import sys, edgecl.fleet.rounds, edgecl.fleet.launch; "
            "print(sorted(m for m in ('flwr', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def record(rnd: int) -> RoundRecord:
    return RoundRecord(round=rnd, started=1000.0 + rnd, duration_s=2.5, nodes_connected=3,
                       sampled=["1", "2", "3"], replied=["1", "2"], failed=["3"],
                       errors={"3": "daemon answered 409"}, bytes_received={"1": 100, "2": 60},
                       aggregate_bytes=100, aggregate_arrays=2,
                       acks={"1": {"seq": 7, "sha256": "ab"}, "2": {"seq": 3, "sha256": "ab"}})


def test_status_file_holds_history_and_totals(tmp_path) -> None:
    path = tmp_path / "fleet" / "status.json"
    st = FleetStatus(path=str(path), num_rounds=3, nodes_connected=3)
    st.rounds += [record(1), record(2)]
    st.write()
    doc = json.loads(path.read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert doc["last_round"]["failed"] == ["3"]
    assert doc["last_round"]["acks"]["1"] == {"seq": 7, "sha256": "ab"}
    assert doc["totals"] == {"rounds_completed": 2, "node_replies": 4, "node_failures": 2,
                             "bytes_received": 320, "last_round_duration_seconds": 2.5,
                             "nodes_connected": 3}
    assert not doc["finished"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["status.json", "status.prom"]


def test_status_rewrite_replaces_both_files(tmp_path) -> None:
    path = tmp_path / "status.json"
    st = FleetStatus(path=str(path), num_rounds=1)
    st.write()
    assert json.loads(path.read_text())["rounds"] == []
    st.rounds.append(record(1))
    st.finished = True
    st.write()
    assert json.loads(path.read_text())["finished"]
    assert "edgecl_fleet_rounds_completed_total 1\n" in prom_path(path).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json", "status.prom"]


def test_no_status_path_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    FleetStatus(path=None, num_rounds=1).write()
    assert list(tmp_path.iterdir()) == []


def test_prom_text_format() -> None:
    text = prom_text({"rounds_completed": 2, "node_replies": 5, "node_failures": 1,
                      "bytes_received": 636, "last_round_duration_seconds": 17.045,
                      "nodes_connected": 3})
    samples = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    assert samples == {"edgecl_fleet_rounds_completed_total": "2",
                       "edgecl_fleet_node_replies_total": "5",
                       "edgecl_fleet_node_failures_total": "1",
                       "edgecl_fleet_bytes_received_total": "636",
                       "edgecl_fleet_last_round_duration_seconds": "17.045",
                       "edgecl_fleet_nodes_connected": "3"}
    for name in samples:
        kind = "counter" if name.endswith("_total") else "gauge"
        assert f"# TYPE {name} {kind}\n" in text
        assert f"# HELP {name} " in text
    assert text.endswith("\n")


def test_prom_path_is_a_sibling(tmp_path) -> None:
    assert prom_path(tmp_path / "s.json") == tmp_path / "s.prom"
    assert prom_path(tmp_path / "status") == tmp_path / "status.prom"
    assert prom_path(tmp_path / "x.prom") == tmp_path / "x.prom.prom"
