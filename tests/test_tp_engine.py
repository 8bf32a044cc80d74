"""The tensor-parallel engine's own checks, independent of any one family."""
import pytest

import diffpar


def test_key_value_heads_that_do_not_divide_are_refused_at_planning():
    """Grouped-query attention (Lumina 2: 4 query heads, 2 key/value heads) at tp 4: splitting the K/V projections
    by width alone would cut through a head. Refused when planning, naming the heads and the tp that works."""
    from diffpar.testing import tiny_transformers

    model, _ = tiny_transformers.build("lumina2", heads=4, kv_heads=2)
    diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=2), world_size=2)  # divides: plans
    with pytest.raises(diffpar.UnsupportedError) as err:
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=4), world_size=4)
    message = str(err.value)
    assert "2 key/value heads" in message and "4 query heads" in message, message
    assert "largest tp_size that works for this model is 2" in message, message


def test_key_value_head_refusal_on_every_rank(ranks):
    messages = ranks(4, "workers.transformer_tp:expect_error", model_name="lumina2", config={"tp_size": 4},
                     model_kwargs={"heads": 4, "kv_heads": 2})
    assert len(messages) == 4
    assert all(m and "key/value heads" in m for m in messages), messages
