"""FLUX.3 (`Flux3Transformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

Three token streams (noisy image, optional reference image, text) each pass their own blocks (self-attention within
the stream), then the joint blocks attend over [text, image, reference]. Everything outside attention works token
by token, the modulation included (per-token (B, S, 3D) tensors computed from each stream's length), and the
attention processor goes through diffusers' dispatcher.

Context parallel: every stream and its position ids are split as they enter the model; the per-stream RoPE tables
are then computed for exactly the local tokens, and the joint blocks' table, concatenated per rank like the
tokens, matches [text shard, image shard, reference shard]. Each stream's own attention is one context-parallel
call over that stream. The output (image tokens only) is gathered after `proj_out`. One forward change, undone on
detach: a call without a reference image gets those inputs as explicit None (see `prepare_flux3`).

Tensor parallel: attention heads and the SwiGLU feed-forward split in every block; the per-stream modulation
projections and the text input projection are gathered (colwise_gather).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, register_tp_plan


_OPTIONAL_STREAM = ("image_cond_hidden_states", "image_cond_ids")


def prepare_flux3(model, config, handle, name: str) -> None:
    """diffusers' split hook cannot look up a planned argument the call omits (an IndexError past the positional
    arguments): a text-to-image call, which passes no reference image, gets those arguments as explicit None (which
    the hook skips). A torch pre-hook runs before diffusers' hooks; removed on detach."""
    import inspect

    positions = list(inspect.signature(type(model).forward).parameters)[1:]

    def name_omitted_inputs(module, args, kwargs):
        for arg in _OPTIONAL_STREAM:
            if arg not in kwargs and positions.index(arg) >= len(args):
                kwargs[arg] = None
        return args, kwargs

    hooks = []
    handle.add(f"{name}: pass the omitted reference-image inputs as None", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(name_omitted_inputs, with_kwargs=True))


@register_cp_plan("Flux3Transformer2DModel", prepare=prepare_flux3)
def flux3_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    ids = split_input(split_dim=0, expected_dims=2)
    return {
        "": {"hidden_states": tokens, "encoder_hidden_states": tokens, "image_cond_hidden_states": tokens,
             "img_ids": ids, "txt_ids": ids, "image_cond_ids": ids},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def _block_stacks(model) -> list[str]:
    stacks = [f"mode_blocks.{mode}" for mode in model.mode_blocks.keys()]
    return [s for s in (*stacks, "txt_mode_blocks", "single_transformer_blocks") if len(model.get_submodule(s))]


@register_tp_plan("Flux3Transformer2DModel")
def _flux3(model) -> TensorParallelPlan:
    linears, attrs = {}, {}
    for stack in _block_stacks(model):
        first = model.get_submodule(stack)[0]
        half = first.ff.linear_in.out_features // 2  # SwiGLU: gate and value halves, each split across ranks
        linears.update({
            f"{stack}.*.attn.to_q": "colwise", f"{stack}.*.attn.to_k": "colwise", f"{stack}.*.attn.to_v": "colwise",
            f"{stack}.*.attn.to_out.0": "rowwise",
            f"{stack}.*.ff.linear_in": Packed("colwise", (half, half)), f"{stack}.*.ff.linear_out": "rowwise",
        })
        attrs[f"{stack}.*.attn"] = ATTN_ATTRS
    for group in ("early_stream_modulations", "single_stream_modulations"):
        for key in getattr(model, group).keys():
            linears[f"{group}.{key}.linear"] = GATHER
    linears["norm_out.linear"] = GATHER
    # The text input projection reads 20480-wide stacked encoder states (1% of FLUX.3): computed by slices, gathered.
    linears["context_embedder"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
