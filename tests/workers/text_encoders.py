"""Rank-side checks for text-encoder tensor parallelism (run on every gloo rank by the `ranks` fixture)."""
from __future__ import annotations

import copy
import gc
import logging
import weakref

import torch
import torch.distributed as dist

from diffpar.families.registry import extra_adapter_for
from diffpar.families.text_encoders.base import KEEP_ORIGINAL_OPTION, build_plan, parameter_bytes
from diffpar.config import ParallelismConfig
from diffpar.handle import ParallelHandle
from diffpar.engines.tensor_parallel_linear import ShardedModuleDetachedError
from diffpar.testing import tiny_text_encoders
from diffpar.testing.probes import collective_shapes_recorded


class _Options:
    """A config object carrying the keep-original option (read with getattr by the adapter)."""

    def __init__(self, keep: bool):
        setattr(self, KEEP_ORIGINAL_OPTION, keep)


def _enable(model, keep: bool = False):
    """What enable_cache does for one extra module: local check, then apply over the whole world."""
    world = dist.get_world_size()
    adapter = extra_adapter_for(model)
    plan = adapter.plan(model, "text_encoder", world, _Options(keep))
    handle = ParallelHandle(target=model)
    handle.states["text_encoder"] = adapter.apply(model, plan, dist.group.WORLD, handle, _Options(keep), None)
    handle.commit()
    return handle


