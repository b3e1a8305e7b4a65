"""The benchmark code runs end to end on a tiny sweep and writes well-formed results."""
import csv
import json

import torch

import fastattn
from fastattn.bench import cli
from fastattn.bench.measure import machine_info, peak_extra_bytes, time_fn
from fastattn.bench.sweeps import SWEEPS, Point, Sweep


class _Progress:
    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass


def test_tiny_sweep_writes_csv_json_png(tmp_path):
    q, k = torch.zeros(8, 1, dtype=torch.int64), torch.zeros(1, 64, 1, dtype=torch.int64)

    def make():
        return {"cpu": lambda: fastattn.hamming_topk(q, k, 4),
                "torch": lambda: fastattn.hamming_topk(q, k, 4, backend="torch")}

    sweep = Sweep("tiny", "tiny sweep", x="L", baseline="torch", memory=True,
                  points=[Point({"L": 64}, make, pairs=8 * 64)])
    rows = cli.run_sweep(sweep, budget_s=0.01, progress=_Progress())
    meta = machine_info()
    meta["command"] = "test"
    cli.print_table(sweep, rows)
    cli.write_results(str(tmp_path), sweep, rows, meta)
    with open(tmp_path / "tiny.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["impl"] for r in table] == ["cpu", "torch"]
    assert float(table[1]["speedup"]) == 1.0
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["machine"]["threads"] == torch.get_num_threads()
    assert data["rows"][0]["pairs_per_s"] > 0
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli.markdown(str(tmp_path / "tiny.json"))
    assert "| cpu |" in table and "(1.00×)" in table


def test_every_sweep_builds_quick_points():
    for name, make in SWEEPS.items():
        sweep = make(True)
        assert sweep.points, name
        assert all(p.params.get(sweep.x) for p in sweep.points), name


def test_measurement_helpers():
    t = time_fn(lambda: sum(range(100)), budget_s=0.01)
    assert 0 < t["p10_s"] <= t["median_s"] <= t["p90_s"]
    extra = peak_extra_bytes(lambda: torch.ones(64 << 20, dtype=torch.uint8))
    assert extra is None or extra >= 32 << 20
