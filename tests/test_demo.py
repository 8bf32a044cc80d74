"""The README's main job, run as a user runs it: torchrun starts 2 processes, diffpar starts the process group."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compat


def test_demo_under_torchrun(tmp_path):
    out = tmp_path / "demo.png"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffpar.demo",
         "--steps", "2", "--out", str(out)],  # the README's size: the VAE decode is split too
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max abs diff vs one process" in proc.stdout and "(OK, bound 1e-5)" in proc.stdout, proc.stdout
    # The work was split: each rank's first attention saw half the tokens, and every attention call exchanged.
    assert "work split over 2 ranks: OK" in proc.stdout, proc.stdout
    seen = re.findall(r"rank (\d+) +: (\d+) of (\d+) tokens .*all-to-all in (\d+) of (\d+) attention calls",
                      proc.stdout)
    assert [int(r) for r, *_ in seen] == [0, 1], proc.stdout
    for _, tokens, full, exchanged, calls in seen:
        assert 2 * int(tokens) == int(full) and int(exchanged) == int(calls) > 0, proc.stdout
    assert out.exists() and out.stat().st_size > 0
