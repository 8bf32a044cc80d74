"""Whether the installed diffusers offers a class. `hasattr(diffusers, name)` imports the class's module lazily and
raises when that module fails to import on this release (diffusers 0.36's Hunyuan-DiT pipeline asks transformers
for `MT5Tokenizer`, which transformers 5 no longer has): such a class counts as absent, and its tests skip."""
import diffusers


def diffusers_has(name: str) -> bool:
    try:
        getattr(diffusers, name)
    except AttributeError:
        return False
    except (ImportError, RuntimeError):  # present in this release, but its module does not import here
        return False
    return True


def needs(name: str):
    """A test mark: skip where this diffusers release does not offer class `name` (see `diffusers_has`)."""
    import pytest

    return pytest.mark.skipif(not diffusers_has(name), reason=f"diffusers {diffusers.__version__} has no {name}")


def _uneven_split_missing() -> bool:
    from diffpar.compat.diffusers_cp import uneven_split_option

    return uneven_split_option(2, 1) is None


def needs_uneven_split():
    """A test mark for odd prompt / token counts on 2 ranks: they need diffusers' uneven Ulysses split (0.37+). On a
    release without it (0.36) every rank refuses them clearly, which tests/test_any_input.py asserts."""
    import pytest

    return pytest.mark.skipif(_uneven_split_missing(),
                              reason="odd lengths need diffusers' uneven Ulysses split (0.37+); 0.36 refuses them")
