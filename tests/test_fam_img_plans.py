"""Plan-time refusals of the DreamLite and Cosmos 3 plans (one process, before any change): what the family harness
(tests/test_families.py) cannot show, since it runs only the layouts that work."""
import pytest

import diffpar
from diffpar.testing import tiny_transformers
from diffpar.testing.coverage import class_available


def _require(class_name: str):
    if not class_available(class_name):
        pytest.skip(f"this diffusers release has no {class_name}")


def _plan(model, **config):
    world = config.get("ulysses_size", 1) * config.get("ring_size", 1) * config.get("tp_size", 1)
    return diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(**config), world_size=world)


def test_dreamlite_one_key_value_head_is_held_by_every_rank_under_tensor_parallelism():
    """One key/value head (the DreamLite U-Net's default) on 2 or 4 ranks: each rank holds that head and a share of
    the query heads (the harness runs the model at tp 2, 4 and U2 x tp2 against one process); 8 ranks, more than its query
    heads, are refused, naming the heads."""
    _require("DreamLiteTransformer2DModel")
    model, _ = tiny_transformers.build("dreamlite")  # num_kv_heads=1
    for tp in (2, 4):
        plan = _plan(model, tp_size=tp)
        assert "tp" in str(plan).lower()
    with pytest.raises(diffpar.UnsupportedError, match="heads"):
        _plan(model, tp_size=8)
    _plan(model, ulysses_size=2)  # context parallelism takes it too


def test_dreamlite_gligen_fuser_refused_under_context_parallelism():
    _require("DreamLiteTransformer2DModel")
    from diffusers import DreamLiteTransformer2DModel

    model = DreamLiteTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8,
                                        norm_num_groups=4, cross_attention_dim=16, attention_type="gated")
    with pytest.raises(diffpar.UnsupportedError, match="GLIGEN"):
        _plan(model, ulysses_size=2)
    assert all(getattr(m, "_diffusers_hook", None) is None for m in model.modules())


def test_cosmos3_refuses_when_another_helper_holds_the_seams():
    _require("Cosmos3OmniTransformer")
    model, _ = tiny_transformers.build("cosmos3")
    model._cp_shard_fn = lambda und, gen, rope: (und, gen, rope)
    with pytest.raises(diffpar.UnsupportedError, match="_cp_shard_fn"):
        _plan(model, ring_size=2)


def test_cosmos3_lengths_that_do_not_divide_refused_where_no_uneven_path(ranks):
    # Ulysses x Ring has no uneven split on any release: 7 prompt and 15 vision tokens over 4 ranks are refused
    # clearly at the shard seam, on every rank (the worker detaches on the error).
    _require("Cosmos3OmniTransformer")
    with pytest.raises(Exception, match="do not divide over 4 context-parallel ranks"):
        ranks(4, "workers.cp_transformers:cp_equivalence", model_name="cosmos3",
              config={"ulysses_size": 2, "ring_size": 2}, seq=15, text=7, model_kwargs={"heads": 8, "kv_heads": 4})
