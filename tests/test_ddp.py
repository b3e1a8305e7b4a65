"""Scale-out: DDP over two CPU processes (gloo) takes the same step as one process."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ddp_two_processes_match_full_batch_step(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", os.path.join(HERE, "ddp_step.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    from fastattn.models import MODELS
    assert set(result["diffs"]) == set(MODELS)
    for name, diff in result["diffs"].items():
        assert diff < 1e-10, f"{name}: DDP step differs from the full-batch step by {diff}"
