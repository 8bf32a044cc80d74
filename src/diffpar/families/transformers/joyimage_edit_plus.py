"""Context- and tensor-parallel plans for JoyImage Edit Plus (`JoyImageEditPlusTransformer3DModel`); diffusers
ships neither. The blocks are JoyImage Edit's (`joyimage.py`); the inputs are several images' patches, padded to
the longest sample, with per-sample RoPE tables and a key mask over [image patches, text].

Plan: image patches and text are split where they enter the first block, the RoPE tables (cos, sin: batch,
patches, dim) at every block; gather after `proj_out`.

Mask (built when a text mask is passed): `JoyImageEditPlusContextParallelAttnProcessor` drops one that masks
nothing; a real one (padded patches of a shorter sample, or padded text) is laid out under plain Ulysses in the
order the all-to-all gathers keys ([image_0, text_0, image_1, text_1, ...], `hunyuan_video.mask_for_sharded_keys`),
and refused under Ring, which cannot apply one. The model's forward builds that mask from the WHOLE inputs (every
sample's patch count from `shape_list`, the whole prompt mask) before the first block, where the plan splits; the
prompt length comes from `condition_embedder`, which also runs before the split. So a padded prompt is laid out
exactly like padded patches: the processor says so (`cuts_whole_text_mask`), which exempts the model from diffpar's
generic padded-prompt guard (`compat.diffusers_cp.guard_whole_text_mask`, meant for models whose processors apply
a whole mask to split keys).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.hunyuan_video import mask_for_sharded_keys
from diffpar.families.transformers.joyimage import joyimage_block_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan


def _processor_class(kept: dict):
    from diffusers.models.transformers.transformer_joyimage_edit_plus import JoyImageEditPlusAttnProcessor

    class JoyImageEditPlusContextParallelAttnProcessor(JoyImageEditPlusAttnProcessor):
        cuts_whole_text_mask = True  # it lays the whole [patches, text] mask out in key order (module docstring)

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None,
                     attention_mask=None):
            if attention_mask is not None and self._parallel_config is not None:
                if bool(attention_mask.all()):
                    attention_mask = None
                elif self._parallel_config.context_parallel_config.ring_degree > 1:
                    raise UnsupportedError(
                        "JoyImage Edit Plus with ring attention: this call needs a key mask (samples with different "
                        "image sizes padded to the longest, or a padded prompt), which ring attention cannot apply "
                        "across ranks. Use ulysses_size, or run samples of one size per call."
                    )
                else:
                    attention_mask = mask_for_sharded_keys(
                        attention_mask, hidden_states.shape[1], encoder_hidden_states.shape[1],
                        self._parallel_config, kept["text_tokens"],
                    )
            return super().__call__(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask)

    return JoyImageEditPlusContextParallelAttnProcessor


def prepare_joyimage_edit_plus(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_joyimage_edit_plus import JoyImageEditPlusAttnProcessor

    kept: dict = {}
    replace_attention_processors(model, {JoyImageEditPlusAttnProcessor: _processor_class(kept)}, handle, name,
                                 type(model).__name__)
    removers = []
    handle.add(f"{name}: record the prompt length", lambda: [r.remove() for r in removers])
    # condition_embedder(timestep, encoder_hidden_states): the whole prompt, before the split.
    removers.append(model.condition_embedder.register_forward_pre_hook(
        lambda module, args: kept.__setitem__("text_tokens", args[1].shape[1])))


@register_cp_plan("JoyImageEditPlusTransformer3DModel", prepare=prepare_joyimage_edit_plus,
                  tokens="image")  # "3D" in the name, an image model
def joyimage_edit_plus_cp_plan(model) -> dict:
    blocks = len(model.double_blocks)
    if blocks == 0:
        raise UnsupportedError(f"{type(model).__name__} has no blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    first = {"hidden_states": tokens, "encoder_hidden_states": tokens}
    every = {"image_rotary_emb": [split_input(split_dim=1, expected_dims=3), split_input(split_dim=1, expected_dims=3)]}
    plan = first_and_every_block("double_blocks", blocks, first, every)
    plan["proj_out"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("JoyImageEditPlusTransformer3DModel")
def joyimage_edit_plus_tp_plan(model) -> TensorParallelPlan:
    linears = joyimage_block_plan(model)
    linears["condition_embedder.time_proj"] = GATHER  # every block's modulation
    return TensorParallelPlan(linears=linears, attention_attrs={"double_blocks.*.attn": ("heads",)})
