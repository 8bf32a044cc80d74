"""One command for a lent GPU: every CUDA-specific path diffpar relies on, checked in one process, plus baselines.

    python benchmarks/gpu_check.py                 # one GPU, real shapes, under 4 minutes on an H200
    python benchmarks/gpu_check.py --cpu --small   # the same checks on CPU at toy shapes, under a minute

Prints one line per check (`check name: figures ... ok|FAIL|n/a`) and a JSON summary last (`--json PATH` writes
it too). Everything runs in ONE process: two ranks on one GPU cannot run diffusers' context parallelism (NCCL
refuses a duplicate GPU; gloo's functional collectives crash on CUDA tensors), and torch's threaded process group
cannot either (docs/gpu.md), so the multi-rank math is checked by computing every rank's shard locally and
combining the shards as the collective would.

Checks:
1. ring op: diffpar's LSE-returning SDPA op (`compat.diffusers_cp._sdpa_with_lse`, efficient attention on CUDA)
   vs fp64: output, LSE, and a two-chunk ring merge (what diffusers' ring does with the LSE) vs fp64 whole;
2. bf16 tensor-parallel MLP: column-parallel up, row-parallel down, every shard computed and the partial sums
   added (the all-reduce), vs the whole bf16 MLP, both against fp64;
2b. quantized tensor-parallel MLP ("float8 TP shards", and int8): a bf16 MLP quantized by torchao (float8
   weight-only, or float8 dynamic activation where weight-only has no kernel; int8 weight-only), its 4 shards cut
   by diffpar's slicing rule (quantized data and scales, not re-quantized), computed and summed vs the whole
   quantized MLP; a SKIP line (n/a) without torchao or a kernel;
3. VAE split math, bf16: a 3x3 convolution on row bands with one-row halos, and GroupNorm statistics merged from
   per-band sums, vs the whole tensor;
4. device placement: a tiny Flux transformer sharded for rank 0 of tp 2 by diffpar's TP engine (on a 1-process
   gloo group; the shard plan is the one a 2-rank run uses) after `.to(device)`: every parameter and buffer on
   the device;
5. host syncs per denoising step: a transformer step under `torch.cuda.set_sync_debug_mode("warn")`, warnings
   counted (n/a on CPU);
6. baselines: a FLUX.1-dev-shaped transformer step (19 double + 38 single blocks, 24 heads x 128, 4096 image +
   512 text tokens at 1024 px) in bf16, and the FLUX.1-shaped VAE decode at 1024 and 2048 px in bf16: time and
   peak memory above the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

RESULTS: dict[str, dict] = {}


def report(name: str, ok: bool | None, **figures) -> None:
    RESULTS[name] = dict(figures, ok=ok)
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"{name}: {shown} {'n/a' if ok is None else ('ok' if ok else 'FAIL')}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. ring op ----------------------------------------------------------------------------------------------


def check_ring_op(device, small: bool) -> None:
    from diffpar.compat.diffusers_cp import _sdpa_with_lse

    b, h, s, d = (1, 4, 256, 32) if small else (1, 24, 4608, 128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(3))
    scale = d ** -0.5

    def exact(q, k, v):
        scores = q @ k.transpose(-1, -2) * scale
        lse = torch.logsumexp(scores, dim=-1)
        return torch.softmax(scores, dim=-1) @ v, lse

    ref_out, ref_lse = exact(q, k, v)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if device.type == "cpu" and dtype == torch.float16:
            continue
        qd, kd, vd = (x.to(device, dtype) for x in (q, k, v))
        out, lse = _sdpa_with_lse(qd, kd, vd, None, 0.0, False, scale)
        half = s // 2  # two ring chunks of keys: merge through the LSE as diffusers' ring does
        o1, l1 = _sdpa_with_lse(qd, kd[:, :, :half], vd[:, :, :half], None, 0.0, False, scale)
        o2, l2 = _sdpa_with_lse(qd, kd[:, :, half:], vd[:, :, half:], None, 0.0, False, scale)
        l1, l2 = l1.double(), l2.double()
        merged_lse = torch.logaddexp(l1, l2)
        merged = o1.double() * torch.exp(l1 - merged_lse)[..., None] + o2.double() * torch.exp(l2 - merged_lse)[..., None]
        out_err = (out.double().cpu() - ref_out).abs().max().item()
        lse_err = (lse.double().cpu() - ref_lse).abs().max().item()
        merge_err = (merged.cpu() - ref_out).abs().max().item()
        # fp32: the bar measured on an H200 (1.7e-6 LSE, 4e-7 output); bf16/fp16: SDPA's own rounding.
        bar = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
        report(f"ring_op[{str(dtype)[6:]}]", max(out_err, lse_err, merge_err) <= bar, out=out_err, lse=lse_err,
               ring_merge=merge_err, shape=f"{b}x{h}x{s}x{d}")


# -- 2. tensor-parallel MLP ----------------------------------------------------------------------------------


def check_tp_mlp(device, small: bool, ranks: int = 4) -> None:
    from diffpar.engines.tp_shard import split_ranges

    dim, hidden, tokens = (64, 256, 128) if small else (3072, 12288, 4608)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    w1 = torch.randn(hidden, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    w2 = torch.randn(dim, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    ref = torch.nn.functional.gelu(x @ w1.T) @ w2.T
    xb, w1b, w2b = (t.to(device, torch.bfloat16) for t in (x, w1, w2))
    whole = torch.nn.functional.gelu(xb @ w1b.T) @ w2b.T
    partial_sum = None
    for start, stop in split_ranges(hidden, ranks):  # column-parallel rows of w1 = row-parallel columns of w2
        part = torch.nn.functional.gelu(xb @ w1b[start:stop].T) @ w2b[:, start:stop].T
        partial_sum = part if partial_sum is None else partial_sum + part  # the all-reduce, in bf16 like NCCL's
    whole_err = (whole.double().cpu() - ref).abs().max().item()
    split_err = (partial_sum.double().cpu() - ref).abs().max().item()
    # Splitting the inner sum over ranks changes bf16 rounding, not its size: within 2x of the whole bf16 error.
    report("tp_mlp[bf16]", split_err <= 2 * whole_err, split_vs_fp64=split_err, whole_vs_fp64=whole_err, ranks=ranks)


def _quantize_mlp(mlp, kind: str, device, originals) -> str:
    """Quantize `mlp` in place with torchao (imported here: optional); the config's name, for the report."""
    from torchao.quantization import quantize_

    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(mlp, Int8WeightOnlyConfig())
        return "Int8WeightOnlyConfig"
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig

    try:  # weight-only first: its shards are the same model whichever way they are cut
        quantize_(mlp, Float8WeightOnlyConfig())
        mlp(torch.zeros(1, mlp[0].in_features, device=device, dtype=torch.bfloat16))
        return "Float8WeightOnlyConfig"
    except Exception:  # noqa: BLE001 - a missing kernel: the dynamic-activation config instead
        mlp[0].weight, mlp[2].weight = originals  # the bf16 weights, before the failed config
        quantize_(mlp, Float8DynamicActivationFloat8WeightConfig())
        return "Float8DynamicActivationFloat8WeightConfig"


