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
