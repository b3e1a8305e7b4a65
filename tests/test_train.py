"""fastattn-train end to end on a tiny synthetic set and on a CSV log."""
import csv
import json

import pytest

from fastattn.data import make_synthetic, save_csv
from fastattn.models import MODELS
from fastattn.train import main

TINY = ["--users", "40", "--items", "60", "--cats", "6", "--candidates", "4",
        "--max-history", "60", "--lengths", "8,30", "--epochs", "1", "--batch-size", "16",
        "--embed-dim", "4"]


def test_train_writes_table_json_and_plot(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], int(r["max_len"])) for r in rows} == \
        {(m, n) for m in MODELS for n in (8, 30)}
    for r in rows:
        assert 0.0 <= float(r["auc"]) <= 1.0 and float(r["logloss"]) > 0
        assert float(r["train_samples_per_s"]) > 0
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["command"].startswith("fastattn-train") and meta["data"]["users"] == 40
    assert (tmp_path / "train.png").read_bytes()[:4] == b"\x89PNG"
    assert "| din |" in capsys.readouterr().out           # the README table


def test_train_on_a_csv_log(tmp_path):
    data = make_synthetic(n_users=30, n_items=40, n_cats=5, min_len=3, max_len=30, seed=2)
    save_csv(data, tmp_path / "log.csv")
    assert main(["--csv", str(tmp_path / "log.csv"), "--models", "din,sim", "--lengths", "20",
                 "--epochs", "1", "--batch-size", "8", "--embed-dim", "4",
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "train.csv").exists()


def test_unknown_model_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--models", "din,nope", "--out", str(tmp_path)])


def test_train_retrieval_epoch_auc_and_variant(tmp_path, capsys):
    """--retrieval writes ETA's recall@k by bits and the planted-interest hit rates;
    --epoch-auc records one AUC per epoch; --variant draws the named variant."""
    args = ["--users", "40", "--items", "60", "--cats", "6", "--candidates", "4",
            "--max-history", "120", "--lengths", "30,100", "--epochs", "2", "--batch-size",
            "16", "--embed-dim", "4", "--models", "eta,sim,sdim,din,mimn", "--retrieval",
            "--retrieval-bits", "32,64", "--retrieval-k", "3", "--epoch-auc", "--variant",
            "long",
            "--out", str(tmp_path)]
    assert main(args) == 0
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["config"]["variant"] == "long"
    for r in train["rows"]:
        assert len(r["auc_by_epoch"]) == 2 and r["auc_by_epoch"][-1] == r["auc"]
    rows = json.loads((tmp_path / "retrieval.json").read_text())["rows"]
    recall = [r for r in rows if r["kind"] == "recall"]
    assert {(r["model"], r["max_len"], r["bits"], r["k"]) for r in recall} == \
        {("eta", n, b, k) for n in (30, 100) for b in (32, 64) for k in (3, 256)}
    for r in recall:
        assert 0.0 <= r["recall_positions"] <= r["recall"] <= 1.0
        assert 0.0 <= r["tie_share"] <= 1.0
        # ETANet's default bits: 256 (these histories are shorter than topk 256: exact)
        assert r["default"] == (r["bits"] == 256)
        if r["k"] == 256:
            assert r["recall"] == 1.0
    hits = {(r["model"], r["max_len"]): r for r in rows if r["kind"] == "interest"}
    assert {m for m, _ in hits} == {"eta", "eta_exact", "sim", "sdim", "din"}
    for (m, n), r in hits.items():
        assert r["candidates"] > 0 and 0.0 <= r["hit_rate"] <= 1.0
    assert all(hits[("sim", n)]["hit_rate"] == 1.0 for n in (30, 100))   # the GSU never misses
    assert (tmp_path / "retrieval.csv").exists()
    assert "| retrieval |" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--retrieval-bits", "0"], ["--retrieval-bits", "a,b"],
                                 ["--retrieval-k", "0"],
                                 ["--variant", "nope"]])
def test_train_refuses_bad_retrieval_options(tmp_path, bad):
    with pytest.raises(SystemExit):
        main(["--models", "eta", "--out", str(tmp_path)] + bad)


