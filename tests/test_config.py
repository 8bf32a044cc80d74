"""ParallelismConfig validation (one process, no collectives)."""
import pytest
import torch

from diffpar import DiffparError, ParallelismConfig

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg


def test_parallel_kwargs_form_equals_fields():
    enc = torch.nn.Linear(2, 2)
    a = ParallelismConfig(ulysses_size=2, parallel_kwargs={"extra_parallel_modules": [enc], "ulysses_anything": True})
    b = ParallelismConfig(ulysses_size=2, extra_parallel_modules=[enc], ulysses_anything=True)
    assert a.describe() == b.describe()
    assert a.extra_parallel_modules[0] is enc


@pytest.mark.parametrize("kwargs,fragment", [
    ({"ulysses_size": 0}, "ulysses_size must be a positive integer"),
    ({"ring_size": 1.5}, "ring_size must be a positive integer"),
    ({"tp_size": True}, "tp_size must be a positive integer"),
    ({"ulysses_anything": True}, "ulysses_anything=True needs ulysses_size > 1"),
    ({"ring_size": 2, "ring_anything": True, "ulysses_size": 2, "ulysses_anything": True}, "cannot both be set"),
    ({"parallel_kwargs": {"extra_modules": []}}, "unknown parallel_kwargs ['extra_modules']"),
    ({"ulysses_size": 2, "ulysses_anything": False, "parallel_kwargs": {"convert_to_fp32": False}, "convert_to_fp32": True}, None),
    ({"extra_parallel_modules": [3]}, "extra_parallel_modules entries must be modules"),
    ({"attention_backend": 3}, "attention_backend must be a diffusers backend name"),
])
def test_invalid_configs_are_refused_with_a_reason(kwargs, fragment):
    if fragment is None:
        ParallelismConfig(**kwargs)  # same value in both places would be fine; different is refused below
        return
    with pytest.raises(DiffparError) as err:
        ParallelismConfig(**kwargs)
    assert fragment in str(err.value)


def test_same_option_twice_with_different_values():
    with pytest.raises(DiffparError, match="given both as a field"):
        ParallelismConfig(ulysses_size=2, ulysses_anything=True, parallel_kwargs={"ulysses_anything": False})


def test_world_of_one_is_a_no_op_with_a_warning():
    from diffpar.testing import tiny_transformers
    import diffpar

    model, make_inputs = tiny_transformers.build("flux")
    before = model(**make_inputs())[0]
    with pytest.warns(UserWarning, match="one process only"):
        handle = diffpar.enable_cache(model, parallelism_config=ParallelismConfig(ulysses_size=2))
    assert torch.equal(model(**make_inputs())[0], before)
    with pytest.raises(DiffparError, match="already enabled"):
        diffpar.enable_cache(model, parallelism_config=ParallelismConfig(ulysses_size=2))
    diffpar.disable_cache(model)
    with pytest.raises(DiffparError, match="not enabled"):
        diffpar.disable_cache(model)
