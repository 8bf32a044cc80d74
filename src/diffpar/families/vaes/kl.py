"""AutoencoderKL (SD 1.x/2.x, SDXL, SD3, Flux.1) and AutoencoderKLFlux2 (same Encoder/Decoder; its BatchNorm on
latents sits outside the decode path): 3x3 convs, GroupNorm, nearest upsampling, mid-block attention."""
from __future__ import annotations

from diffpar.engines.halo import pad_rows_at_edges
from diffpar.engines.vae_split import ModuleRule, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ATTENTION, ROW_LOCAL


def _downsample_2d_wrapper(state, module):
    # Downsample2D pads (0, 1, 0, 1) with F.pad inside forward when padding == 0: at the image's bottom edge only,
    # so the band above an edge takes its extra row from its neighbour (in the halo conv) instead.
    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if module.norm is not None:
            x = module.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if module.use_conv and module.padding == 0:
            x = pad_rows_at_edges(x, (0, 1, 0, 1), split)
        return module.conv(x)

    return wrapper


KL_RULES = {
    **dict.fromkeys(("Encoder", "Decoder", "UNetMidBlock2D", "UpDecoderBlock2D", "DownEncoderBlock2D"), ROW_LOCAL),
    "ResnetBlock2D": ROW_LOCAL.but(
        refuse=lambda m: "a ResnetBlock2D with up/down sampling inside" if m.up or m.down else None),
    "Upsample2D": ROW_LOCAL.but(  # nearest interpolation, then a halo conv
        refuse=lambda m: "Upsample2D with a transposed convolution" if m.use_conv_transpose or not m.interpolate
        else None),
    "Downsample2D": ModuleRule("pad at image edges, then halo convolution", wrap=_downsample_2d_wrapper),
    "Attention": ATTENTION,
}

register_vae("AutoencoderKL", "AutoencoderKLFlux2", rules=KL_RULES, video=False)
