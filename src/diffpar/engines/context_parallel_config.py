"""ParallelismConfig -> diffusers' ContextParallelConfig for the installed release.

Only fields the installed release has are passed (by keyword: 0.38 inserted `mesh` before
`ulysses_anything`); asking for what it cannot do is a clear error, not a silent downgrade.
"""
from __future__ import annotations

from diffpar.compat import diffusers_cp, versions
from diffpar.config import ParallelismConfig
from diffpar.errors import UnsupportedError


def context_parallel_kwargs(config: ParallelismConfig) -> dict:
    fields = diffusers_cp.cp_config_fields()
    kwargs = {"ring_degree": config.ring_degree, "ulysses_degree": config.ulysses_degree}
    if "convert_to_fp32" in fields:
        kwargs["convert_to_fp32"] = config.convert_to_fp32
    release = versions.version_of("diffusers")
    for option in ("ulysses_anything", "ring_anything"):
        if getattr(config, option):
            if option not in fields:
                raise UnsupportedError(
                    f"{option}=True: the installed diffusers {release} has no `{option}` (added in "
                    f"{'0.37.0' if option == 'ulysses_anything' else '0.38.0'}). Upgrade diffusers, or use sequence "
                    f"lengths divisible by the degree."
                )
            kwargs[option] = True
    if config.ulysses_degree > 1 and config.ring_degree > 1 and not diffusers_cp.supports_ulysses_and_ring():
        raise UnsupportedError(
            f"ulysses_size={config.ulysses_degree} with ring_size={config.ring_degree}: the installed diffusers "
            f"{release} cannot combine Ulysses and Ring (added in 0.37.0). Use one of them, or upgrade diffusers."
        )
    return kwargs
