"""benchmarks/gpu_check.sh: its --cpu-dry-run runs every part's logic at toy sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "CONDITUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    cmd = ["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--output", str(tmp_path / "gpu")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu" / "gpu_check.json").read_text())
    assert report["cpu_dry_run"] and all(report["verdicts"].values()), report["verdicts"]
    assert set(report["block"]["matrices"]) >= {"self_attn.q_proj", "mlp.down_proj"}
    assert report["train"]["steps"] == 3 and report["train"]["tokens_per_second"] > 0
    assert report["checkpoint"]["records"] == 21 and (tmp_path / "gpu" / "gpu_checkpoint_records.json").is_file()
    assert (tmp_path / "gpu" / "gpu_check.md").read_text().startswith("# GPU check (CPU DRY RUN")
