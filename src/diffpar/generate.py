"""Run any diffusers pipeline saved on disk over N processes, and save its image or video on rank 0.

    torchrun --nproc_per_node=2 -m diffpar.generate MODEL_DIR --prompt "a lighthouse at dawn" --ulysses 2 \\
        --parallel-text-encoder --parallel-vae --steps 28 --out lighthouse.png
    python -m diffpar.generate MODEL_DIR --ulysses 2 --dry-run --world-size 2   # the plan, nothing run
    torchrun --nproc_per_node=4 -m diffpar.generate --config run.toml --seed 7  # flags override the file

MODEL_DIR is a folder written by `pipeline.save_pretrained` (or a downloaded snapshot): it is loaded with
`DiffusionPipeline.from_pretrained` with the Hub switched off (HF_HUB_OFFLINE=1). Every rank loads the whole
pipeline, then diffpar spreads it (`diffpar.enable_cache`). Only rank 0 shows progress bars and warnings
(`DIFFPAR_LOG_ALL_RANKS=1`: every rank). Rank 0 saves the output: an image as PNG; a video as a GIF (`--out
x.gif`), an MP4 (`--out x.mp4`, needs diffusers' video writer: imageio or opencv) or PNG frames (any other
name: `x_0000.png`, ...). It then prints, per component and per rank, the time spent in it, its peak
accelerator memory and its parameter bytes on that rank.

The config file (TOML; YAML when PyYAML is installed) holds the same options, named as the flags with `_` for
`-` (`parallel_text_encoder = true`, `model_dir = "..."`); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHES = ("none", "dbcache", "fbcache")
# Marks the hidden --report-split lines, one per rank, so a test can read them from the output.
SPLIT_MARK = "diffpar-split "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffpar.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=None, help="a folder written by save_pretrained")
    parser.add_argument("--config", default=None, help="a TOML (or YAML) file with these options")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--image", default=None, help="input image for image-to-image / edit / control pipelines")
    parser.add_argument("--ulysses", type=int, default=1, help="Ulysses (all-to-all) context-parallel degree")
    parser.add_argument("--ring", type=int, default=1, help="ring context-parallel degree")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the transformer")
    parser.add_argument("--cfg", type=int, default=1, help="classifier-free-guidance parallel degree: 2 puts the conditional and unconditional branches on two rank groups (docs/cfg.md)")
    parser.add_argument("--parallel-text-encoder", action=argparse.BooleanOptionalAction, default=False,
                        help="every text encoder tensor-parallel over all ranks")
    parser.add_argument("--parallel-vae", action=argparse.BooleanOptionalAction, default=False,
                        help="the VAE decode (and encode) split by rows over all ranks")
    parser.add_argument("--parallel-controlnet", action=argparse.BooleanOptionalAction, default=False,
                        help="the ControlNet context-parallel with the transformer")
    parser.add_argument("--cache", choices=CACHES, default="none",
                        help="step cache: diffpar's DBCache or diffusers' FirstBlockCache")
    parser.add_argument("--cache-threshold", type=float, default=0.08,
                        help="relative change under which the cache skips a step")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (pipeline default if unset)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="video frames (video pipelines)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--max-sequence-length", type=int, default=None, help="prompt tokens (where accepted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    parser.add_argument("--out", default="diffpar_out.png", help="output file (rank 0 writes it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (which module gets what), run nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run outside torchrun: the world to plan for (default: the model degree)")
    # For tests: the float output (before 8-bit rounding) and the tokens each rank's transformer saw.
    parser.add_argument("--save-array", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report-split", action="store_true", help=argparse.SUPPRESS)
    return parser


def read_config_file(path: str) -> dict:
    """The options in a TOML (or YAML) file, keyed as argparse destinations (`-` -> `_`)."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"diffpar.generate: config file {path} does not exist")
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"diffpar.generate: {path} is YAML but PyYAML is not installed; use TOML") from None
        data = yaml.safe_load(file.read_text()) or {}
    else:
        import tomllib

        with file.open("rb") as f:
            data = tomllib.load(f)
    if not isinstance(data, dict):
        raise SystemExit(f"diffpar.generate: {path} must hold a table of options")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over the config file over the defaults."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        options = read_config_file(known.config)
        destinations = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(options) - destinations)
        if unknown:
            raise SystemExit(f"diffpar.generate: unknown options in {known.config}: {unknown}. "
                             f"Known: {sorted(destinations)}")
        parser.set_defaults(**options)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        parser.error("MODEL_DIR is required (a positional argument or model_dir in --config)")
    if args.cfg not in (1, 2):
        raise SystemExit(
            f"diffpar.generate: --cfg {args.cfg}: classifier-free guidance has two branches, so --cfg is 1 or 2 "
            "(2: one rank group per branch). Spread the other ranks with --ulysses / --ring / --tp."
        )
    for name in ("ulysses", "ring", "tp"):
        if getattr(args, name) < 1:
            raise SystemExit(f"diffpar.generate: --{name} must be >= 1")
    return args


