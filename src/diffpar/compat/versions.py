"""Installed versions, parsed once. Prefer feature detection; versions are for messages and test names."""
from __future__ import annotations

import importlib.metadata as md

import torch


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        num = "".join(ch for ch in part if ch.isdigit())
        if not num:
            break
        out.append(int(num))
        if not part.isdigit():
            break
    return tuple(out)


def version_of(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "0"


DIFFUSERS = _parse(version_of("diffusers"))
TRANSFORMERS = _parse(version_of("transformers"))
TORCH = _parse(torch.__version__)


def describe() -> dict:
    return {
        "diffusers": version_of("diffusers"),
        "transformers": version_of("transformers"),
        "torch": torch.__version__,
        "diffpar": version_of("diffpar"),
    }
