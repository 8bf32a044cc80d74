"""AutoencoderKLHunyuanVideo15 (HunyuanVideo 1.5): the replicate-padded causal conv3d of HunyuanVideo, per-pixel RMS
norms, space-to-depth / depth-to-space resampling (the first frame apart) with channel-mean / repeat shortcuts,
and a single-head mid-block attention over every frame's pixels with a frame-causal mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.vae_split import ModuleRule, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.hunyuan_video import CAUSAL_CONV3D
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _frame_causal_attention_wrapper(state, block):
    """This band's queries over every band's keys and values, a key frame never after its query frame."""

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        identity = x
        h = block.norm(x)  # per pixel: no statistics cross rows
        query, key, value = block.to_q(h), block.to_k(h), block.to_v(h)
        batch, channels, frames, rows, width = query.shape
        query = query.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, F*h*W, C) in (frame, row, column) order
        kv = torch.cat([key, value], dim=1).permute(0, 2, 3, 4, 1)  # (B, F, h, W, 2C)
        kv = split.gather(kv, dim=2)
        all_rows = kv.shape[2]
        key, value = kv.reshape(batch, 1, -1, 2 * channels).split(channels, dim=-1)
        q_frame = torch.arange(frames, device=x.device).repeat_interleave(rows * width)
        k_frame = torch.arange(frames, device=x.device).repeat_interleave(all_rows * width)
        mask = torch.zeros(q_frame.numel(), k_frame.numel(), dtype=query.dtype, device=x.device)
        mask.masked_fill_(k_frame[None, :] > q_frame[:, None], float("-inf"))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.squeeze(1).reshape(batch, frames, rows, width, channels).permute(0, 4, 1, 2, 3)
        return block.proj_out(out) + identity

    return wrapper


HUNYUAN_VIDEO15_RULES = {
    **dict.fromkeys(("HunyuanVideo15Encoder3D", "HunyuanVideo15Decoder3D", "HunyuanVideo15DownBlock3D",
                     "HunyuanVideo15UpBlock3D", "HunyuanVideo15MidBlock", "HunyuanVideo15ResnetBlock",
                     "HunyuanVideo15RMS_norm"), ROW_LOCAL),
    # A causal conv then space-to-depth by 2 in height: an encode band must hold whole row pairs.
    "HunyuanVideo15Downsample": ALIGNED.but(row_factor=lambda m: 2),
    "HunyuanVideo15Upsample": ALIGNED,  # depth-to-space after a causal conv: every band's rows double
    "HunyuanVideo15CausalConv3d": CAUSAL_CONV3D,
    "HunyuanVideo15AttnBlock": ModuleRule("single-head frame-causal attention over all pixels, local queries",
                                          wrap=_frame_causal_attention_wrapper, gathers_keys=True),
}

register_vae("AutoencoderKLHunyuanVideo15", rules=HUNYUAN_VIDEO15_RULES, video=True)
