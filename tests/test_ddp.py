"""Data-parallel training with torchrun (gloo, 2 CPU processes) matches one process (issue 11)."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from icl_core.runs import Run

pytestmark = pytest.mark.slow


def _write_cfg(tmp_path, text_folder):
    cfg = {
        "name": "ddp",
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 128, "d_vocab": 300},
        "data": {"sources": [f"folder:{text_folder}"], "vocab_size": 300, "val_fraction": 0.2,
                 "n_eval": 8, "n_prefix_seqs": 4},
        "train": {"batch_size": 8, "total_tokens": 8 * 128 * 12, "n_snapshots": 4, "warmup_steps": 3,
                  "precision": "fp32", "threads": 1},
    }
    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_two_process_ddp_matches_one_process(tmp_path, text_folder, shared_corpus_cache):
    cfg = _write_cfg(tmp_path, text_folder)
    env = dict(os.environ, ICL_CACHE_DIR=str(shared_corpus_cache), OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "icl_core.train", str(cfg), "--run-dir", str(one), "--no-progress",
                    "--device", "cpu"], check=True, env=env, timeout=300)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "icl_core.train", str(cfg),
                        "--run-dir", str(two), "--no-progress", "--device", "cpu"],
                       env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = Run(one), Run(two)
    assert a.done and b.done and a.steps == b.steps
    la = [l for _, l in a.manifest["train_log"]]
    lb = [l for _, l in b.manifest["train_log"]]
    assert len(la) == len(lb) == 12
    for x, y in zip(la, lb):
        assert abs(x - y) < 1e-3 * max(1.0, abs(x))
    wa, wb = a.load().state_dict(), b.load().state_dict()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-3
