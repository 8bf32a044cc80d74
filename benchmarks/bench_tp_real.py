"""Transformer tensor parallelism at the real configurations: weight bytes one rank holds under tp 2 and 4.

    python benchmarks/bench_tp_real.py            # every model with a REAL_CONFIGS entry
    python benchmarks/bench_tp_real.py --only LTX  # labels containing a word
    python benchmarks/bench_tp_real.py --per-rank  # every rank's share, not only the largest


No process group and no weights: each model is built on the meta device from its released configuration (bf16),
and the shard plan diffpar would apply (diffusers' `_tp_plan` where the release has one, else ours) gives every
rank's bytes from shapes alone. Sources: `benchmarks/bench_tp.py` REAL_CONFIGS (the first families) and the
`REAL_CONFIGS` of each module in `src/diffpar/testing/tiny_models/` (the families added since). Target (issues 12
and 13): per rank / whole <= 0.51 at tp 2 and <= 0.26 at tp 4. Where tp does not divide a head count, the ranks
holding a head more hold fewer MLP features (`engines/tp_shard.py` `balanced_free_ranges`): `--per-rank` shows it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from diffpar.errors import UnsupportedError
from diffpar.families.transformers import tp_plans
from diffpar.testing import coverage


def real_configs() -> dict:
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_tp import REAL_CONFIGS

    configs = dict(REAL_CONFIGS)
    for module in coverage._family_modules():
        configs.update(getattr(module, "REAL_CONFIGS", {}))
    return configs


def main(argv=None) -> int:
    import diffusers

    import diffpar.families.catalog  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="only labels containing this text")
    parser.add_argument("--per-rank", action="store_true",
                        help="every rank's share (rank 0 first), not only the largest")
    args = parser.parse_args(argv)
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}; bf16, meta device\n")
    print("| model | class | whole | tp 2: per rank / whole | tp 4: per rank / whole |")
    print("|---|---|---|---|---|")
    for label, (cls_name, config) in sorted(real_configs().items()):
        if args.only and args.only.lower() not in label.lower():
            continue
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            print(f"| {label} | `{cls_name}` | not in this diffusers | | |")
            continue
        with torch.device("meta"):
            model = cls(**config)
        cells, whole = [], None
        for tp in (2, 4):
            try:
                acc = tp_plans.shard_plan_for(model, tp).weight_bytes(model, bytes_per_element=2)
            except UnsupportedError as exc:
                cells.append(f"refused: {str(exc).split('.')[0]}")
                continue
            whole = acc["full"]
            cell = f"{acc['per_rank'] / acc['full']:.3f}"
            if args.per_rank:
                cell += " (" + ", ".join(f"{b / acc['full']:.4f}" for b in acc["per_rank_all"]) + ")"
            cells.append(cell)
        size = f"{whole / 2**30:.1f} GiB" if whole else "-"
        print(f"| {label} | `{cls_name}` | {size} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
