"""Quiet ranks: only rank 0 shows progress bars and library warnings; every rank still raises its errors.

N ranks running the same pipeline print the same progress bar and the same warnings N times. On every rank but
0, `quiet_other_ranks` raises the diffusers, transformers and diffpar loggers to ERROR (errors and exceptions
still show on every rank) and turns off tqdm progress bars: the libraries' own (model loading) and, given a
pipeline, the pipeline's denoising bar, with an undo on the handle so `detach()` brings that bar back.

`DIFFPAR_LOG_ALL_RANKS=1` keeps every rank as it was. diffpar itself logs through `logging.getLogger("diffpar")`.
The logger levels are process-wide settings (they are not undone on detach): a rank other than 0 stays such.
"""
from __future__ import annotations

import logging
import os

import torch.distributed as dist

LOG_ALL_RANKS_ENV = "DIFFPAR_LOG_ALL_RANKS"
# Loggers whose warnings repeat on every rank. diffusers and transformers log under their package names.
QUIETED_LOGGERS = ("diffpar", "diffusers", "transformers")

logger = logging.getLogger("diffpar")


def log_all_ranks() -> bool:
    return os.environ.get(LOG_ALL_RANKS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def process_rank() -> int:
    """This process's global rank: the process group's, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_quiet_rank() -> bool:
    """Whether this process should keep quiet: a rank other than 0, unless every rank was asked to log."""
    return process_rank() != 0 and not log_all_ranks()


def quiet_libraries() -> bool:
    """On a quiet rank, raise the libraries' loggers to ERROR and turn off their loading progress bars.

    Returns whether this rank was quieted. A logger already at ERROR or above is left as the user set it.
    """
    if not is_quiet_rank():
        return False
    for name in QUIETED_LOGGERS:
        library_logger = logging.getLogger(name)
        if library_logger.getEffectiveLevel() < logging.ERROR:
            library_logger.setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # checkpoint loading bars
    except ImportError:
        pass
    return True


def quiet_other_ranks(target, handle=None) -> bool:
    """`quiet_libraries()`, and on a quiet rank turn off `target`'s progress bar (a diffusers pipeline's).

    With `handle`, the bar's previous setting is restored on `handle.detach()` (the undo is recorded first).
    """
    if not quiet_libraries():
        return False
    configure = getattr(target, "set_progress_bar_config", None)
    if not callable(configure):
        return True  # a bare model: no progress bar of its own
    # diffusers' set_progress_bar_config replaces the whole setting: keep the user's other options.
    previous = dict(getattr(target, "_progress_bar_config", None) or {})
    had_setting = hasattr(target, "_progress_bar_config")

    def restore():
        if had_setting:
            configure(**previous)
        elif hasattr(target, "_progress_bar_config"):
            try:
                del target._progress_bar_config
            except AttributeError:
                pass

    if handle is not None:
        handle.add("progress bar: quiet on this rank", restore)
    configure(**{**previous, "disable": True})
    return True