def torch_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(model_dir: str, dtype):
    """`DiffusionPipeline.from_pretrained` on a local folder, the Hub switched off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import DiffusionPipeline

    folder = Path(model_dir)
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"diffpar.generate: {model_dir} is not a saved diffusers pipeline (no model_index.json)")
    try:
        with warnings.catch_warnings():
            # Newer diffusers rename `torch_dtype` to `dtype`; 0.36 knows only `torch_dtype`, which all accept.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
            return DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except ValueError as exc:
        if "low_cpu_mem_usage" in str(exc):
            raise SystemExit(f"diffpar.generate: loading {model_dir} failed: {exc}. This model needs the "
                             "`accelerate` package to load (pip install accelerate).") from exc
        raise


def parallelism_config(pipe, args):
    import torch

    import diffpar

    extra = []
    if args.parallel_text_encoder:
        encoders = [n for n, m in pipe.components.items()
                    if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)]
        if not encoders:
            raise SystemExit(f"diffpar.generate: --parallel-text-encoder: {type(pipe).__name__} has no text encoder")
        extra += encoders
    for flag, name in (("parallel_vae", "vae"), ("parallel_controlnet", "controlnet")):
        if getattr(args, flag):
            if not isinstance(getattr(pipe, name, None), torch.nn.Module):
                raise SystemExit(f"diffpar.generate: --{flag.replace('_', '-')}: {type(pipe).__name__} has no "
                                 f"{name}")
            extra.append(name)
    return diffpar.ParallelismConfig(
        ulysses_size=args.ulysses if args.ulysses > 1 else None,
        ring_size=args.ring if args.ring > 1 else None,
        tp_size=args.tp if args.tp > 1 else None,
        cfg_size=args.cfg if args.cfg > 1 else None,
        extra_parallel_modules=extra,
    )


def cache_config(args):
    if args.cache == "none":
        return None
    if args.cache == "dbcache":
        import diffpar

        return diffpar.DBCacheConfig(residual_diff_threshold=args.cache_threshold)
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=args.cache_threshold)


def call_arguments(pipe, args) -> dict:
    """The pipeline call's keyword arguments; an option the pipeline does not take is refused, not dropped."""
    import torch

    accepted = inspect.signature(pipe.__call__).parameters
    wanted = {"prompt": args.prompt}
    optional = {
        "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps, "height": args.height,
        "width": args.width, "num_frames": args.frames, "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length,
    }
    flags = {"negative_prompt": "--negative-prompt", "num_inference_steps": "--steps", "height": "--height",
             "width": "--width", "num_frames": "--frames", "guidance_scale": "--guidance-scale",
             "max_sequence_length": "--max-sequence-length"}
    for key, value in optional.items():
        if value is None:
            continue
        if key not in accepted:
            raise SystemExit(f"diffpar.generate: {type(pipe).__name__} takes no {key!r}: drop {flags[key]}")
        wanted[key] = value
    if args.image is not None:
        from PIL import Image

        key = next((k for k in ("image", "control_image") if k in accepted), None)
        if key is None:
            raise SystemExit(f"diffpar.generate: {type(pipe).__name__} takes no input image: drop --image")
        wanted[key] = Image.open(args.image).convert("RGB")
    if "generator" in accepted:
        wanted["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    if "output_type" in accepted:
        wanted["output_type"] = "np"  # floats in [0, 1]: saved as 8-bit here, kept whole for --save-array
    return wanted


def output_array(output):
    """The first image (H, W, C) or video (F, H, W, C) of a pipeline output, as a float numpy array in [0, 1]."""
    import numpy as np

    for field in ("frames", "images"):
        value = getattr(output, field, None)
        if value is None and isinstance(output, dict):
            value = output.get(field)
        if value is None:
            continue
        first = value[0]
        if hasattr(first, "convert"):  # PIL images (a pipeline without output_type): the first one
            return np.asarray(first.convert("RGB"), dtype=np.float32) / 255
        if isinstance(first, (list, tuple)):  # a video as a list of PIL frames
            return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in first])
        array = np.asarray(first.float().cpu() if hasattr(first, "cpu") else first, dtype=np.float32)
        if array.ndim >= 3 and array.shape[-1] not in (1, 3, 4) and array.shape[-3] in (1, 3, 4):
            array = np.moveaxis(array, -3, -1)  # channels first -> last
        return array
    raise SystemExit(f"diffpar.generate: cannot find an image or video in {type(output).__name__}")