def _quiet_detach(handle):
    """Detach without logging the expected "must be reloaded" warnings (the detach test checks them)."""
    logger = logging.getLogger("diffpar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return handle.detach(strict=False)
    finally:
        logger.setLevel(level)


def _counted_all_reduces():
    """Yields a list that gets the shape of every `dist.all_reduce` called inside the block."""
    return collective_shapes_recorded("all_reduce")


def _max_diffs(got: dict, ref: dict) -> dict:
    assert got.keys() == ref.keys(), (got.keys(), ref.keys())
    return {k: (got[k] - ref[k]).abs().max().item() for k in ref}


def family_equivalence(names: list, attn: str = "sdpa", seq: int = 11, batch: int = 2, pad: bool = True,
                       overrides: dict | None = None):
    """For each tiny family: sharded outputs vs the same model in one process, and what each rank holds."""
    results = {}
    for name in names:
        model, make_inputs = tiny_text_encoders.build(name, attn=attn, **(overrides or {}).get(name, {}))
        inputs = make_inputs(batch=batch, seq=seq, pad=pad)
        reference = tiny_text_encoders.encoder_outputs(copy.deepcopy(model), inputs)
        before = parameter_bytes(model)
        handle = _enable(model)
        outputs = tiny_text_encoders.encoder_outputs(model, inputs)
        info = handle.state("text_encoder")
        results[name] = {
            "diffs": _max_diffs(outputs, reference),
            "bytes_ratio": parameter_bytes(model) / before,
            "heads_per_rank": info["heads_per_rank"],
            "class": type(model).__name__,
            # Bitwise agreement between ranks: every rank must hand the pipeline the same embeddings.
            "checksum": float(sum(t.double().sum() for t in outputs.values())),
        }
        _quiet_detach(handle)
    return {"rank": dist.get_rank(), "results": results}


def local_heads(name: str, overrides: dict | None = None):
    """Per-rank head attributes of the first text attention module, and the projection shapes it holds."""
    model, _ = tiny_text_encoders.build(name, **(overrides or {}))
    handle = _enable(model)
    attrs = {}
    for path, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("Attention") and "Vision" not in kind and (hasattr(module, "q") or hasattr(module, "q_proj")):
            for key in ("num_key_value_groups", "num_heads", "num_key_value_heads", "n_heads", "inner_dim"):
                if isinstance(getattr(module, key, None), int):
                    attrs[key] = getattr(module, key)
            attrs["path"] = path
            break
    _quiet_detach(handle)
    return attrs


def check_error(name: str, overrides: dict | None = None):
    """Local checks only (no collective): the message every rank raises."""
    model, _ = tiny_text_encoders.build(name, **(overrides or {}))
    return check_error_on(model)


def detach_behaviour(name: str = "t5-gated"):
    """Detach after sharding: a clear error naming the encoder, and the shards refuse to run afterwards.
    With keep_original_text_encoders=True: restored bit for bit."""
    model, make_inputs = tiny_text_encoders.build(name)
    inputs = make_inputs()
    reference_model = copy.deepcopy(model)
    reference = tiny_text_encoders.encoder_outputs(reference_model, inputs)
    handle = _enable(model, keep=False)
    steps = handle.step_names
    try:
        handle.detach()
        detach_error = None
    except RuntimeError as exc:
        detach_error = str(exc)
    try:
        tiny_text_encoders.encoder_outputs(model, inputs)
        after_error = None
    except ShardedModuleDetachedError as exc:
        after_error = str(exc)
    # Enabling again on the detached (still sharded) encoder must say so before any collective.
    try:
        extra_adapter_for(model).plan(model, "text_encoder", dist.get_world_size(), _Options(False))
        reenable_error = None
    except Exception as exc:  # noqa: BLE001
        reenable_error = str(exc)

    kept, _ = tiny_text_encoders.build(name)
    state_before = {k: v.clone() for k, v in kept.state_dict().items()}
    handle = _enable(kept, keep=True)
    sharded = _max_diffs(tiny_text_encoders.encoder_outputs(kept, inputs), reference)
    problems = handle.detach()
    restored = _max_diffs(tiny_text_encoders.encoder_outputs(kept, inputs), reference)
    state_after = kept.state_dict()
    state_equal = state_before.keys() == state_after.keys() and all(
        torch.equal(state_before[k], state_after[k]) for k in state_before)
    return {
        "steps": steps, "detach_error": detach_error, "after_error": after_error, "reenable_error": reenable_error,
        "kept_sharded_diffs": sharded, "kept_detach_problems": problems, "kept_restored_diffs": restored,
        "kept_state_equal": state_equal,
    }


def memory_freed(name: str = "t5-gated"):
    """The full weights of sharded layers are freed, not kept beside the shards."""
    model, _ = tiny_text_encoders.build(name)
    world = dist.get_world_size()
    plan = build_plan(model, world)
    with torch.device("meta"):  # accounting from the plan alone works on a model without weights
        model_meta, _ = tiny_text_encoders.build(name)
    refs = [weakref.ref(model.get_submodule(layer.path).weight) for layer in plan.layers]
    before = parameter_bytes(model)
    handle = _enable(model)
    gc.collect()
    alive = sum(r() is not None for r in refs)
    result = {"alive_full_weights": alive, "planned": len(refs), "ratio": parameter_bytes(model) / before,
              "plan_bytes": plan.weight_bytes(model_meta)["per_rank_all"][dist.get_rank()],
              "held_bytes": parameter_bytes(model)}
    _quiet_detach(handle)
    return result


def count_all_reduces(name: str, seq: int = 9):
    """all-reduce calls in one forward, counted by wrapping dist.all_reduce, and the number of layers."""
    model, make_inputs = tiny_text_encoders.build(name)
    handle = _enable(model)
    with torch.no_grad(), _counted_all_reduces() as calls:
        model(**make_inputs(seq=seq))
    layers = model.config.num_layers if hasattr(model.config, "num_layers") else None
    if layers is None:
        text = getattr(model.config, "text_config", model.config)
        layers = text.num_hidden_layers
    _quiet_detach(handle)
    return {"all_reduces": len(calls), "layers": layers}


def parallel_linear_units(seed: int = 0):
    """The layers on their own: column+row pair (uneven split), gather_output, split-input rows, bias once."""
    from diffpar.engines.tensor_parallel_linear import ColumnParallelLinear, RowParallelLinear
    from diffpar.engines.tp_shard import split_ranges

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    up, down = torch.nn.Linear(12, 7), torch.nn.Linear(7, 5)
    x = torch.randn(3, 12)
    with torch.no_grad():
        ref = down(torch.nn.functional.gelu(up(x)))
        split = split_ranges(7, world)
        col = ColumnParallelLinear.from_linear(up, [split[rank]], dist.group.WORLD)
        row = RowParallelLinear.from_linear(down, [split[rank]], dist.group.WORLD)
        pair = row(torch.nn.functional.gelu(col(x)))
        sizes = [b - a for a, b in split]
        gathered = ColumnParallelLinear.from_linear(up, [split[rank]], dist.group.WORLD, gather_output=True,
                                                    all_out_sizes=sizes)(x)
        split_input = RowParallelLinear.from_linear(down, [split[rank]], dist.group.WORLD, input_is_parallel=False)
        full_in = split_input(torch.nn.functional.gelu(up(x)))
    return {
        "pair": (pair - ref).abs().max().item(),
        "gather": (gathered - up(x)).abs().max().item(),
        "split_input": (full_in - ref).abs().max().item(),
        "sizes": sizes,
    }


def pipeline_prompt_embeddings(kind: str = "flux", ulysses_size: int = 2, extra: tuple = ("text_encoder", "text_encoder_2"),
                               run_pipeline: bool = True, as_names: bool = False):
    """A whole pipeline through `diffpar.enable_cache`: text encoders sharded over the world, the transformer
    under Ulysses. `encode_prompt` (and, as a smoke check, the image) vs the same pipeline in one process."""
    import diffpar
    from diffpar.testing import tiny_pipelines

    build = tiny_pipelines.build_tiny_flux_pipeline if kind == "flux" else tiny_pipelines.build_tiny_wan_pipeline
    reference, pipe = build(), build()
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    if kind == "flux":
        def encode(p):
            embeds, pooled, _ids = p.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

        def generate(p):
            return p(prompts[1], height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    else:
        def encode(p):
            embeds, negative = p.encode_prompt(prompts, negative_prompt=["dark", "blue sky"], max_sequence_length=16)
            return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

        def generate(p):
            return p(prompts[1], negative_prompt="dark", height=32, width=32, num_frames=5, num_inference_steps=2,
                     max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    with torch.no_grad():
        ref_embeds = encode(reference)
        ref_image = generate(reference) if run_pipeline else None
    modules = list(extra) if as_names else [getattr(pipe, n) for n in extra]
    config = diffpar.ParallelismConfig(ulysses_size=ulysses_size, parallel_kwargs={"extra_parallel_modules": modules})
    handle = diffpar.enable_cache(pipe, parallelism_config=config)
    with torch.no_grad():
        embeds = encode(pipe)
        image = generate(pipe) if run_pipeline else None
    result = {
        "rank": dist.get_rank(),
        "embed_diffs": _max_diffs(embeds, ref_embeds),
        "image_diff": (image - ref_image).abs().max().item() if run_pipeline else None,
        "text_encoders": {k: {"ratio": v["param_bytes_after"] / v["param_bytes_before"], "heads": v["heads_per_rank"]}
                          for k, v in ((c.name, handle.state(c.name)) for c in handle.plan.by_role("text encoder"))},
        "steps": handle.step_names,
        "checksum": float(sum(t.double().sum() for t in embeds.values())),
    }
    try:
        handle.detach()
        result["detach_error"] = None
    except RuntimeError as exc:
        result["detach_error"] = str(exc)
    return result


def pipeline_error(text_heads: int = 2, ulysses_size: int = 2):
    """enable_cache with an encoder that has fewer heads than ranks: every rank raises the same clear error
    (the local check travels in the agreement collective), and the pipeline is left untouched."""
    import diffpar
    from diffpar.testing import tiny_pipelines

    pipe = tiny_pipelines.build_tiny_flux_pipeline(text_heads=text_heads)
    layer_type = type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q)
    config = diffpar.ParallelismConfig(ulysses_size=ulysses_size,
                                       parallel_kwargs={"extra_parallel_modules": ["text_encoder_2"]})
    try:
        diffpar.enable_cache(pipe, parallelism_config=config)
        error = None
    except Exception as exc:  # noqa: BLE001 - the test asserts type and message
        error = (type(exc).__name__, str(exc))
    untouched = type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q) is layer_type
    return {"rank": dist.get_rank(), "error": error, "untouched": untouched,
            "handle": getattr(pipe, "_diffpar_handle", None) is not None}


def refusals():
    """Layers diffpar must not split (a LoRA-wrapped / subclassed Linear), and a plan-carrying family it has not
    verified: each refused by the local check with what to do."""
    from transformers import Phi3Config, Phi3Model

    out = {}
    model, _ = tiny_text_encoders.build("llama")

    class LoraLinear(torch.nn.Linear):
        pass

    old = model.layers[0].self_attn.q_proj
    wrapped = LoraLinear(old.in_features, old.out_features, bias=False)
    model.layers[0].self_attn.q_proj = wrapped
    out["lora"] = check_error_on(model)
    phi = Phi3Model(Phi3Config(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=48, num_hidden_layers=1, pad_token_id=0))
    out["phi3"] = check_error_on(phi)
    clip_vision = None
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                  num_hidden_layers=1, image_size=16, patch_size=8))
        extra_adapter_for(vision)
    except Exception as exc:  # noqa: BLE001
        clip_vision = (type(exc).__name__, str(exc))
    out["clip_vision"] = clip_vision
    return out


def check_error_on(model):
    try:
        extra_adapter_for(model).plan(model, "text_encoder", dist.get_world_size(), _Options(False))
    except Exception as exc:  # noqa: BLE001
        return {"type": type(exc).__name__, "message": str(exc)}
    return None
