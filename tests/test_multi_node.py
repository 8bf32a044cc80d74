"""Two "hosts" on this machine: two Linux network namespaces joined by a veth pair (10.123.0.1 and 10.123.0.2,
reachable only from each other). One torchrun per namespace, `--nnodes=2 --nproc_per_node=2`, c10d rendezvous
on host A's address: 4 ranks whose gloo traffic between the hosts crosses the veth pair. The image must equal
one process's, the transformer must have split its tokens over all 4 ranks, and bytes must have crossed.

Needs root (or CAP_NET_ADMIN) and `ip` (iproute2); skipped with the reason otherwise. The namespaces (and with
them the veth pair) are always deleted.
"""
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from diffpar.testing.generate_runs import (TINY_FLUX_CALL, clean_env, run_in_this_process, save_tiny_flux,
                                           split_summaries)
from diffpar.testing.probes import split_problems
from tolerances import PIPELINE_FP32

SUBNET = "10.123.0"
PORT = 29611


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _why_no_namespaces() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed: apt-get install iproute2"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


@pytest.fixture
def two_hosts():
    """Namespaces A and B, veth ends in each, addressed .1 and .2; yields [(namespace, interface, address)]."""
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"dpnsA{tag}", f"dpva{tag}", f"{SUBNET}.1"), (f"dpnsB{tag}", f"dpvb{tag}", f"{SUBNET}.2")]
    made = []
    try:
        for namespace, _, _ in hosts:
            result = _ip("netns", "add", namespace, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
            made.append(namespace)
        (ns_a, if_a, _), (ns_b, if_b, _) = hosts
        _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for namespace, interface, address in hosts:
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", namespace, "link", "set", interface, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for namespace in made:  # deleting a namespace deletes the veth end inside it, and so the pair
            _ip("netns", "delete", namespace, check=False)


def _interface_bytes(namespace: str, interface: str) -> int:
    """Bytes sent plus received on the interface."""
    stats = _ip("-n", namespace, "-s", "link", "show", interface).stdout.splitlines()
    rx = int(stats[stats.index(next(l for l in stats if "RX:" in l)) + 1].split()[0])
    tx = int(stats[stats.index(next(l for l in stats if "TX:" in l)) + 1].split()[0])
    return rx + tx


def test_two_hosts_four_ranks_match_one_process(two_hosts, tmp_path):
    folder = save_tiny_flux(tmp_path / "tiny_flux")
    reference = run_in_this_process(folder, tmp_path)
    from diffpar.compat.diffusers_cp import supports_ulysses_and_ring

    # Ulysses x Ring across the hosts where the release can combine them (0.37+); Ulysses 4 on 0.36.
    layout = {"ulysses_size": 2, "ring_size": 2} if supports_ulysses_and_ring() else {"ulysses_size": 4}
    flags = [f"--{k.split('_')[0]}" if i % 2 == 0 else str(v) for k, v in layout.items() for i in (0, 1)]
    before = _interface_bytes(two_hosts[0][0], two_hosts[0][1])
    launches = []
    for namespace, interface, address in two_hosts:
        is_host = address == two_hosts[0][2]
        command = [
            "ip", "netns", "exec", namespace, sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={two_hosts[0][2]}:{PORT}",
            "--rdzv_id=diffpar-multi-node-test", f"--rdzv_conf=is_host={int(is_host)}", f"--local_addr={address}",
            "-m", "diffpar.generate", str(folder), *TINY_FLUX_CALL, *flags,
            "--parallel-text-encoder", "--parallel-vae", "--report-split",
            "--out", str(tmp_path / f"{namespace}.png"), "--save-array", str(tmp_path / f"{namespace}.npy"),
        ]
        # gloo picks its interface by name; in each namespace the veth end is the only way to the other host.
        env = clean_env(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)
        launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env, cwd=tmp_path, start_new_session=True))
    outputs = []
    try:
        for proc in launches:
            stdout, stderr = proc.communicate(timeout=420)
            outputs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in launches:
            if proc.poll() is None:  # a hang: end the launcher we started and the ranks it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for code, stdout, stderr in outputs:
        assert code == 0, stdout[-3000:] + stderr[-3000:]
    crossed = _interface_bytes(two_hosts[0][0], two_hosts[0][1]) - before
    # Global rank 0 saves the image and prints the report, on whichever host the rendezvous made node 0.
    printing = [stdout for _, stdout, _ in outputs if "saved to" in stdout]
    assert len(printing) == 1, [o[1][-2000:] for o in outputs]
    stdout = printing[0]
    assert "4 process(es)" in stdout
    arrays = [np.load(p) for p in tmp_path.glob("dpns*.npy")]
    assert len(arrays) == 1
    assert np.abs(arrays[0] - reference["array"]).max() <= PIPELINE_FP32
    summaries = split_summaries(stdout)
    assert [s["rank"] for s in summaries] == [0, 1, 2, 3], stdout
    problems = split_problems(split_summaries(reference["stdout"])[0], summaries, layout)
    assert not problems, problems
    # The ranks of the two hosts exchanged over the veth pair (rendezvous, attention, encoder and VAE traffic).
    assert crossed > 100_000, crossed
    print(f"bytes across the veth pair: {crossed}")
    assert re.search(r"rank 3: .*parameters", stdout), stdout