def save_output(array, out: str) -> list[str]:
    """Write an image (PNG, or whatever the suffix names) or a video (GIF, MP4, or PNG frames). Returns paths."""
    import numpy as np
    from PIL import Image

    def to_pil(frame):
        return Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype(np.uint8).squeeze())

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        to_pil(array).save(path)
        return [str(path)]
    frames = [to_pil(f) for f in array]
    if path.suffix.lower() == ".gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
        return [str(path)]
    if path.suffix.lower() == ".mp4":
        from diffusers.utils import export_to_video

        try:
            export_to_video([np.clip(f, 0, 1) for f in array], str(path), fps=8)
        except ImportError as exc:
            raise SystemExit(f"diffpar.generate: writing MP4 needs imageio or opencv ({exc}); use --out x.gif or "
                             "x.png for frames") from exc
        return [str(path)]
    written = []
    for i, frame in enumerate(frames):
        name = path.with_name(f"{path.stem}_{i:04d}.png")
        frame.save(name)
        written.append(str(name))
    return written


class ComponentMeter:
    """Wall time and peak accelerator memory inside each pipeline component, from hooks on the component and its
    direct children (a VAE's `decode` is not its `forward`, but it runs its decoder's). Calls nested within one
    component count once."""

    def __init__(self, pipe, device):
        import torch

        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._depth: dict[str, int] = {}
        self._start: dict[str, float] = {}
        self._hooks = []
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            self.seconds[name] = 0.0
            self.peak_bytes[name] = 0
            self._depth[name] = 0
            for part in (module, *module.children()):
                self._hooks.append(part.register_forward_pre_hook(self._enter(name)))
                self._hooks.append(part.register_forward_hook(self._leave(name), always_call=True))

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enter(self, name):
        def hook(module, args):
            if self._depth[name] == 0:
                self._sync()
                if self.device.type == "cuda":
                    import torch

                    torch.cuda.reset_peak_memory_stats(self.device)
                self._start[name] = time.perf_counter()
            self._depth[name] += 1

        return hook

    def _leave(self, name):
        def hook(module, args, output):
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self._sync()
                self.seconds[name] += time.perf_counter() - self._start[name]
                if self.device.type == "cuda":
                    import torch

                    self.peak_bytes[name] = max(self.peak_bytes[name], torch.cuda.max_memory_allocated(self.device))

        return hook

    def remove(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def rank_report(pipe, meter, total_s: float, device) -> dict:
    import torch

    components = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            components[name] = {"seconds": meter.seconds[name], "peak_bytes": meter.peak_bytes[name],
                                "param_bytes": parameter_bytes(module)}
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "peak GPU memory"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    return {"components": components, "seconds": total_s, "peak_bytes": peak, "peak_kind": peak_kind}


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB"


def print_reports(reports: list[dict], device) -> None:
    print(f"per component and rank: time inside it, {'peak GPU memory during it, ' if device.type == 'cuda' else ''}"
          "parameter bytes held")
    for name in reports[0]["components"]:
        for rank, report in enumerate(reports):
            c = report["components"][name]
            memory = f"   peak {_mib(c['peak_bytes'])}" if device.type == "cuda" else ""
            print(f"  {name:<16} rank {rank}: {c['seconds']:8.3f} s{memory}   parameters {_mib(c['param_bytes'])}")
    for rank, report in enumerate(reports):
        params = sum(c["param_bytes"] for c in report["components"].values())
        print(f"  total            rank {rank}: {report['seconds']:8.3f} s   {report['peak_kind']} "
              f"{_mib(report['peak_bytes'])}   parameters {_mib(params)}")


def dry_run(args) -> int:
    import diffpar
    from diffpar.logs import is_quiet_rank

    device = _device(args)
    pipe = load_pipeline(args.model_dir, torch_dtype(args.dtype, device))
    config = parallelism_config(pipe, args)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "0")) or config.model_degree
    the_plan = diffpar.plan(pipe, cache_config(args), parallelism_config=config, world_size=world)
    if not is_quiet_rank():
        print(the_plan)
    return 0