def check_quantized_tp(device, small: bool, kind: str, ranks: int = 4) -> None:
    """A bf16 MLP quantized by torchao (`kind`: float8 or int8, per-row scales), cut into `ranks` tensor-parallel
    shards by diffpar's one slicing rule (`compat.quantized_tensors.cut_ranges`: the quantized data and scales
    cut, never re-quantized), every shard computed, the partial sums added (the all-reduce) and the bias once, vs
    the whole quantized MLP. Also: each cut dequantizes to the cut of the dequantized weight, bitwise."""
    name = f"{kind}_tp_shards"
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        report(name, None, skip=f"SKIP torchao not importable ({exc})"[:120])
        return
    from diffpar.compat.quantized_tensors import cut_ranges, layout_name, refusal
    from diffpar.engines.tp_shard import split_ranges

    dim, hidden, tokens = (64, 256, 128) if small else (3072, 12288, 4608)
    torch.manual_seed(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(hidden, dim)).to(device, torch.bfloat16)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    try:
        config = _quantize_mlp(mlp, kind, device, (mlp[0].weight, mlp[2].weight))
    except Exception as exc:  # noqa: BLE001 - no kernel for this dtype on this device / torch
        report(name, None, skip=f"SKIP {type(exc).__name__}: {exc}"[:160])
        return
    up, down = mlp[0], mlp[2]
    refused = refusal(up.weight, 0) or refusal(down.weight, 1)
    with torch.no_grad():
        whole = mlp(x)
        dequant_up, dequant_down = up.weight.dequantize(), down.weight.dequantize()
        total, cuts_exact = None, True
        for start, stop in split_ranges(hidden, ranks):  # column-parallel rows of up = row-parallel columns of down
            w1, w2 = cut_ranges(up.weight, 0, [(start, stop)]), cut_ranges(down.weight, 1, [(start, stop)])
            cuts_exact &= torch.equal(w1.dequantize(), dequant_up[start:stop])
            cuts_exact &= torch.equal(w2.dequantize(), dequant_down[:, start:stop])
            part = torch.nn.functional.linear(
                torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, up.bias[start:stop]), approximate="tanh"),
                w2)
            total = part if total is None else total + part  # the all-reduce, in bf16 like NCCL's
        split = total + down.bias
        # fp64 reference of the same quantized model (dequantized weights), to size the bf16 rounding of each
        xd = x.double()
        ref = torch.nn.functional.linear(
            torch.nn.functional.gelu(torch.nn.functional.linear(xd, dequant_up.double(), up.bias.double()),
                                     approximate="tanh"), dequant_down.double(), down.bias.double())
    scale = ref.abs().max().item()
    diff = (split.double() - whole.double()).abs().max().item()
    whole_err = (whole.double() - ref).abs().max().item()
    split_err = (split.double() - ref).abs().max().item()
    # Cutting the quantized weights changes only where bf16 rounds the inner sum: within 2x of the whole model's
    # own error against fp64 (the bf16 check's criterion), and every cut exact.
    report(name, bool(cuts_exact) and split_err <= 2 * whole_err, config=config,
           layout=layout_name(up.weight), max_abs_diff=diff, rel_diff=diff / scale, split_vs_fp64=split_err,
           whole_vs_fp64=whole_err, cuts_exact=bool(cuts_exact), diffpar_refuses=refused or "no", ranks=ranks)


