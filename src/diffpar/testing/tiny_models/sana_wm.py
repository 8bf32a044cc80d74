"""Tiny SANA-WM transformers (the stage-1 world model and the stage-2 refiner), their cases and real configs."""
from __future__ import annotations

import torch

from diffpar.families.transformers.sana_wm import REFINER_REFUSAL, SANA_WM_REFUSAL
from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("sana_wm")
def _sana_wm(heads=4, head_dim=16, layers=2):
    from diffusers import SanaWMTransformer3DModel

    # Every second block softmax attention, the others GDN linear attention; GLUMBConvTemp feed-forward.
    model = construct(SanaWMTransformer3DModel, in_channels=4, num_layers=layers, hidden_size=heads * head_dim,
                      num_attention_heads=heads, linear_head_dim=head_dim, caption_channels=32,
                      chunk_plucker_post_attn_blocks=layers, mlp_ratio=2.0, softmax_every_n=2)

    def inputs(seq=16, text=8, batch=1, seed=1):
        raise NotImplementedError("SANA-WM is refused: no layout runs it")

    return model, inputs


def _stage2_window_hook(module, args, kwargs):
    """What the SANA-WM stage-2 pipeline does around each call of the refiner (`pipelines/sana_wm/refiner.py`), for
    inputs that carry a `refiner_window`: capture the sink's pre-RoPE K/V, slide the sink RoPE, capture one history
    block's post-RoPE K/V, then build the active block's RoPE. Every RoPE table comes from the model's own
    `build_rotary_emb_for_absolute_positions` during the call, as the pipeline builds them (under tensor
    parallelism: this rank's columns). The cache passes call `forward` itself: they are part of this call, which
    the ranks agreed on before this hook (diffpar's agreement hook runs first) with the tables still unbuilt."""
    window = kwargs.pop("refiner_window", None)
    if window is None:
        return None
    hidden = kwargs["hidden_states"]
    batch, width, fps, cache = hidden.shape[0], window["width"], window["fps"], kwargs["kv_cache"]

    def rope(frames):
        return module.build_rotary_emb_for_absolute_positions(batch_size=batch, frame_positions=list(frames),
                                                              height=1, width=width, device=hidden.device, fps=fps)

    common = dict(encoder_hidden_states=kwargs["encoder_hidden_states"],
                  encoder_attention_mask=kwargs.get("encoder_attention_mask"), kv_cache=cache, return_dict=False)
    clean = torch.zeros(batch, width)
    forward = type(module).forward
    forward(module, hidden_states=window["sink"], timestep=clean, video_rotary_emb=rope([0]),
            kv_cache_mode="capture_pre_rope", **common)
    for layer in cache.layer_caches:
        layer.store_sink(*layer.get_captured_pre_rope())
    # Active block at frames 3.., one history frame (2): the sink slides to frame 3 - 1 - 1 = 1.
    cache.sink_pe = rope([1])
    forward(module, hidden_states=window["history"], timestep=clean, video_rotary_emb=rope([2]),
            kv_cache_mode="inject_and_capture_post_rope", **common)
    for layer in cache.layer_caches:
        layer.store_history(*layer.get_captured_post_rope())
    frames = hidden.shape[1] // width
    kwargs.update(video_rotary_emb=rope(range(3, 3 + frames)), kv_cache_mode="inject")
    return args, kwargs


@builder("sana_wm_refiner")
def _sana_wm_refiner(heads=4, head_dim=16, layers=2):
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    model = construct(
        SanaWMLTX2RefinerTransformer3DModel, in_channels=8, out_channels=8, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=heads * head_dim, audio_in_channels=8, audio_out_channels=8,
        audio_num_attention_heads=heads, audio_attention_head_dim=8, audio_cross_attention_dim=heads * 8,
        num_layers=layers, caption_channels=24,
    )
    model.register_forward_pre_hook(_stage2_window_hook, with_kwargs=True)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # Active block: 2 frames of seq // 2 tokens (height 1, patch 1); a sink frame and a history frame of the
        # same size go through the cache first (see _stage2_window_hook). The prompt's last 2 tokens are padding.
        g = torch.Generator().manual_seed(seed)
        width = max(1, seq // 2)
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[:, text - 2:] = 0
        return dict(
            hidden_states=torch.randn(batch, 2 * width, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            timestep=torch.full((batch, 2 * width), 700.0),
            video_rotary_emb=None,
            encoder_attention_mask=mask,
            kv_cache=SanaWMRefinerKVCache(layers),
            refiner_window=dict(width=width, fps=24.0, sink=torch.randn(batch, width, 8, generator=g),
                                history=torch.randn(batch, width, 8, generator=g)),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("sana_wm", "SanaWMTransformer3DModel", kind="video", cp=(), tp=(), refused=SANA_WM_REFUSAL),
    ModelCase("sana_wm_refiner", "SanaWMLTX2RefinerTransformer3DModel", kind="video", cp=(),
              tp=("w2-tp", "w4-tp"),
              notes="TP only, through the KV-cached sliding window; context parallelism refused "
                    "(see sana_wm_refiner_refused)"),
    ModelCase("sana_wm_refiner_refused", "SanaWMLTX2RefinerTransformer3DModel", kind="video", cp=(), tp=(),
              refused=REFINER_REFUSAL),
]
builder("sana_wm_refiner_refused")(_sana_wm_refiner)

REAL_CONFIGS = {
    # Efficient-Large-Model/SANA-WM_bidirectional (the class defaults): refused, listed for completeness of sizes.
    # The stage-2 refiner loads an LTX-2 checkpoint unchanged: LTX-2's configuration.
    "SANA-WM refiner (LTX-2 19B)": ("SanaWMLTX2RefinerTransformer3DModel", dict(
        in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
        audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32, audio_attention_head_dim=64,
        audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840)),
}
