"""The dry run shows where every context-parallel plan splits and gathers the sequence: for each tiny transformer
the tests build, `print(diffpar.plan(model, ...))` under Ulysses 2 names at least one split point and one gather
point, whether they are `_cp_plan` entries or the family's own hooks (GLM-Image, Cosmos 3: `hook_splits` /
`hook_gathers` on the family's registration). One process, world size given: no rank is started."""
import pytest

import diffpar
from diffpar.errors import UnsupportedError
from diffpar.testing import tiny_transformers
from diffpar.testing.coverage import all_cases, load_family_builders

load_family_builders()
_CASES = {case.builder: case for case in all_cases()}
# Classes whose split lives only in the family's hooks (their `_cp_plan` is empty): the dry run must still show it.
HOOK_ONLY = {"glm_image": "GlmImageTransformer2DModel", "cosmos3": "Cosmos3OmniTransformer"}


def _rendered_plan(builder: str) -> tuple[str, str]:
    kwargs = dict(_CASES[builder].model_kwargs) if builder in _CASES else {}
    try:
        model, _ = tiny_transformers.build(builder, **kwargs)
    except TypeError:  # a builder without the case's options (a variant)
        model, _ = tiny_transformers.build(builder)
    plan = diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2), world_size=2)
    return type(model).__name__, str(plan)


def _point_lines(rendered: str) -> tuple[str, str]:
    split = [line.strip() for line in rendered.splitlines() if "sequence split over 2 ranks at:" in line]
    gather = [line.strip() for line in rendered.splitlines() if line.strip().startswith("gathered at:")]
    assert len(split) == 1 and len(gather) == 1, rendered
    return split[0].split("at:", 1)[1].strip(), gather[0].split("at:", 1)[1].strip()


@pytest.mark.parametrize("builder", sorted(tiny_transformers.BUILDERS))
def test_dry_run_names_split_and_gather_points(builder):
    case = _CASES.get(builder)
    try:
        class_name, rendered = _rendered_plan(builder)
    except ImportError as exc:  # a class this diffusers release lacks
        pytest.skip(str(exc))
    except UnsupportedError as exc:  # refused or unplanned: no context-parallel plan to render
        assert not (case and case.cp and not case.refused), (builder, str(exc))
        pytest.skip(f"{builder}: no context-parallel plan ({str(exc)[:80]})")
    splits, gathers = _point_lines(rendered)
    assert splits, f"{builder} ({class_name}): the dry run shows no split point\n{rendered}"
    assert gathers, f"{builder} ({class_name}): the dry run shows no gather point\n{rendered}"


@pytest.mark.parametrize("builder,class_name", sorted(HOOK_ONLY.items()))
def test_hook_made_splits_are_described_by_the_family(builder, class_name):
    """These two plans have no `_cp_plan` entry at all: what the dry run shows comes from the family record."""
    from diffpar.testing.coverage import class_available

    if not class_available(class_name):
        pytest.skip(f"this diffusers release has no {class_name}")
    _, rendered = _rendered_plan(builder)
    splits, gathers = _point_lines(rendered)
    assert "(family hook)" in splits and "(family hook)" in gathers, rendered
    if builder == "glm_image":
        assert "transformer_blocks.0(hidden_states, encoder_hidden_states" in splits
        assert "image_rotary_emb" in splits and "proj_out" in gathers
    else:
        assert "generation tokens" in splits and "understanding prefix stays whole" in splits
        assert "gather seam" in gathers
