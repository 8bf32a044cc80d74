"""Rank-side runs of a torchao weight-only int8 model under diffpar (tests/test_quantized.py)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.compat.quantized_tensors import inner_tensors, is_plain, storage_bytes
from diffpar.families.registry import extra_adapter_for
from diffpar.families.text_encoders.base import KEEP_ORIGINAL_OPTION
from diffpar.handle import ParallelHandle
from diffpar.testing import tiny_text_encoders, tiny_transformers
from diffpar.testing.probes import SplitProbe


def _quantize(model, quant: str = "int8", **config):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(model, (Float8WeightOnlyConfig if quant == "float8" else Int8WeightOnlyConfig)(**config))
    return model


def _quantized(model_name: str, loaded: bool = False, quant: str = "int8"):
    """The tiny model with int8 weights: quantized in place (`quantize_`), or (`loaded`) saved and loaded back by
    diffusers with `TorchAoConfig` (is_quantized, an hf_quantizer; the same Int8Tensor weights)."""
    model, make_inputs = tiny_transformers.build(model_name, heads=4)
    if not loaded:
        return _quantize(model, quant), make_inputs
    import logging
    import tempfile

    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        quiet = logging.getLogger("diffusers").level
        logging.getLogger("diffusers").setLevel(logging.ERROR)  # "only bfloat16 is supported": fp32 runs on CPU
        try:
            model = type(model).from_pretrained(directory, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                                torch_dtype=torch.float32)
        finally:
            logging.getLogger("diffusers").setLevel(quiet)
    assert model.is_quantized
    return model.eval(), make_inputs


def _weight_types(model) -> list[str]:
    return sorted({type(p.data).__name__ for p in model.parameters()})


def _quantized_bytes(model) -> int:
    """Bytes of every quantized weight a rank holds (int8 data and scales), shards included."""
    return sum(storage_bytes(p) for p in model.parameters() if not is_plain(p))


def _snapshot(model) -> dict:
    """Every parameter as its plain inner tensors (cloned), its class and its block layout: what a bit-for-bit
    detach must give back."""
    return {name: (type(p.data).__name__, list(getattr(p.data, "block_size", []) or []), tuple(p.shape),
                   [t.clone() for t in inner_tensors(p)]) for name, p in model.named_parameters()}


def _same(before: dict, after: dict) -> bool:
    if before.keys() != after.keys():
        return False
    for name, (kind, block, shape, tensors) in before.items():
        kind2, block2, shape2, tensors2 = after[name]
        if (kind, block, shape) != (kind2, block2, shape2) or len(tensors) != len(tensors2):
            return False
        if not all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(tensors, tensors2)):
            return False
    return True


def quantized_cp_equivalence(model_name: str, config: dict):
    """The same int8 model in one process vs context parallel: the weights are not touched by CP."""
    model, make_inputs = _quantized(model_name)
    inputs = make_inputs(seq=16, text=8)
    reference_model = copy.deepcopy(model)
    with torch.no_grad(), SplitProbe(reference_model) as reference_probe:
        reference = reference_model(**copy.deepcopy(inputs))[0]
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        with torch.no_grad(), SplitProbe(model) as probe:
            out = model(**copy.deepcopy(inputs))[0]
        quantized = sorted({type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    finally:
        handle.detach()
    return {"rank": dist.get_rank(), "diff": (out - reference).abs().max().item(), "split": probe.summary(),
            "split_reference": reference_probe.summary(), "weight_types": quantized}


def quantized_tp_equivalence(model_name: str, config: dict, loaded: bool = False, quant: str = "int8"):
    """The int8 model sharded by tensor parallelism (its int8 data and scales cut, not re-quantized) vs the same
    int8 model in one process; what each rank holds; detach gives back every int8 tensor and scale bit for bit."""
    model, make_inputs = _quantized(model_name, loaded, quant)
    inputs = make_inputs(seq=16, text=8)
    reference_model = copy.deepcopy(model)
    with torch.no_grad(), SplitProbe(reference_model) as reference_probe:
        reference = reference_model(**copy.deepcopy(inputs))[0]
    with torch.no_grad():  # the model itself, not a copy: a deepcopy of a from_pretrained model rounds differently
        own = model(**copy.deepcopy(inputs))[0]
    before = _snapshot(model)
    bytes_before = _quantized_bytes(model)
    # the plan's weight figures (no collective, no change), then what the model really holds: all parameters,
    # quantized ones as their int8 / float8 data and scales
    planned = diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(**config),
                           world_size=dist.get_world_size()).components[0]
    held_before = sum(storage_bytes(p) for p in model.parameters())
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        with torch.no_grad(), SplitProbe(model) as probe:
            out = model(**copy.deepcopy(inputs))[0]
        sharded_types = _weight_types(model)
        bytes_sharded = _quantized_bytes(model)
        held_sharded = sum(storage_bytes(p) for p in model.parameters())
        # the first attention query projection (column-parallel): its own rows and their scales
        path = next(p for p, m in model.named_modules() if p.endswith(".to_q"))
        q = model.get_submodule(path).weight
        full_q = reference_model.get_submodule(path).weight
        q_shard = {"shape": list(q.shape), "scale": list(q.scale.shape), "block_size": list(q.block_size),
                   "full_shape": list(full_q.shape)}
    finally:
        handle.detach()
    with torch.no_grad():
        after = model(**copy.deepcopy(inputs))[0]
    return {"rank": dist.get_rank(), "diff": (out - own).abs().max().item(),
            "diff_vs_copy": (out - reference).abs().max().item(), "detach_diff": (after - own).abs().max().item(), "detach_weights_equal": _same(before, _snapshot(model)),
            "bytes_ratio": bytes_sharded / bytes_before, "weight_types": sharded_types, "q_shard": q_shard,
            "planned_bytes": planned.weight_bytes, "planned_bytes_per_rank": planned.weight_bytes_per_rank,
            "held_bytes": held_before, "held_bytes_sharded": held_sharded, "planned_engine": planned.engine,
            "split": probe.summary(), "split_reference": reference_probe.summary()}


class _Options:
    def __init__(self, keep: bool):
        setattr(self, KEEP_ORIGINAL_OPTION, keep)


def quantized_text_encoder(name: str):
    """A text encoder with int8 weights, sharded by tensor parallelism (kept originals: an exact detach) vs the
    same int8 encoder in one process."""
    model, make_inputs = tiny_text_encoders.build(name)
    _quantize(model)
    inputs = make_inputs()
    reference = tiny_text_encoders.encoder_outputs(copy.deepcopy(model), inputs)
    before = _snapshot(model)
    bytes_before = _quantized_bytes(model)
    adapter = extra_adapter_for(model)
    plan = adapter.plan(model, "text_encoder", dist.get_world_size(), _Options(True))
    handle = ParallelHandle(target=model)
    handle.states["text_encoder"] = adapter.apply(model, plan, dist.group.WORLD, handle, _Options(True), None)
    handle.commit()
    try:
        outputs = tiny_text_encoders.encoder_outputs(model, inputs)
        bytes_sharded = _quantized_bytes(model)
        shard_shapes = sorted({tuple(p.shape) for p in model.parameters() if not is_plain(p)})
    finally:
        handle.detach()
    restored = tiny_text_encoders.encoder_outputs(model, inputs)
    return {"rank": dist.get_rank(), "class": type(model).__name__,
            "diffs": {k: (outputs[k] - reference[k]).abs().max().item() for k in reference},
            "detach_diffs": {k: (restored[k] - reference[k]).abs().max().item() for k in reference},
            "detach_weights_equal": _same(before, _snapshot(model)), "bytes_ratio": bytes_sharded / bytes_before,
            "quantized_before": "Int8Tensor" in {v[0] for v in before.values()}, "shard_shapes": shard_shapes,
            "heads_per_rank": handle.state("text_encoder")["heads_per_rank"]}


def quantized_tp_error(model_name: str, config: dict, layout: str):
    """TP on a weight layout diffpar has no rule for: refused on every rank before any change."""
    model, _ = tiny_transformers.build(model_name, heads=4)
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if layout == "intx":  # another torchao layout (int4 values in int8 storage, scales per group of 4)
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(4)))
    else:  # "int8-groups": int8 scales per group of 4 inputs, cut across by a row-parallel layer
        _quantize(model, granularity=PerGroup(4))
    before = _snapshot(model)
    try:
        diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    except diffpar.DiffparError as exc:
        return {"message": f"{type(exc).__name__}: {exc}", "unchanged": _same(before, _snapshot(model))}
    diffpar.disable_cache(model)
    return {"message": None, "unchanged": None}


def quantized_tp_rollback(model_name: str, config: dict, fail_ranks: list[int]):
    """A failure right after the tensor-parallel step (the shards in place) on `fail_ranks`: every rank rolls back
    to the whole int8 model, bit for bit (the quantized originals were kept until commit)."""
    from diffpar import applying

    model, make_inputs = _quantized(model_name)
    inputs = make_inputs(seq=16, text=8)
    with torch.no_grad():
        reference = model(**copy.deepcopy(inputs))[0]
    before = _snapshot(model)
    original, ran = applying.apply_step, []

    def failing(name, fn, *args, **kwargs):
        out = fn(*args, **kwargs)
        if name == "tensor parallel":
            ran.append(sorted({type(m).__name__ for m in model.modules()}))
            if dist.get_rank() in fail_ranks:
                raise RuntimeError("injected failure after the tensor-parallel step")
        return out

    applying.apply_step = failing
    error = None
    try:
        diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    finally:
        applying.apply_step = original
    with torch.no_grad():
        after = model(**copy.deepcopy(inputs))[0]
    return {"rank": dist.get_rank(), "error": error, "sharded": bool(ran) and "ColumnParallelLinear" in ran[0],
            "weights_equal": _same(before, _snapshot(model)), "output_diff": (after - reference).abs().max().item()}
