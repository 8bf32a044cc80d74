"""GLM-Image's token cut under context parallelism (issue 12 / issue 10 item 5): a call whose per-stream split cannot
run (fewer text tokens than ranks: with guidance the unconditional glyph text is ONE token; or a stream the degree
does not divide on a layout with no uneven split) is cut over the joint sequence [text, image] in contiguous
pieces. Multi-rank: the tiny GlmImageTransformer2DModel vs one process (CP_FP32), detach bit for bit, and the
tokens each rank's first attention saw are exactly the joint cut's (rank 0 the text), with every attention call
issuing its collective over the context-parallel group. The cut itself is checked in one process."""
import pytest
from tolerances import CP_FP32

from diffpar.compat.diffusers_cp import uneven_split_option
from diffpar.testing.coverage import class_available
from diffpar.families.transformers.glm_image import choose_token_cut, joint_cut
from diffpar.testing.probes import context_parallel_degree, expected_collectives


# -- the cut, in one process --------------------------------------------------------------------------------------


def test_joint_cut_gives_rank_0_the_text_and_equal_joint_lengths():
    cut = joint_cut(1, 15, 4)
    assert cut.joint and cut.text_counts() == [1, 0, 0, 0] and cut.image_counts() == [3, 4, 4, 4]
    assert cut.image == ((0, 3), (3, 7), (7, 11), (11, 15)) and cut.even()
    cut = joint_cut(6, 10, 4)  # the text spills over rank 0's piece; rank 0 holds no image token
    assert cut.text_counts() == [4, 2, 0, 0] and cut.image_counts() == [0, 2, 4, 4]


def test_per_stream_cut_kept_where_it_runs():
    # each stream divides, or is uneven with a token on every rank where the layout has an uneven split
    for text, image, parts, uneven_ok in ((8, 16, 2, False), (5, 10, 2, True), (7, 17, 4, True), (0, 16, 2, False)):
        cut = choose_token_cut(text, image, parts, uneven_ok)
        assert not cut.joint, (text, image, parts)
        assert sum(cut.text_counts()) == text and sum(cut.image_counts()) == image


def test_joint_cut_where_the_per_stream_cut_cannot_run():
    # 1 text token over 2 or 4 ranks: the guidance call
    assert choose_token_cut(1, 10, 2, True).joint_lengths() == [6, 5]
    assert choose_token_cut(1, 15, 2, False).joint_lengths() == [8, 8]  # even: no uneven path needed
    assert choose_token_cut(1, 13, 4, True).joint_lengths() == [4, 4, 3, 3]
    # 6 text tokens over 4 ranks with no uneven split (Ulysses x Ring): 16 joint tokens divide
    assert choose_token_cut(6, 10, 4, False).joint
    # neither cut runs: refused (the message is checked multi-rank below)
    assert choose_token_cut(1, 14, 4, False) is None
    assert choose_token_cut(1, 2, 4, True) is None


# -- multi-rank -----------------------------------------------------------------------------------------------

needs_glm_image = pytest.mark.skipif(not class_available("GlmImageTransformer2DModel"),
                                     reason="this diffusers release has no GlmImageTransformer2DModel")


def _has_uneven_path(config: dict) -> bool:
    return uneven_split_option(config.get("ulysses_size", 1), config.get("ring_size", 1)) is not None


ULYSSES = lambda n: {"ulysses_size": n}  # noqa: E731
RING = lambda n: {"ring_size": n}  # noqa: E731

# (world, config, image tokens, text tokens). 1 + 15 = 16 joint tokens divide 2 and 4 (attention's even path, on
# every release); 1 + 13 = 14 divide 2, not 4 (4, 4, 3, 3: diffusers' uneven path, where the release has one).
LAYOUTS = [
    pytest.param(2, ULYSSES(2), 15, 1, id="w2-ulysses-1+15"),
    pytest.param(2, RING(2), 15, 1, id="w2-ring-1+15"),
    pytest.param(4, ULYSSES(4), 15, 1, id="w4-ulysses-1+15"),
    pytest.param(4, RING(4), 15, 1, id="w4-ring-1+15"),
    pytest.param(2, ULYSSES(2), 13, 1, id="w2-ulysses-1+13"),
    pytest.param(4, ULYSSES(4), 13, 1, id="w4-ulysses-1+13"),
    pytest.param(4, RING(4), 13, 1, id="w4-ring-1+13"),
    # Ulysses x Ring splits only evenly: 6 text tokens do not divide over 4 (refused per stream before), 6 + 10 do
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, 10, 6, id="w4-ulysses2xring2-6+10"),
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, 15, 1, id="w4-ulysses2xring2-1+15"),
]


def _assert_joint_split(results, config, image_tokens, text_tokens):
    """Each rank's first attention saw exactly its piece of the joint cut (fewer tokens than one process), and
    every attention call issued the collective of its kind over a group of its degree."""
    parts = context_parallel_degree(config)
    cut = joint_cut(text_tokens, image_tokens, parts)
    ordered = sorted(results, key=lambda r: r["rank"])
    reference = ordered[0]["split_reference"]
    assert reference["text_tokens"] == [text_tokens] and reference["image_tokens"] == [image_tokens], reference
    sizes = {"funcol.all_to_all_single": config.get("ulysses_size", 1),
             "funcol.all_gather_tensor": config.get("ring_size", 1)}
    for r in ordered:
        s = r["split"]
        assert s["text_tokens"] == [cut.text_counts()[r["rank"]]], (r["rank"], s)
        assert s["image_tokens"] == [cut.image_counts()[r["rank"]]], (r["rank"], s)
        assert s["tokens"][0] < reference["tokens"][0], (r["rank"], s)
        assert s["attention_calls"] == reference["attention_calls"] > 0, s
        for kind in expected_collectives(config):
            assert s["attention_calls_with"].get(kind, 0) == s["attention_calls"], (kind, s)
            assert sizes[kind] in s["group_sizes"][kind], (kind, s["group_sizes"])


@needs_glm_image
@pytest.mark.parametrize("world,config,image_tokens,text_tokens", LAYOUTS)
def test_joint_cut_matches_one_process(ranks, world, config, image_tokens, text_tokens):
    if (text_tokens + image_tokens) % world and not _has_uneven_path(config):
        pytest.skip(f"{text_tokens + image_tokens} joint tokens over {world} need diffusers' uneven split, which "
                    "this release lacks for this layout (the refusal is tested below)")
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name="glm_image", config=config,
                    seq=image_tokens, text=text_tokens, model_kwargs={"heads": 4})
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0, "detach must restore the model bit for bit"
    assert len({r["shape"] for r in results}) == 1
    _assert_joint_split(results, config, image_tokens, text_tokens)


@needs_glm_image
def test_refusal_names_text_and_image_tokens(ranks):
    """Ulysses x Ring (no uneven split): 1 text token cannot be split per stream, and 1 + 14 = 15 joint tokens do
    not divide over 4: every rank refuses, naming both counts and a length that works."""
    config = {"ulysses_size": 2, "ring_size": 2}
    results = ranks(4, "workers.cp_plans_ours:cp_forward_error", model_name="glm_image", config=config,
                    model_kwargs={"heads": 4}, input_kwargs={"seq": 14, "text": 1})
    for r in results:
        assert r["type"] == "UnsupportedError", r
        assert "1 text (glyph) tokens and 14 image tokens" in r["message"], r["message"]
        assert "multiple of 4 text + image tokens (e.g. 16)" in r["message"], r["message"]