# -- 3. VAE split math ---------------------------------------------------------------------------------------


def check_vae_split_math(device, small: bool, ranks: int = 4) -> None:
    from diffpar.engines.tp_shard import split_ranges

    c, hgt, wid = (16, 64, 64) if small else (128, 1024, 1024)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, c, hgt, wid, generator=g).to(device, torch.bfloat16)
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device, torch.bfloat16)
    with torch.no_grad():
        whole = conv(x)
        bands = []
        for start, stop in split_ranges(hgt, ranks):  # each rank's rows plus one halo row each side
            lo, hi = max(0, start - 1), min(hgt, stop + 1)
            y = torch.nn.functional.conv2d(x[:, :, lo:hi], conv.weight, conv.bias, padding=(0, 1))
            # rows at the image border get the zero padding the whole conv gives them
            if start == 0:
                y = torch.cat([conv(x[:, :, : min(hgt, stop + 1)])[:, :, :1], y], dim=2)
            if stop == hgt:
                y = torch.cat([y, conv(x[:, :, max(0, start - 1):])[:, :, -1:]], dim=2)
            bands.append(y)
        split = torch.cat(bands, dim=2)
        conv_diff = (split.float() - whole.float()).abs().max().item()
        groups = 4 if small else 32
        xf = x.float().view(1, groups, -1, hgt, wid)
        sums = sum(xf[..., a:b].sum(dim=(2, 3, 4), dtype=torch.float64) for a, b in split_ranges(hgt, ranks))
        squares = sum((xf[..., a:b].double() ** 2).sum(dim=(2, 3, 4)) for a, b in split_ranges(hgt, ranks))
        n = xf[0, 0].numel()
        mean, var = sums / n, squares / n - (sums / n) ** 2
        ref_var, ref_mean = torch.var_mean(xf.double(), dim=(2, 3, 4), unbiased=False)
        stat_diff = max((mean - ref_mean).abs().max().item(), (var - ref_var).abs().max().item())
    report("vae_split_math[bf16]", conv_diff == 0.0 and stat_diff < 1e-9, conv_band_vs_whole=conv_diff,
           groupnorm_stats=stat_diff, ranks=ranks)


# -- 4. device placement -------------------------------------------------------------------------------------


