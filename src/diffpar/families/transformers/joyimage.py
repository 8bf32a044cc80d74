"""Context- and tensor-parallel plans for JoyImage Edit (`JoyImageEditTransformer3DModel`); diffusers ships neither.

Double-stream blocks with joint [image, text] attention, no mask. Plan: image and text tokens are split where they
enter the first block; gather after `proj_out`. Keys may be in any order (no mask), so each rank's
[image shard, text shard] is exact.

The RoPE tables ((cos, sin) for the image tokens, and for the text under "mrope") are built by a model method and
passed to every block as a tuple of tuples, which diffusers' split hooks cannot reach. Forward change (undone on
detach): `JoyImageContextParallelAttnProcessor` cuts each table to this rank's tokens (dim 0), exactly as the
hooks cut the tokens, before rotating.

Tensor parallel: fused q/k/v of both streams packed by heads, output projections by rows, both MLPs by their
hidden width, and the shared modulation projection (`condition_embedder.time_proj`, 6 x hidden) gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, shard, split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, present, register_tp_plan


def _processor_class():
    from diffusers.models.transformers.transformer_joyimage import JoyImageAttnProcessor

    class JoyImageContextParallelAttnProcessor(JoyImageAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, **kwargs):
            if image_rotary_emb is not None and self._parallel_config is not None:
                cp = self._parallel_config.context_parallel_config
                image_rotary_emb = tuple(
                    None if table is None else tuple(shard(part, 0, cp) for part in table)
                    for table in image_rotary_emb
                )
            return super().__call__(attn, hidden_states, encoder_hidden_states, image_rotary_emb, **kwargs)

    return JoyImageContextParallelAttnProcessor


def prepare_joyimage(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_joyimage import JoyImageAttnProcessor

    replace_attention_processors(model, {JoyImageAttnProcessor: _processor_class()}, handle, name,
                                 type(model).__name__)


@register_cp_plan("JoyImageEditTransformer3DModel", prepare=prepare_joyimage, tokens="image")  # "3D": image model
def joyimage_cp_plan(model) -> dict:
    if not len(model.double_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    return {
        "double_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def joyimage_block_plan(model, container: str = "double_blocks") -> dict:
    if not len(getattr(model, container)):
        return {}
    inner = model.double_blocks[0].attn.heads * model.double_blocks[0].attn.head_dim
    qkv = Packed("colwise", (inner, inner, inner))
    block = {
        "attn.img_attn_qkv": qkv, "attn.txt_attn_qkv": qkv,
        "attn.img_attn_proj": "rowwise", "attn.txt_attn_proj": "rowwise",
        "img_mlp.net.0.proj": "colwise", "img_mlp.net.2": "rowwise",
        "txt_mlp.net.0.proj": "colwise", "txt_mlp.net.2": "rowwise",
    }
    return present(model, block, container)


@register_tp_plan("JoyImageEditTransformer3DModel")
def joyimage_tp_plan(model) -> TensorParallelPlan:
    linears = joyimage_block_plan(model)
    linears["condition_embedder.time_proj"] = GATHER  # every block's modulation
    return TensorParallelPlan(linears=linears, attention_attrs={"double_blocks.*.attn": ("heads",)})
