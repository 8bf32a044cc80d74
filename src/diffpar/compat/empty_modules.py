"""Building one saved component of a pipeline without its weights (parameters on the meta device, buffers real).

diffusers models are built with their public `from_config`; transformers models have no public classmethod that
builds a given class from a config with a dtype and an attention implementation, so its `_from_config` (stable
since transformers 4.x, used by `from_pretrained` itself) is named here, the one place for private names.
"""
from __future__ import annotations

import importlib
import os

import torch


def component_class(library: str, class_name: str):
    """The class `model_index.json` names for a component (e.g. ("transformers", "T5EncoderModel"))."""
    return getattr(importlib.import_module(library), class_name)


def build_empty(cls, directory: str, dtype: torch.dtype | None) -> torch.nn.Module:
    """`cls` built from the config saved in `directory`, under accelerate's `init_empty_weights()`: every
    parameter on meta, every buffer real (non-persistent buffers, e.g. CLIP's position ids, are in no file)."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    with init_empty_weights():
        if issubclass(cls, ModelMixin):
            module = cls.from_config(cls.load_config(directory))
            if dtype is not None:
                _cast_like_from_pretrained(module, dtype)
        elif issubclass(cls, PreTrainedModel):
            config = cls.config_class.from_pretrained(directory)
            # sdpa, as from_pretrained picks when torch has it; dtype as from_pretrained's torch_dtype would give.
            module = cls._from_config(config, attn_implementation="sdpa",
                                      dtype=dtype if dtype is not None else torch.float32)
        else:
            raise TypeError(f"{cls.__name__} in {os.path.basename(directory)} is neither a diffusers nor a "
                            "transformers model")
    return module.eval()


def _cast_like_from_pretrained(module, dtype: torch.dtype) -> None:
    """`dtype` for every floating parameter and buffer, except those diffusers' from_pretrained keeps in float32
    (`_keep_in_fp32_modules`: a tensor whose dotted name has one of them as a component)."""
    keep = module._keep_in_fp32_modules or []
    keep = {keep} if isinstance(keep, str) else set(keep)
    for name, sub in module.named_modules():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        for param in sub.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(target)
        for key, buffer in sub.named_buffers(recurse=False):
            if buffer.is_floating_point():
                sub._buffers[key] = buffer.to(target)
