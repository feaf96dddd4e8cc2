"""AOTInductor packages (pop-export --format aoti), run through torch's package loader.

Weights: the packages hold code only.  weights.bin is memory-mapped once and
each tensor of the manifest's `weights.tensors` index becomes one torch tensor
over those bytes, which both packages receive through load_constants with
user_managed=True: they use the memory where it lies, so the weights are held
once however many graphs (or sessions) there are.

IO: inputs are wrapped where they lie (torch.from_numpy, no copy).  An AOTI
package returns its outputs as fresh tensors; they are copied into the
session's arrays: the logits and the new tokens' K/V slots, a few KB per decode
step, never the cache.

CUDA packages (compiled where torch saw a GPU) need torch with CUDA here too.
The KV buffer and the staging for new K/V are then device tensors (`zeros`),
so the cache never leaves the GPU and the runtime's placement indexes them as
it indexes numpy arrays; token ids and lengths cross to the device each call
(a few bytes), the logits come back to pinned host memory, and CUDA events
time each graph.  TF32 follows BackendOptions.tf32 (torch's global setting).
"""
from pathlib import Path

import numpy as np

from ..errors import PopError
from ..memory import lazy_zeros
from . import BackendOptions

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


def _torch():
    try:
        import torch
    except ImportError:
        raise PopError("AOTInductor artifacts need torch: pip install torch==2.13.0") from None
    return torch


def load_weights(directory, manifest, device="cpu"):
    """{name: tensor} over the memory-mapped weights.bin (copied once to the GPU for CUDA)."""
    torch = _torch()
    path = Path(directory) / manifest.weights.file
    index = manifest.weights.tensors
    if not index:
        raise PopError(f"{path.name} has no tensor index in the manifest (weights.tensors): not an AOTI export")
    raw = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)  # mmap, private
    out = {}
    for t in index:
        if t.offset + t.bytes > raw.numel() or t.dtype not in DTYPES:
            raise PopError(f"{path.name} does not hold {t.name} where the manifest says: corrupt artifacts")
        value = raw[t.offset:t.offset + t.bytes].view(getattr(torch, t.dtype)).reshape(t.shape)
        out[t.name] = value if device == "cpu" else value.to(device)
    return out


class AotiBackend:
    def __init__(self, directory, manifest, options: BackendOptions = BackendOptions()):
        torch = _torch()
        threads = options.threads
        directory = Path(directory)
        devices = {g.device or "cpu" for g in manifest.graphs.values()}
        self.device = devices.pop() if len(devices) == 1 else None
        if self.device not in ("cpu", "cuda"):
            raise PopError(f"these AOTI packages are for {sorted(devices)}: one device, cpu or cuda, is supported")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PopError("these AOTI packages were compiled for CUDA, and torch sees no GPU here: "
                           "re-export with --format aoti on this machine for the CPU")
        versions = {g.torch for g in manifest.graphs.values()} - {None}
        if versions and versions != {torch.__version__}:
            raise PopError(f"these AOTI packages were compiled with torch {versions.pop()}, this is torch "
                           f"{torch.__version__}: AOTInductor packages run only with the torch that built them")
        self.name = "aoti"
        if threads:
            torch.set_num_threads(threads)
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = options.tf32  # the packages' matrix products call cuBLAS
            self._events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._torch = torch
        self.weights = load_weights(directory, manifest, self.device)
        from torch._C._aoti import AOTIModelPackageLoader
        self.loaders, self._inputs, self._outputs = {}, {}, {}
        for graph in manifest.graphs_for(options.modes):
            spec = manifest.graphs[graph]
            path = directory / spec.file
            try:
                loader = AOTIModelPackageLoader(str(path), "model", False, 1, -1)
                wanted = loader.get_constant_fqns()
                missing = [n for n in wanted if n not in self.weights]
                if missing:
                    raise PopError(f"{spec.file} needs {missing[0]}, which weights.bin does not index")
                loader.load_constants({n: self.weights[n] for n in wanted}, False, True, True)
            except PopError:
                raise
            except Exception as e:  # the loader raises RuntimeError for a corrupt or foreign package
                raise PopError(f"{spec.file} cannot be loaded by AOTInductor: {str(e).strip().splitlines()[0]}") from None
            self.loaders[graph] = loader
            self._inputs[graph] = [i.name for i in spec.inputs]
            self._outputs[graph] = [o.name for o in spec.outputs]

    def zeros(self, shape, dtype):
        """The KV buffer and the staging: numpy on the CPU, device tensors for CUDA packages."""
        if self.device == "cpu":
            return lazy_zeros(shape, dtype)  # resident where written only
        return self._torch.zeros(shape, dtype=_torch_dtype(self._torch, dtype), device=self.device)

    def host_zeros(self, shape, dtype):
        """Host arrays the device writes every call (the logits): pinned for CUDA packages."""
        if self.device == "cpu":
            return np.zeros(shape, dtype)
        return self._torch.zeros(shape, dtype=_torch_dtype(self._torch, dtype), pin_memory=True).numpy()

    def _tensor(self, array):
        if not isinstance(array, np.ndarray):  # already a device tensor: a view of the KV buffer
            return array
        t = self._torch.from_numpy(array)
        return t if self.device == "cpu" else t.to(self.device, non_blocking=False)

    def run(self, graph, inputs, outputs):
        """Runs one package over the bound arrays; copies its outputs into them.  Returns the GPU time in ms
        (CUDA events) for CUDA packages, None on the CPU."""
        args = [self._tensor(inputs[name]) for name in self._inputs[graph]]
        if self.device == "cuda":
            self._events[0].record()
        results = self.loaders[graph].run(args)
        for name, value in zip(self._outputs[graph], results):
            if name in outputs:
                target = outputs[name]
                (self._torch.from_numpy(target) if isinstance(target, np.ndarray) else target).copy_(value)
        if self.device == "cpu":
            return None
        self._events[1].record()
        self._events[1].synchronize()
        return self._events[0].elapsed_time(self._events[1])


def _torch_dtype(torch, dtype):
    name = str(np.dtype(dtype))
    return torch.bfloat16 if name == "bfloat16" else getattr(torch, name)
