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