def test_retrieval_and_variant_need_synthetic_data(tmp_path):
    data = make_synthetic(n_users=10, n_items=20, n_cats=6, min_len=3, max_len=10, seed=1)
    save_csv(data, tmp_path / "log.csv")
    for extra in (["--retrieval"], ["--variant", "recent"]):
        with pytest.raises(SystemExit):
            main(["--csv", str(tmp_path / "log.csv"), "--out", str(tmp_path)] + extra)


def test_tie_aware_recall_counts_tied_copies():
    """Recall by score: a retrieved copy of a behaviour tied with the exact top-k's last
    entry counts (up to the number of tied entries the exact top-k holds)."""
    import torch
    from fastattn.bench.retrieval import exact_topk, tie_aware_hits
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, float("-inf")],
                           [2.0, 1.0, float("-inf"), float("-inf"), float("-inf"),
                            float("-inf")]])
    lengths = torch.tensor([5, 2])
    q = torch.ones(2, 1)
    exact = exact_topk(q, scores.nan_to_num(neginf=0)[..., None], lengths, 3)
    assert exact[0, 0] == 0 and exact[1].tolist() == [0, 1, -1]   # row 0: 0, two 3.0s
    idx = torch.tensor([[3, 1, 4], [1, -1, -1]])       # the other 3.0 copy, a 3.0, a 1.0
    assert tie_aware_hits(scores, idx, exact).tolist() == [2, 1]
    idx = torch.tensor([[3, 2, 1], [0, 1, -1]])        # three tied copies: only two count
    assert tie_aware_hits(scores, idx, exact).tolist() == [2, 2]


def test_model_arg_reaches_the_constructor(tmp_path):
    """--model-arg MODEL:KEY=VALUE passes a constructor argument to that model only."""
    args = ["--users", "30", "--items", "40", "--cats", "5", "--candidates", "2",
            "--max-history", "60", "--lengths", "20", "--epochs", "1", "--batch-size", "16",
            "--embed-dim", "4", "--models", "eta,sim", "--model-arg", "eta:time_buckets=3",
            "--model-arg", "sim:time_buckets=0", "--out", str(tmp_path)]
    assert main(args) == 0
    config = json.loads((tmp_path / "train.json").read_text())["config"]
    assert config["model_args"] == {"eta": {"time_buckets": 3}, "sim": {"time_buckets": 0}}
    for bad in ("eta:time_buckets", "nope:x=1", "eta:x=not a literal", "time_buckets=3"):
        with pytest.raises(SystemExit):
            main(["--models", "eta", "--model-arg", bad, "--out", str(tmp_path)])


def test_sparse_embeddings_train(tmp_path):
    """--sparse-embeddings: the item and category tables train by SparseAdam (the rest by
    Adam, one JointOptimizer), end to end."""
    import torch

    from fastattn.models import build
    from fastattn.train import JointOptimizer, make_optimizer
    assert main(TINY + ["--models", "din,eta", "--sparse-embeddings",
                        "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "train.json").read_text())["config"]
    assert config["sparse_embeddings"] is True
    model = build("din", 60, 6, embed_dim=4)
    assert isinstance(make_optimizer(model, 1e-3), torch.optim.Adam)
    model.sparse_embeddings = True
    opt = make_optimizer(model, 1e-3)
    assert isinstance(opt, JointOptimizer)
    sparse_adam, adam = opt.parts
    assert isinstance(sparse_adam, torch.optim.SparseAdam)
    tables = {id(model.item_emb.weight), id(model.cat_emb.weight)}
    assert {id(p) for g in sparse_adam.param_groups for p in g["params"]} == tables
    assert not tables & {id(p) for g in adam.param_groups for p in g["params"]}


def test_sparse_embeddings_refuse_several_processes():
    """Sparse table gradients train in one process: a world of 2 is refused up front."""
    from fastattn.train import TrainConfig, train_model
    data = make_synthetic(n_users=10, n_items=40, n_cats=5, min_len=3, max_len=10, seed=1)
    cfg = TrainConfig()
    cfg.sparse_embeddings = True
    with pytest.raises(ValueError, match="single process"):
        train_model("din", data, data, 10, cfg, rank=0, world=2)
