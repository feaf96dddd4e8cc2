"""The house rules that a reader cannot see from one file: imports point one way, nothing reaches
into another module's private names, and the manifest is read through its types only.

Read from the source with ast (imports inside functions count too), so a violation fails here
whether or not the line ever runs.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"exporter": "pop.exporter", "runtime": "pop.runtime", "quality": "pop.quality", "bench": "pop.bench",
            "serve": "pop.serve", "cli": "pop.cli"}  # the mapping pyproject.toml declares

# Lowest first.  A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("contract", ("pop.runtime.errors", "pop.runtime.manifest")),
    ("families", ("pop.exporter.families",)),
    ("POP graphs", ("pop.exporter.pop", "pop.exporter.ops")),
    ("runtime", ("pop.runtime",)),
    ("exporter", ("pop.exporter",)),
    ("tools", ("pop.quality", "pop.bench", "pop.serve")),
    ("commands", ("pop.cli",)),
]


def layer_of(module):
    best = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[2]):
                best = (rank, name, len(p))
    return best[:2] if best else None


def modules():
    """{module name: (path, ast)} of every pop module."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *[p for p in parts if p != "__init__"]])
            out[name] = (path, ast.parse(path.read_text()), path.name == "__init__.py")
    return out


def imports(name, tree, is_package):
    """(imported module, imported names, line) of every import in a module, relative ones resolved."""
    here = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else node.module
            yield target, [a.name for a in node.names], node.lineno


def test_imports_point_one_way():
    found = modules()
    wrong = []
    for name, (path, tree, is_package) in found.items():
        mine = layer_of(name)
        for target, names, line in imports(name, tree, is_package):
            # `from pop.x import y` may name a module y: judge the deepest pop module named
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in found] or [target]
            for t in targets:
                theirs = layer_of(t) if t.startswith("pop.") else None
                if theirs and theirs[0] > mine[0]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} ({mine[1]}) imports {t} ({theirs[1]})")
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_no_import_cycle_between_packages():
    """Beyond the layers: within one layer (quality and bench), the package graph has no cycle either."""
    found = modules()
    edges = {}
    for name, (_, tree, is_package) in found.items():
        for target, _, _ in imports(name, tree, is_package):
            a, b = ".".join(name.split(".")[:2]), ".".join(target.split(".")[:2])
            if b.startswith("pop.") and a != b:
                edges.setdefault(a, set()).add(b)
    for a, targets in edges.items():
        for b in targets:
            assert a not in edges.get(b, set()), f"{a} and {b} import each other"


def test_no_private_names_across_modules():
    found = modules()
    wrong = []
    for name, (path, tree, is_package) in found.items():
        aliases = {}
        for target, names, line in imports(name, tree, is_package):
            if not target.startswith("pop."):
                continue
            wrong += [f"{path.relative_to(ROOT)}:{line}: imports {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and (node.level or node.module.startswith("pop")):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_manifest_json_is_read_in_one_place():
    """Nothing but pop.runtime.manifest indexes pop_manifest.json: everyone else uses the typed tree."""
    wrong = []
    for name, (path, tree, _) in modules().items():
        if name == "pop.runtime.manifest":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Name, ast.Attribute)):
                target = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                if target in ("manifest", "man") and isinstance(node.slice, ast.Constant):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target}[{node.slice.value!r}]")
    assert not wrong, "\n".join(wrong)


def test_family_quirks_stay_in_their_adapters():
    """No branch on a family or model type outside exporter/families/ and runtime/vision/: a quirk is an
    adapter method or a manifest field."""
    import re
    families = "|".join(("llama", "qwen3", "qwen3_vl", "gemma3", "gemma3_vl", "smollm"))
    branch = re.compile(rf"""(==|!=|\bin\b)\s*[(\[]?\s*["'][^"']*({families})[^"']*["']|model_type\s*(==|!=|\bin\b)|"""
                        r"__name__\.startswith\(", re.IGNORECASE)
    wrong = []
    for name, (path, _, _) in modules().items():
        if name.startswith(("pop.exporter.families", "pop.runtime.vision")):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if branch.search(line.split("#", 1)[0]):
                wrong.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not wrong, "\n".join(wrong)