def _device(args):
    import torch

    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from diffpar import logs

    if args.threads:
        torch.set_num_threads(args.threads)
    if logs.is_quiet_rank():
        warnings.simplefilter("ignore")  # this process is ours: Python warnings too, rank 0 shows them
    logs.quiet_libraries()
    if args.dry_run:
        return dry_run(args)

    import diffpar
    from diffpar.mesh import ensure_process_group, gather_json

    multi_rank = ensure_process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if multi_rank else (0, 1)
    device = _device(args)
    pipe = load_pipeline(args.model_dir, torch_dtype(args.dtype, device))
    pipe.to(device)
    config = parallelism_config(pipe, args)
    if not multi_rank and config.model_degree == 1 and not config.extra_parallel_modules:
        config = None  # nothing asked for and nothing to spread: no "one process" warning
    handle = diffpar.enable_cache(pipe, cache_config=cache_config(args), parallelism_config=config)
    logs.quiet_other_ranks(pipe)  # also when one process ran (nothing to quiet then) or enable_cache did it
    kwargs = call_arguments(pipe, args)
    meter = ComponentMeter(pipe, device)
    probe = None
    if args.report_split:
        from diffpar.testing.probes import SplitProbe

        probe = SplitProbe(pipe)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.inference_mode():
            if multi_rank:
                dist.barrier()
            start = time.perf_counter()
            if probe is not None:
                with probe:
                    output = pipe(**kwargs)
            else:
                output = pipe(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total_s = time.perf_counter() - start
    finally:
        meter.remove()
    report = rank_report(pipe, meter, total_s, device)
    reports = [report]
    splits = [probe.summary()] if probe is not None else []
    if multi_rank:
        reports = gather_json(report, what="diffpar.generate: rank reports")
        if probe is not None:
            splits = gather_json(probe.summary(), what="diffpar.generate: split report")
    if rank == 0:
        array = output_array(output)
        written = save_output(array, args.out)
        if args.save_array:
            import numpy as np

            np.save(args.save_array, array)
        kind = "video" if array.ndim == 4 else "image"
        print(f"diffpar.generate: {type(pipe).__name__} from {args.model_dir}, {world} process(es), "
              f"{kind} {'x'.join(str(s) for s in array.shape[:-1])}, saved to {', '.join(written[:3])}"
              f"{' ...' if len(written) > 3 else ''}")
        if handle.plan is not None and world > 1:
            print(handle.plan)
        print_reports(reports, device)
        for r, summary in enumerate(splits):
            print(SPLIT_MARK + json.dumps({"rank": r, **_jsonable(summary)}))
    return 0  # the process ends in mesh.end_process: no need to detach or tear the process group down


def _jsonable(summary: dict) -> dict:
    def convert(value):
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, (set, list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(summary)


if __name__ == "__main__":
    from diffpar.mesh import end_process

    end_process(main())  # exit code only: no C++ teardown that could abort a correct run
