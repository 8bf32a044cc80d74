"""Every compat shim, with the diffusers releases that need it (feature-detected, checked against the facts)."""
import pytest
import torch

from diffpar.compat import diffusers_cp, versions
from diffpar.testing import tiny_transformers

pytestmark = pytest.mark.compat
D = versions.DIFFUSERS


def test_ring_lse_layout_matches_the_release():
    # 0.36 unsqueezes the op's (B, S, H) LSE itself; 0.37.x needs (B, S, H, 1); 0.38+ accept both.
    expected = "3d" if D < (0, 37) else "4d" if D < (0, 38) else "any"
    assert diffusers_cp.ring_lse_layout() == expected


def test_ring_anything_lse_layout_matches_the_release():
    # ring_anything (0.38+): 0.38/0.39 keep the op's LSE as is from torch 2.9 on (4-D needed); 0.40+ take both.
    expected = None if D < (0, 38) else ("4d" if versions.TORCH >= (2, 9) else "3d") if D < (0, 40) else "any"
    assert diffusers_cp.ring_anything_lse_layout() == expected


def _as_if_torch(version: tuple):
    """diffusers' `is_torch_version(op, v)` answered for another torch release."""
    import operator

    ops = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
    return lambda op, v: ops[op](version, versions._parse(v))


@pytest.mark.parametrize("torch_version, ring_037", [((2, 8, 0), {"3d"}), ((2, 9, 0), {"4d"})])
def test_ring_lse_probe_follows_the_torch_rule_of_037(torch_version, ring_037):
    """The probe reads what the ring does, so it sees 0.37's torch-version rule (PR 12693): under torch < 2.9 the
    ring unsqueezes the op's LSE itself, from 2.9 on it uses it as given. 0.36 always unsqueezes; 0.38+ take both."""
    from diffusers.models import attention_dispatch as ad

    ring = diffusers_cp._with_globals(ad.TemplatedRingAttention.forward, is_torch_version=_as_if_torch(torch_version))
    accepted = {layout for layout in ("3d", "4d") if diffusers_cp._ring_accepts(ring, layout)}
    assert accepted == ({"3d"} if D < (0, 37) else ring_037 if D < (0, 38) else {"3d", "4d"})


def test_forward_op_layout_fits_the_ring_in_use():
    for ring_anything in (False, True):
        layout = diffusers_cp.ring_anything_lse_layout() if ring_anything else diffusers_cp.ring_lse_layout()
        if layout is not None:
            assert diffusers_cp.forward_op_lse_layout(ring_anything) in ({"3d", "4d"} if layout == "any" else {layout})


def test_native_op_refuses_lse_in_every_release_and_the_shim_provides_it():
    from diffusers.models import attention_dispatch as ad

    class Ctx:
        def save_for_backward(self, *t):
            self.saved = t

    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="return_lse"):
        ad._native_attention_forward_op(Ctx(), q, k, v, return_lse=True)
    diffusers_cp.SHARED_SHIMS.acquire()
    try:
        out, lse = ad._native_attention_forward_op(Ctx(), q, k, v, return_lse=True)
    finally:
        diffusers_cp.SHARED_SHIMS.release()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    expected_out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    assert (out - expected_out).abs().max() < 1e-6
    lse = lse.squeeze(-1) if lse.dim() == 4 else lse
    assert (lse - scores.logsumexp(-1).permute(0, 2, 1)).abs().max() < 1e-5
    # The shim is gone again: the module function is diffusers' own.
    assert not hasattr(ad._native_attention_forward_op, "__wrapped__")


def test_cp_attention_masks_from_037():
    assert diffusers_cp.context_parallel_attention_takes_masks() == (D >= (0, 37))


def test_ulysses_with_ring_from_037():
    assert diffusers_cp.supports_ulysses_and_ring() == (D >= (0, 37))


def test_cp_config_fields_by_release():
    fields = diffusers_cp.cp_config_fields()
    assert ("ulysses_anything" in fields) == (D >= (0, 37))
    assert ("ring_anything" in fields) == (D >= (0, 38))


@pytest.mark.skipif(D < (0, 37), reason="0.36 has no uneven gather (no *_anything modes)")
def test_gloo_refuses_diffusers_uneven_gather_and_the_shim_fixes_it(ranks):
    for r in ranks(2, "workers.compat:uneven_gather_without_and_with_shim"):
        assert r["without"] != "ok"  # 0.37+: dist.all_gather with different sizes, which gloo rejects
        assert r["equal_with_shim"]


def _qwenimage_leaves_text_mask_whole() -> bool:
    from diffusers import QwenImageTransformer2DModel

    from diffpar.compat.diffusers_cp_hooks import native_cp_plan

    model, _ = tiny_transformers.build("qwenimage")
    return diffusers_cp.leaves_text_mask_whole(model, native_cp_plan(QwenImageTransformer2DModel))


def test_qwenimage_text_mask_split_with_the_text_except_037_038():
    # 0.37.x/0.38 split the prompt but build the joint mask from the whole prompt mask: padded prompts refused.
    assert _qwenimage_leaves_text_mask_whole() == ((0, 37) <= D < (0, 39))


@pytest.mark.skipif(not ((0, 37) <= D < (0, 39)), reason="only 0.37.x/0.38 keep QwenImage's prompt mask whole")
def test_padded_prompt_refused_where_the_mask_stays_whole(ranks):
    from diffpar.testing import RankFailure

    with pytest.raises(RankFailure) as err:
        ranks(4, "workers.compat:ulysses_anything_mask_without_mask_shim")
    assert "4 rank(s) failed" in str(err.value)
    assert "padded prompt under context parallelism" in str(err.value) and "diffusers>=0.39" in str(err.value)


@pytest.mark.skipif(D < (0, 39), reason="0.36 has no ulysses_anything; 0.37.x/0.38 refuse padded prompts (above)")
def test_ulysses_anything_mask_gather_misplaces_padding_037_to_0421(ranks):
    results = ranks(4, "workers.compat:ulysses_anything_mask_without_mask_shim")
    for r in results:
        assert r["with"] <= 1e-5
        if D <= (0, 42, 1):
            assert r["without"] > 1e-3, "diffusers <= 0.42.1 misplaces mask padding; the shim is what fixes it"


def test_enable_parallelism_fails_on_cpu_from_042(ranks):
    results = ranks(2, "workers.compat:enable_parallelism_on_cpu")
    if D >= (0, 42):
        assert all("ZeroDivisionError" in r for r in results), results
