"""Architecture families: one small adapter each, chosen by HF architecture name."""
from pop.runtime.errors import PopError

from .gemma3 import Gemma3Adapter
from .gemma3_vl import Gemma3VLAdapter
from .llama import LlamaAdapter
from .qwen3 import Qwen3Adapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS = {arch: cls for cls in (LlamaAdapter, Qwen3Adapter, Gemma3Adapter, Qwen3VLAdapter, Gemma3VLAdapter) for arch in cls.architectures}


def supported() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(architecture):
    if architecture not in ADAPTERS:
        raise PopError(f"unsupported architecture {architecture}; supported: {', '.join(supported())}")
    return ADAPTERS[architecture]


def adapter_for(hf_model):
    return adapter_class(type(hf_model).__name__)(hf_model)
