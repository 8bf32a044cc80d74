"""Tiny HunyuanVideo image-to-video transformer (`image_condition_type="token_replace"`): the first latent frame's
tokens get their own modulation, so the cases place the first frame's end inside a rank's shard."""
from __future__ import annotations

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import BUILDERS, builder


def first_frame_tokens_for(seq: int) -> int:
    """Tokens per latent frame for a harness length: three frames of seq // 2 (even layouts: 24 tokens, so 12 per
    rank at 2 ranks and 6 at 4, neither dividing the first frame's 8) or seq // 3 (odd layouts: 15 tokens, which
    2 and 4 ranks split unevenly)."""
    return seq // 2 if seq % 2 == 0 else seq // 3


@builder("hunyuan_video_i2v")
def _hunyuan_video_i2v(heads=2, head_dim=16, layers=1, single_layers=1, refiner_layers=1):
    model, text_to_video_inputs = BUILDERS["hunyuan_video"](
        heads=heads, head_dim=head_dim, layers=layers, single_layers=single_layers, refiner_layers=refiner_layers,
        image_condition_type="token_replace",
    )

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None, frames=3, first_frame_tokens=None):
        # Latent (B, 4, frames, 2, 2 * n) with patch 2: n tokens per frame, one row of them.
        n = first_frame_tokens or first_frame_tokens_for(seq)
        made = text_to_video_inputs(seq=frames * n, text=text, batch=batch, seed=seed, frames=frames, valid=valid)
        assert made["hidden_states"].shape[2:] == (frames, 2, 2 * n)
        return made

    return model, inputs


CASES = [
    ModelCase("hunyuan_video_i2v", "HunyuanVideoTransformer3DModel", kind="video", model_kwargs={"heads": 4},
              pipelines=("HunyuanVideoImageToVideoPipeline",),  # tests/test_hunyuan_i2v_pipeline.py
              notes="image-to-video token_replace: first-frame tokens counted per rank from its shard's offset"),
]
