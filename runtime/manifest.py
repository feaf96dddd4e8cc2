"""pop_manifest.json: the one contract between the exporter and every runtime.

Written by pop.exporter, read here; a C++ runtime reads the same file.  The
schema is documented in docs/MANIFEST.md.  Bump SCHEMA_VERSION on any change
that an existing runtime would misread.
"""
import json
import os
from pathlib import Path

import numpy as np

from .errors import PopError

FILE = "pop_manifest.json"
FORMAT = "pop-manifest"
SCHEMA_VERSION = 3  # 2: optional "vision" section and a vision graph; tokenizer.chat_template
# 3: a graph may be an AOTInductor package (format "aoti", its device, weights.tensors), which a
#    version-2 runtime would hand to ONNX Runtime
READABLE = (1, 2, 3)  # a version-1 manifest is a text model's version 2; a version-2 one is ONNX-only 3

REQUIRED = ("format", "schema_version", "model", "pop", "dtype", "max_seq_len", "kv_cache",
            "graphs", "weights", "tokenizer", "generation", "provenance")


def np_dtype(name):
    """The numpy dtype of a manifest dtype name; bfloat16 comes from ml_dtypes (an onnx dependency)."""
    if str(name) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def write(directory: Path, manifest: dict) -> Path:
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **manifest}
    path = Path(directory) / FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load(directory) -> dict:
    directory = Path(directory)
    path = directory / FILE
    if not directory.is_dir():
        raise PopError(f"{directory} is not a folder of pop artifacts")
    if not path.is_file():
        raise PopError(f"{path} is missing: not a complete pop export (re-run pop-export)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PopError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PopError(f"{path} is not a pop manifest")
    version = manifest.get("schema_version")
    if version not in READABLE:
        raise PopError(f"{path} has manifest schema version {version}; this runtime reads versions "
                       f"{', '.join(map(str, READABLE))}: re-export with this version of pop")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise PopError(f"{path} is missing fields: {', '.join(missing)}")
    for rel in [g["file"] for g in manifest["graphs"].values()] + [manifest["weights"]["file"],
                                                                   manifest["tokenizer"]["file"]]:
        f = directory / rel
        if not f.is_file():
            raise PopError(f"{f} is missing: the artifact folder is incomplete")
    size = (directory / manifest["weights"]["file"]).stat().st_size
    if size != manifest["weights"]["bytes"]:
        raise PopError(f"{manifest['weights']['file']} has {size} bytes, the manifest says "
                       f"{manifest['weights']['bytes']}: corrupt or mismatched artifacts")
    return manifest
