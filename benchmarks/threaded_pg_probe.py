"""Can torch's threaded process group run diffusers' context parallelism (ranks as threads)? See docs/gpu.md.

    PYTHONPATH=src python benchmarks/threaded_pg_probe.py --cp [--ring] [--no-isolate]
"""
import sys, threading, copy, traceback
import torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.testing._internal.distributed.multi_threaded_pg import _install_threaded_pg, _uninstall_threaded_pg

results = {}
BUILD_LOCK = threading.Lock()
RING = 2 if "--ring" in sys.argv else 1
def body():
    r = dist.get_rank(); x = torch.full((4, 2), float(r))
    out = {}
    for name, fn in [("funcol.all_to_all_single", lambda: funcol.all_to_all_single(x, None, None, group=dist.group.WORLD)),
                     ("funcol.all_gather_tensor", lambda: funcol.all_gather_tensor(x, 0, group=dist.group.WORLD)),
                     ("funcol.all_reduce", lambda: funcol.all_reduce(x, "sum", group=dist.group.WORLD)),
                     ("c10d.all_gather", lambda: (lambda l: (dist.all_gather(l, x), l[1])[1])([torch.empty_like(x) for _ in range(2)]))]:
        try: out[name] = tuple(fn().shape)
        except Exception as e: out[name] = f"{type(e).__name__}: {str(e)[:150]}"
    if "--cp" in sys.argv:
        try:
            import diffpar
            from diffpar.testing import tiny_transformers
            with BUILD_LOCK:  # threads share the global RNG: seeded builds must not interleave
                model, mk = tiny_transformers.build("flux", heads=4); inputs = mk(seq=16, text=8)
            ref = copy.deepcopy(model)
            with torch.no_grad(): rr = ref(**copy.deepcopy(inputs))[0]
            h = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2, ring_size=RING) if RING > 1 else diffpar.ParallelismConfig(ulysses_size=2))
            with torch.no_grad(): o = model(**copy.deepcopy(inputs))[0]
            out["cp_diff"] = (o - rr).abs().max().item(); h.detach()
        except Exception as e:
            out["cp"] = traceback.format_exc()[-800:]
    results[r] = out

import diffpar.mesh as _m
_orig_wait = _m._wait
_m._wait = lambda work, what, timeout_s: _orig_wait(work, what, None)  # the threaded PG cannot wait with a timeout
world = _install_threaded_pg()
if "--no-isolate" not in sys.argv:  # without it the second thread cannot register its default group
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
store = dist.HashStore()
def worker(rank):
    dist.init_process_group(backend="threaded", rank=rank, world_size=2 * RING, store=store)
    try: body()
    finally: dist.destroy_process_group()
ts = [threading.Thread(target=worker, args=(r,)) for r in range(2 * RING)]
[t.start() for t in ts]; [t.join(120) for t in ts]
for r in sorted(results): print(r, results[r])
