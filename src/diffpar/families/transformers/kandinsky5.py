"""Kandinsky 5 (`Kandinsky5Transformer3DModel`): context- and tensor-parallel plans; diffusers ships neither.

The prompt runs through its own encoder blocks first (text self-attention), then the visual decoder blocks do
self-attention over the video tokens (3-D RoPE) and cross-attention to the encoded prompt. The forward flattens
the video tokens and their RoPE table with a function, not a module, so the plan splits the video tokens where
they enter the first visual block and the RoPE table at every visual block (each gets the whole table), and
gathers the last visual block's output (the forward then reshapes it to the whole video).

The text blocks run whole on every rank (the prompt is short) and the cross-attention reads the whole prompt from
each video shard, so neither needs communication: their processors are swapped (undone on detach) for
`Kandinsky5LocalAttnProcessor`, which never takes the parallel config (diffusers would otherwise run Ulysses on
them, over a sequence that is not split). Only the visual self-attention is context-parallel.

Not supported: the sparse "nabla" attention (`attention_type="nabla"`): its block mask is computed from the
queries and keys of the whole video.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, present, register_tp_plan

_LOCAL = ("text_transformer_blocks", "visual_transformer_blocks.*.cross_attention")


def _local_processor_class():
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    class Kandinsky5LocalAttnProcessor(Kandinsky5AttnProcessor):
        """Attention on what this rank holds, whole: the parallel config is never taken."""

        @property
        def _parallel_config(self):
            return None

        @_parallel_config.setter
        def _parallel_config(self, value):
            pass  # context parallelism sets it on every processor; this one stays local

    return Kandinsky5LocalAttnProcessor


def prepare_kandinsky5(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    label = type(model).__name__
    local = {Kandinsky5AttnProcessor: _local_processor_class()}
    replace_attention_processors(model, local, handle, name, label, within=("text_transformer_blocks",))
    cross = [f"visual_transformer_blocks.{i}.cross_attention" for i in range(len(model.visual_transformer_blocks))]
    replace_attention_processors(model, local, handle, name, label, within=tuple(cross))


@register_cp_plan("Kandinsky5Transformer3DModel", prepare=prepare_kandinsky5)
def kandinsky5_cp_plan(model) -> dict:
    if getattr(model.config, "attention_type", "regular") != "regular":
        raise UnsupportedError(
            f"{type(model).__name__} with attention_type={model.config.attention_type!r}: its sparse attention "
            "builds a block mask from the queries and keys of the whole video, which a sequence split divides. "
            "Context parallelism supports attention_type='regular'."
        )
    blocks = len(model.visual_transformer_blocks)
    if not blocks:
        raise UnsupportedError(f"{type(model).__name__} has no visual blocks to parallelize.")
    # Decoder block forward(visual_embed, text_embed, time_embed, rope, sparse_params); rope is (B, N, 1, D/2, 2, 2).
    rope = {"rope": split_input(split_dim=1, expected_dims=6)}
    tokens = {"visual_embed": split_input(split_dim=1, expected_dims=3)}
    return {
        # One hook per block and argument: the table is split at every block, the tokens at the first only.
        **({"visual_transformer_blocks.0": {**tokens, **rope}} if blocks == 1 else
           {"visual_transformer_blocks.0": tokens, "visual_transformer_blocks.*": rope}),
        f"visual_transformer_blocks.{blocks - 1}": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("Kandinsky5Transformer3DModel")
def _kandinsky5_tp(model) -> TensorParallelPlan:
    def attention(prefix):
        return {f"{prefix}.to_query": "colwise", f"{prefix}.to_key": "colwise", f"{prefix}.to_value": "colwise",
                f"{prefix}.out_layer": "rowwise"}

    feed_forward = {"feed_forward.in_layer": "colwise", "feed_forward.out_layer": "rowwise"}
    text = {**attention("self_attention"), **feed_forward, "text_modulation.out_layer": GATHER}
    visual = {**attention("self_attention"), **attention("cross_attention"), **feed_forward,
              "visual_modulation.out_layer": GATHER}
    linears = present(model, text, "text_transformer_blocks")
    linears.update(present(model, visual, "visual_transformer_blocks"))
    linears["out_layer.modulation.out_layer"] = GATHER
    # q/k norms are RMSNorms over each head's dim: per head, no all-reduce.
    return TensorParallelPlan(linears=linears, attention_attrs={
        "text_transformer_blocks.*.self_attention": ("num_heads",),
        "visual_transformer_blocks.*.self_attention": ("num_heads",),
        "visual_transformer_blocks.*.cross_attention": ("num_heads",),
    })
