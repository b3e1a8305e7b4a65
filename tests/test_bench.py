"""The benchmark code runs end to end on a tiny sweep and writes well-formed results."""
import csv
import json
import sys
import types

import pytest
import torch

from fastattn.bench import cli, measure, registry, sweeps, training_sweeps
from fastattn.bench.measure import machine_info, peak_extra_bytes, time_fn
from fastattn.bench.sweep import Cost, Point, Sweep

PNG = b"\x89PNG\r\n\x1a\n"
LIMITS = {"mem_bandwidth_gbs": 10.0, "matmul_gflops": 100.0, "popcount_gwords_per_s": 5.0}
NEW_COLUMNS = ["median_s", "p10_s", "p90_s", "speedup", "behaviours_per_s", "bytes",
               "gb_per_s", "pct_of_bandwidth", "bound_by", "bound_behaviours_per_s",
               "pct_of_bound", "peak_extra_bytes"]


class _Progress:
    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass


def _meta():
    meta = machine_info()
    meta.update(command="test", limits=LIMITS)
    return meta


def test_tiny_hamming_sweep_writes_csv_json_and_plots(tmp_path):
    """The real hamming_topk sweep, cut to its smallest point: every implementation is
    timed with the CPU timer, gets the throughput and roofline columns from the sweep's byte
    model, and CSV, JSON, the sweep plot and the roofline plot are written."""
    sweep = sweeps.hamming_topk_sweep(True, device="cpu")
    sweep.points = sweep.points[:1] + [
        Point({"L": 10**9, "B": 1}, lambda: pytest.fail("built a point that cannot fit"),
              mem_bytes=1 << 62)]
    rows, skipped = cli.run_sweep(sweep, 0.01, _Progress(), timer=time_fn, limits=LIMITS)
    assert {r["impl"] for r in rows} >= {"cpp", "torch", "dense_sdpa"}
    assert skipped == [{"sweep": "hamming_topk", "L": 10**9, "B": 1, "impl": None,
                        "reason": skipped[0]["reason"]}]
    assert "GiB" in skipped[0]["reason"]
    for r in rows:
        assert 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"], r
        assert r["behaviours_per_s"] == pytest.approx(1024 * 256 / r["median_s"])
        assert r["bytes"] > 0 and r["gb_per_s"] == pytest.approx(r["bytes"] / r["median_s"]
                                                                 / 1e9)
        assert r["pct_of_bandwidth"] == pytest.approx(10 * r["gb_per_s"])
        assert r["bound_by"] == ("compute" if r["impl"] == "dense_sdpa" else "popcount")
        assert r["pct_of_bound"] == pytest.approx(
            100 * r["behaviours_per_s"] / r["bound_behaviours_per_s"])
    assert [r["speedup"] for r in rows if r["impl"] == "faiss"] in ([1.0], [])
    cli.print_table(sweep, rows, skipped)
    written = cli.write_results(str(tmp_path), sweep, rows, _meta(), skipped)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == [
        "hamming_topk.csv", "hamming_topk.json", "hamming_topk.png",
        "hamming_topk_roofline.png"]
    with open(tmp_path / "hamming_topk.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["impl"] for r in table] == [r["impl"] for r in rows]
    assert all(table[0][c] != "" for c in NEW_COLUMNS)
    data = json.loads((tmp_path / "hamming_topk.json").read_text())
    assert data["machine"]["threads"] == torch.get_num_threads()
    assert data["machine"]["limits"] == LIMITS and data["roofline"] is True
    assert data["skipped"][0]["reason"] == skipped[0]["reason"]
    for name in ("hamming_topk.png", "hamming_topk_roofline.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG

    md = cli.markdown(str(tmp_path / "hamming_topk.json"))
    assert "| 256 |" in md and "% of popcount" in md and "not measured at L=1000000000" in md
    readme = tmp_path / "README.md"
    begin, end = cli.markers()
    readme.write_text(f"# x\n\n{begin}\nold\n{end}\n\nkept\n")
    cli.main(["--markdown", "--out", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.endswith("kept\n")
    assert "![hamming_topk_roofline](hamming_topk_roofline.png)" in text
    assert "memory bandwidth 10.0 GB/s" in text


def test_speedup_and_skips_per_impl():
    def oom():
        raise MemoryError("pretend")

    def make():
        return {"fast": lambda: None, "base": lambda: sum(range(2000)), "oom": oom,
                "broken": lambda: 1 / 0, "slow": lambda: pytest.fail("a skipped impl ran")}

    sweep = Sweep("tiny", "tiny", x="L", baseline="base", cost=lambda p, i: Cost(bytes=64),
                  points=[Point({"L": 8}, make, pairs=8, skip={"slow": "too slow"})])
    rows, skipped = cli.run_sweep(sweep, 0.01, _Progress(), limits=LIMITS)
    assert [r["impl"] for r in rows] == ["fast", "base"]
    assert rows[1]["speedup"] == 1.0 and rows[0]["speedup"] > 1.0
    assert rows[0]["bound_by"] == "memory"
    assert {s["impl"]: s["reason"] for s in skipped} == {
        "oom": "out of memory: pretend", "slow": "too slow",
        "broken": "failed: ZeroDivisionError('division by zero')"}
    assert [s["impl"] for s in skipped if s.get("error")] == ["broken"]


def test_cuda_without_a_gpu_exits_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        cli.main(["--device", "cuda", "--quick", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
    assert measure.timer_for("cuda") is measure.time_fn_cuda
    assert measure.timer_for("cpu") is measure.time_fn


def test_cuda_timer_reports_do_bench_quantiles_in_seconds(monkeypatch):
    import triton.testing
    calls = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        calls.append((warmup, rep, quantiles))
        fn()
        return [2.0, 1.0, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    t = measure.time_fn_cuda(lambda: None, budget_s=0.4, warmup=2, min_repeat=10)
    assert t == {"median_s": 2e-3, "p10_s": 1e-3, "p90_s": 3e-3, "repeats": None}
    assert calls == [(100, 400, [0.5, 0.1, 0.9])]


def test_every_sweep_builds_quick_points_on_both_devices():
    for device in ("cpu", "cuda"):
        for sweep in registry.select(None, True, device):
            assert sweep.points and sweep.device == device, sweep.name
            assert all(p.params.get(sweep.x) for p in sweep.points), sweep.name
    full = {s.name: s for s in registry.select(["hamming_topk", "eta_serving"], False)}
    for s in full.values():
        assert [p.params["L"] for p in s.points] == sweeps.LENGTHS
        assert s.roofline and s.cost is not None
    assert sweeps.LENGTHS[0] == 256 and sweeps.LENGTHS[-2:] == [65536, 100000]


def test_eta_serving_byte_model_covers_every_impl():
    sweep = sweeps.eta_serving_sweep(True)
    point = sweep.points[0]
    for impl in point.build():
        c = sweep.cost(point.params, impl)
        assert c.bytes > 0 and c.flops > 0, impl
        assert (c.popcounts > 0) == (not impl.startswith("dense")), impl
    # every selected row is read once: at most the whole history, at least k rows
    assert 64 <= sweeps._distinct_rows(256, 1024 * 64) <= 256


def test_registry_lists_every_sweep_and_survives_a_broken_module(monkeypatch):
    assert {"hamming_topk", "eta_training", "unique_rows", "model_training", "uic_apply",
            "uic_score", "sum_serving"} <= set(registry.SWEEPS)
    assert registry.select(["uic_apply"], True, "cuda") == []     # CPU-only: left out
    name = "fastattn.bench.broken_sweeps"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # no such attribute
    with pytest.warns(RuntimeWarning, match="broken_sweeps failed to import"):
        assert registry._optional(name, "SWEEPS") == {}


def test_training_sweeps_record_the_distinct_ratio(tmp_path):
    """The training sweeps run end to end on a tiny point: the distinct-row ratio lands in
    the rows and the README block, with the rate and memory tables."""
    ids = training_sweeps.zipf_ids(1000, (4, 50), seed=1)
    assert ids.shape == (4, 50) and 0 <= int(ids.min()) and int(ids.max()) < 1000
    assert torch.equal(ids, training_sweeps.zipf_ids(1000, (4, 50), seed=1))
    assert torch.unique(ids).numel() < 120            # Zipf: far fewer distinct than 200
    sweep = training_sweeps.unique_rows_sweep(True)
    sweep.points = [Point({"L": 8, "B": 4}, lambda: {}, pairs=32)]
    params = sweep.points[0].params

    def make():
        training_sweeps._record_distinct(params, ids[:, :8])
        return {"cpp": lambda: None, "torch_unique": lambda: None}
    sweep.points[0].build = make
    sweep.rate, sweep.memory = "ids/s", True
    rows, _ = cli.run_sweep(sweep, 0.01, _Progress(), timer=time_fn, limits=LIMITS)
    assert all(r["distinct_ratio"] == params["distinct_ratio"] > 0 for r in rows)
    cli.write_results(str(tmp_path), sweep, rows, _meta())
    text = cli.markdown(str(tmp_path / "unique_rows.json"))
    assert "distinct_ratio by L: 8: " in text and "— ids/s" in text and "MiB" in text


def test_eta_training_impls_run_and_agree(monkeypatch):
    """Every implementation of the eta_training sweep runs on a tiny vocabulary; the indexed
    (retrieve, then look up the winners) and table (eta_attention over the distinct rows)
    compositions give the query gradient of ETA on the dense gather."""
    monkeypatch.setattr(training_sweeps, "N_ITEMS", 300)
    monkeypatch.setattr(training_sweeps, "B", 3)
    sweep = training_sweeps.eta_training_sweep(True)
    impls = sweep.points[0].build()
    assert {"dense_sdpa", "indexed_cpp", "indexed_numba", "indexed_torch", "table_cpp",
            "dense_eta_cpp"} <= set(impls)
    grads = {name: fn().clone() for name, fn in impls.items()}    # each returns q.grad
    for name in grads:
        if name != "dense_sdpa":
            torch.testing.assert_close(grads[name], grads["dense_eta_cpp"], rtol=1e-4, atol=1e-5)
    assert 0 < sweep.points[0].params["distinct_rows"] <= 300


def test_model_training_impls_run(monkeypatch):
    """The model_training sweep's steps (dedup, dense, sparse table gradients) run for every
    model on a tiny vocabulary, the sparse ones leaving sparse table gradients."""
    monkeypatch.setattr(training_sweeps, "N_ITEMS", 300)
    monkeypatch.setattr(training_sweeps, "B", 3)
    impls = training_sweeps.model_training_sweep(True).points[0].build()
    assert {f"{m}_{v}" for m in training_sweeps.MODEL_NAMES
            for v in ("dedup", "dense", "sparse")} == set(impls)
    for name, fn in impls.items():
        fn()
        assert fn.model.item_emb.weight.grad.is_sparse == name.endswith("_sparse"), name


def test_model_optimizer_impls_run(monkeypatch):
    """The model_optimizer sweep's steps run for every model on a tiny vocabulary: the
    dense form's tables train by Adam, the sparse form's by SparseAdam (sparse gradients),
    and one step moves the looked-up rows either way."""
    monkeypatch.setattr(training_sweeps, "N_ITEMS", 300)
    monkeypatch.setattr(training_sweeps, "B", 3)
    impls = training_sweeps.model_optimizer_sweep(True).points[0].build()
    assert {f"{m}_{v}" for m in training_sweeps.MODEL_NAMES
            for v in ("dense", "sparse")} == set(impls)
    for name, fn in impls.items():
        before = fn.model.item_emb.weight.detach().clone()
        fn()
        assert fn.model.item_emb.weight.grad.is_sparse == name.endswith("_sparse"), name
        assert not torch.equal(before, fn.model.item_emb.weight), name


def test_sum_load_run_paces_open_loop_clients():
    """The SUM sweep's load generator: every client sends its share at its scheduled times
    (rate honoured within the run) and every request's latency is counted."""
    from fastattn.bench.serving_sweeps import load_run
    seen = []
    got = load_run(lambda u: seen.append(u), n_users=10, rps=400.0, threads=4, seconds=0.25)
    assert got["requests"] == len(seen) == 100 and set(seen) <= set(range(10))
    assert 0 <= got["p50_ms"] <= got["p99_ms"] <= got["max_ms"]
    assert got["achieved_rps"] <= 400.0 * 1.05


def test_measurement_helpers():
    t = time_fn(lambda: sum(range(100)), budget_s=0.01)
    assert 0 < t["p10_s"] <= t["median_s"] <= t["p90_s"]
    assert measure.summarize([3.0, 1.0, 2.0])["median_s"] == 2.0
    with pytest.raises(ValueError, match="samples_s"):
        measure.summarize([])
    extra = peak_extra_bytes(lambda: torch.ones(64 << 20, dtype=torch.uint8))
    assert extra is None or extra >= 32 << 20
    assert measure.available_bytes("cpu") is None or measure.available_bytes("cpu") > 0
    assert measure.memory_bandwidth_gbs(nbytes=1 << 22) > 0


def test_sticky_device_error_stops_the_run_naming_the_kernel(monkeypatch, tmp_path):
    """A kernel that leaves the CUDA context unusable ends the run (exit 2) with a message
    naming the sweep, point and implementation; what was measured before is written and
    no later point runs. (Faked on CPU: context_broken is what a GPU run would see.)"""
    ran = []

    def make(L):
        return lambda: {"base": lambda: ran.append(("base", L)),
                        "bad_kernel": lambda: (_ for _ in ()).throw(
                            RuntimeError("CUDA error: an illegal memory access"))}

    def sweep_of(name):
        return Sweep(name, name, x="L", baseline="base",
                     points=[Point({"L": L}, make(L), pairs=L) for L in (8, 16)])
    first, second = sweep_of("first"), sweep_of("second")
    monkeypatch.setattr(cli, "context_broken", lambda device: True)
    with pytest.raises(cli.StickyDeviceError) as err:
        cli.run_sweep(first, 0.01, _Progress(), timer=time_fn, limits=LIMITS)
    msg = str(err.value)
    assert "first at {'L': 8}, implementation 'bad_kernel'" in msg and "illegal memory" in msg
    assert [r["impl"] for r in err.value.rows] == ["base"]
    assert all(L == 8 for _, L in ran)                      # the point L=16 never ran

    # Through main: partial results written, later sweeps not run, exit status 2.
    monkeypatch.setattr(cli, "require_device", lambda device: None)
    monkeypatch.setattr(cli, "machine_limits", lambda device, timer: LIMITS)
    monkeypatch.setattr(cli, "select", lambda names, quick, device: [sweep_of("first"),
                                                                    sweep_of("second")])
    ran.clear()
    assert cli.main(["--quick", "--budget", "0.01", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "first.json").exists() and not (tmp_path / "second.json").exists()
    assert all(L == 8 for _, L in ran)


def test_cuda_results_fill_the_readme_gpu_block(tmp_path):
    """The last step of `make gpu-check` on a fake *_cuda.json: the README's GPU block is
    filled, the CPU block untouched, and the generated text names the command."""
    sweep = Sweep("hamming_topk", "Hamming top-k", x="L", baseline="base", device="cuda",
                  points=[])
    rows = [{"sweep": "hamming_topk", "impl": impl, "L": 1024, "median_s": t, "p10_s": t,
             "p90_s": t, "baseline": "base", "speedup": 2e-3 / t}
            for impl, t in (("base", 2e-3), ("triton", 5e-4))]
    meta = _meta()
    meta.update(device_name="NVIDIA H200", command="fastattn-bench --device cuda --quick")
    out = tmp_path / "results"
    cli.write_results(str(out), sweep, rows, meta)
    assert (out / "hamming_topk_cuda.json").exists() and (out / "hamming_topk_cuda.csv").exists()
    readme = tmp_path / "README.md"
    with open("README.md") as f:
        original = f.read()
    readme.write_text(original)
    assert cli.main(["--markdown", "--device", "cuda", "--out", str(out),
                     "--readme", str(readme)]) == 0
    text = readme.read_text()
    begin, end = cli.markers("cuda")
    block = text[text.index(begin):text.index(end)]
    assert "**Hamming top-k**" in block and "**4.00×**" in block
    assert "fastattn-bench --markdown --device cuda" in block
    cpu_begin, cpu_end = cli.markers("cpu")
    assert text[text.index(cpu_begin):text.index(cpu_end)] == \
        original[original.index(cpu_begin):original.index(cpu_end)]


def test_make_gpu_check_is_one_prepared_command():
    """`make -n gpu-check` (a dry run: nothing executes) lists install, the CUDA tests, the
    quick GPU sweeps and the README fill, in that order."""
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("make is not installed here")
    out = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True,
                         check=True).stdout
    steps = ["pip install -q --no-deps --no-build-isolation -e .",     # the GPU image's python3
             "pip install -q \"torch>=2.8\"", "pip install -q -e \".[test,bench]\"",  # or a venv
             "FASTATTN_TEST_DEVICE=cuda",
             "fastattn.bench.cli --device cuda --quick --out bench/results",
             "fastattn.bench.cli --markdown --device cuda --out bench/results"]
    pos = [out.index(s) for s in steps]
    assert pos == sorted(pos)
