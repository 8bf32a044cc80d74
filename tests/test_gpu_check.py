"""benchmarks/gpu_check.py runs here in its CPU mode (`--cpu --small`), so the command a lent GPU runs is known to
work before device time is spent on it. A subprocess: the check starts its own 1-rank gloo group, which must not
live in the process that forks the test pool."""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_small_mode():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu", "--small"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["failed"] == []
    names = set(summary["results"])
    for expected in ("ring_op[float32]", "tp_mlp[bf16]", "vae_split_math[bf16]", "placement[tp shard]",
                     "host_syncs_per_step"):
        assert expected in names, names
    assert any(n.startswith("baseline_flux_step") for n in names) and any(n.startswith("baseline_vae") for n in names)
    # Quantized shards (torchao float8 weight-only runs on CPU too): checked where torchao is importable, a SKIP
    # line otherwise (the check imports it lazily; the subprocess sees this process's PYTHONPATH).
    for name in ("float8_tp_shards", "int8_tp_shards"):
        result = summary["results"][name]
        if importlib.util.find_spec("torchao") is None:
            assert result["ok"] is None and "SKIP" in result["skip"], result
        else:
            assert result["ok"] is True and result["cuts_exact"] is True, result
