"""The README's main job, run as a user runs it: torchrun starts 2 processes, diffpar starts the process group."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compat


def test_demo_under_torchrun(tmp_path):
    out = tmp_path / "demo.png"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffpar.demo",
         "--steps", "2", "--size", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max abs diff vs one process" in proc.stdout and "(OK, bound 1e-5)" in proc.stdout, proc.stdout
    assert out.exists() and out.stat().st_size > 0