def check_placement(device) -> None:
    import tempfile

    import torch.distributed as dist

    import diffpar
    from diffpar.engines import tensor_parallel
    from diffpar.handle import ParallelHandle
    from diffpar.testing import tiny_transformers

    started = False
    try:
        if not dist.is_initialized():
            store = tempfile.NamedTemporaryFile(delete=False).name
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
            started = True
        model, _ = tiny_transformers.build("flux", heads=4)
        plan = diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=2), world_size=2)
        shard_plan = plan.component(type(model).__name__).payload.tp_plan
        handle = ParallelHandle(target=model)
        from diffpar.mesh import ParallelDims

        tp_mesh = ParallelDims(1, 1, 1, 1).build()["tp"]
        # This process makes rank 0's shard of the 2-rank plan: the engine reads the group's size and rank, and
        # sharding issues no collective (only detach after commit gathers), so the group is shown as rank 0 of 2.
        real_size, real_rank = dist.get_world_size, dist.get_rank
        dist.get_world_size, dist.get_rank = (lambda group=None: 2), (lambda group=None: 0)
        try:
            tensor_parallel.apply_tensor_parallel(model, shard_plan, tp_mesh, handle, "transformer")
        finally:
            dist.get_world_size, dist.get_rank = real_size, real_rank
        model.to(device)
        off = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device != device]
        sharded = sum(p.numel() for p in model.parameters())
        whole = sum(p.numel() for p in tiny_transformers.build("flux", heads=4)[0].parameters())
        report("placement[tp shard]", not off and sharded < whole, tensors_off_device=len(off), first_off=off[:1],
               params_shard=sharded, params_whole=whole)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run says why, the others still run
        report("placement[tp shard]", False, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if started:
            dist.destroy_process_group()


# -- 5. host syncs -------------------------------------------------------------------------------------------


def count_syncs(device, fn) -> int | None:
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# -- 6. baselines --------------------------------------------------------------------------------------------


def flux_step(device, small: bool):
    from diffusers import FluxTransformer2DModel

    if small:
        cfg = dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                   joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12), in_channels=64)
        image, text = 64, 16
    else:  # FLUX.1-dev
        cfg = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), in_channels=64,
                   guidance_embeds=True)
        image, text = 4096, 512
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # CPU bf16 matmuls are slow
    with torch.device(device):
        model = FluxTransformer2DModel(patch_size=1, **cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(1, image, 64, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        img_ids=torch.randn(image, 3, generator=g).to(device), txt_ids=torch.zeros(text, 3, device=device),
        return_dict=False,
    )
    if cfg.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return model, inputs


def baseline_transformer(device, small: bool) -> None:
    model, inputs = flux_step(device, small)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model(**inputs)  # warm-up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        repeats = 1 if small else 3
        for _ in range(repeats):
            model(**inputs)
        sync(device)
        step = (time.perf_counter() - start) / repeats
        syncs = count_syncs(device, lambda: model(**inputs))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    report(f"baseline_flux_step[{str(inputs['hidden_states'].dtype)[6:]}]", True, params_b=params / 1e9, step_s=step, peak_gib=peak,
           tokens=inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1])
    report("host_syncs_per_step", None if syncs is None else True, syncs=syncs)
    del model


def baseline_vae(device, small: bool) -> None:
    from diffusers import AutoencoderKL

    channels = (8, 16, 32, 32) if small else (128, 256, 512, 512)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                            block_out_channels=channels, norm_num_groups=8 if small else 32,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).to(dtype).eval()
    for px in ((64, 128) if small else (1024, 2048)):
        z = torch.randn(1, 16, px // 8, px // 8, device=device, dtype=dtype)
        with torch.no_grad():
            vae.decode(z)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            vae.decode(z)
            sync(device)
            took = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
        report(f"baseline_vae_decode[{px}px {str(dtype)[6:]}]", True, decode_s=took, activations_gib=peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (default: cuda:0)")
    parser.add_argument("--small", action="store_true", help="toy shapes (seconds, for CPU and CI)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    else:
        print(f"device: cpu, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    for check in (lambda: check_ring_op(device, args.small), lambda: check_tp_mlp(device, args.small),
                  lambda: check_quantized_tp(device, args.small, "float8"),
                  lambda: check_quantized_tp(device, args.small, "int8"),
                  lambda: check_vae_split_math(device, args.small), lambda: check_placement(device),
                  lambda: baseline_transformer(device, args.small), lambda: baseline_vae(device, args.small)):
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - one check that crashes is reported; the others still run
            report(f"crashed[{len(RESULTS)}]", False, error=f"{type(exc).__name__}: {exc}"[:300])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [name for name, r in RESULTS.items() if r["ok"] is False]
    summary = {"device": str(device), "seconds": time.perf_counter() - started, "failed": failed,
               "results": RESULTS}
    print(json.dumps(summary, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, default=str, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
