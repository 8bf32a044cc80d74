"""Rank-side checks for BERT text-encoder tensor parallelism (HunyuanDiT's `text_encoder`)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from diffpar.families.text_encoders.base import build_plan, parameter_bytes
from workers.text_encoders import _counted_all_reduces, _enable, _max_diffs, _quiet_detach

# 5 heads: uneven on 2, 3 and 4 ranks; odd intermediate size: uneven inner split too.
TINY_BERT = dict(vocab_size=97, hidden_size=40, num_attention_heads=5, intermediate_size=75, num_hidden_layers=2,
                 max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)


def _tiny_bert(attn: str = "sdpa", seed: int = 0, kind: str = "bert"):
    import transformers

    prefix = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**TINY_BERT)
    config._attn_implementation = attn
    return getattr(transformers, f"{prefix}Model")(config).eval()


def _inputs(batch: int = 2, seq: int = 11):
    """Odd length, the second row right-padded (attention mask with padding), both token types used."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY_BERT["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 4:] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _outputs(model, inputs) -> dict:
    with torch.no_grad():
        out = model(**inputs)
    # HunyuanDiT reads last_hidden_state; the pooler (whole on every rank) is checked too.
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def _sharded_layer_bytes(model) -> int:
    """Bytes of the four planned linears of every layer (weights and biases), as this rank holds them."""
    total = 0
    for layer in model.encoder.layer:
        for path in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"):
            total += parameter_bytes(layer.get_submodule(path))
    return total


def equivalence(attn: str = "sdpa", kind: str = "bert"):
    """Sharded vs one process; per-rank bytes of the split layers; per-rank head attributes; all-reduces; detach."""
    model = _tiny_bert(attn, kind=kind)
    inputs = _inputs()
    reference_model = copy.deepcopy(model)
    reference = _outputs(reference_model, inputs)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_bytes_before = _sharded_layer_bytes(model)
    bytes_before = parameter_bytes(model)
    plan_bytes = build_plan(model, dist.get_world_size()).weight_bytes(model)

    handle = _enable(model, keep=True)
    with _counted_all_reduces() as calls:
        outputs = _outputs(model, inputs)
    attention = model.encoder.layer[0].attention.self
    result = {
        "diffs": _max_diffs(outputs, reference),
        "checksum": float(sum(t.double().sum() for t in outputs.values())),
        "layer_bytes_ratio": _sharded_layer_bytes(model) / layer_bytes_before,
        "bytes_ratio": parameter_bytes(model) / bytes_before,
        "plan_per_rank": plan_bytes["per_rank_all"][dist.get_rank()],
        "held_bytes": parameter_bytes(model),
        "heads": (attention.num_attention_heads, attention.all_head_size, attention.query.weight.shape[0]),
        "heads_per_rank": handle.state("text_encoder")["heads_per_rank"],
        "all_reduces": len(calls),
        "layers": model.config.num_hidden_layers,
    }
    problems = handle.detach()
    state_after = model.state_dict()
    result["detach_problems"] = problems
    result["restored_diffs"] = _max_diffs(_outputs(model, inputs), reference)
    result["state_equal"] = state_before.keys() == state_after.keys() and all(
        torch.equal(state_before[k], state_after[k]) for k in state_before)
    result["heads_after_detach"] = (attention.num_attention_heads, attention.all_head_size)
    return result


def freed_detach(attn: str = "sdpa"):
    """Default (keep_original off): detach says to reload, naming the encoder."""
    model = _tiny_bert(attn)
    handle = _enable(model, keep=False)
    try:
        handle.detach()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    finally:
        _quiet_detach(handle)
    return {"detach_error": error}
