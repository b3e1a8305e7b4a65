"""The BAHE sweeps and the BAHE rows of fastattn-train, on tiny sizes."""
import csv

import torch

from fastattn.bench import bahe_sweeps, registry
from fastattn.train import main


def test_sweeps_are_registered_and_run(monkeypatch):
    assert {"bahe_pool", "bahe"} <= set(registry.SWEEPS)
    pool = bahe_sweeps.bahe_pool_sweep(True)
    pool.points[0].params["N"] = 33
    impls = bahe_sweeps.bahe_pool_sweep(True).points[0].build
    assert impls is not None
    monkeypatch.setattr(bahe_sweeps, "TRAIN_B", 8)
    sweep = bahe_sweeps.bahe_training_sweep(True)
    point = sweep.points[0]
    impls = point.build()
    assert set(impls) == {"llm_ctr", "fp", "fp_abe", "bahe"}
    for fn in impls.values():
        model = fn()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.grad is not None)
    assert 0 < point.params["distinct_ratio"] <= 1 and point.params["text_len"] == 64 * 16


def test_train_rows(tmp_path, capsys):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:        # one thread: tiny steps, where waking a thread team costs the most
        assert main(["--threads", "1", "--models", "din,llm_ctr,fp,fp_abe,bahe",
                     "--lengths", "6", "--users", "16", "--items", "40", "--cats", "6",
                     "--candidates", "2", "--max-history", "50", "--behaviour-types", "3",
                     "--epochs", "1", "--batch-size", "8", "--embed-dim", "8",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(out / "train.csv")))
    assert [r["model"] for r in rows] == ["din", "llm_ctr", "fp", "fp_abe", "bahe"]
    assert rows[0]["epoch_s"] == ""                   # the id models' rows are unchanged
    for r in rows[1:]:
        assert float(r["epoch_s"]) > 0 and float(r["peak_step_mib"]) >= 0
        assert r["text_len"] == str(6 * 16) and "peak_sample_mib" not in r
    assert rows[1]["distinct_ratio"] == "" and 0 < float(rows[4]["distinct_ratio"]) <= 1
    # bootstrap standard errors; the ablation rows' paired difference to LLM-CTR
    assert float(rows[1]["auc_se"]) > 0 and rows[1]["auc_vs_llm_ctr"] == ""
    for r in rows[2:]:
        assert abs(float(r["auc_vs_llm_ctr"]) - (float(r["auc"]) - float(rows[1]["auc"]))) < 1e-9
        assert float(r["auc_vs_llm_ctr_se"]) >= 0
    out = capsys.readouterr().out
    assert "| bahe | 6 (96) |" in out and "Oracle AUC" in out


def test_train_rows_text_variant_shared_histories(tmp_path, capsys):
    """--variant text --share-histories: whole users per batch; the rows train and score;
    --epoch-auc adds the AUC after each epoch to the BAHE table."""
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "--models", "llm_ctr,bahe", "--lengths", "6",
                     "--variant", "text", "--share-histories", "--users", "16", "--items",
                     "40", "--cats", "6", "--candidates", "4", "--max-history", "50",
                     "--behaviour-types", "3", "--epochs", "1", "--batch-size", "8",
                     "--embed-dim", "8", "--bootstrap", "50", "--epoch-auc",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(out / "train.csv")))
    assert [r["model"] for r in rows] == ["llm_ctr", "bahe"]
    assert float(rows[1]["auc_vs_llm_ctr_se"]) >= 0
    # whole-user steps: the peak of a per-sample step too (the paper's layout)
    assert all(float(r["peak_sample_mib"]) >= 0 for r in rows)
    table = capsys.readouterr().out.split("| row |")[1]
    assert "AUC after each epoch |" in table and "peak MiB / 64 samples |" in table
    assert f"| {float(rows[1]['auc']):.3f} |" in table      # one epoch: the final AUC
