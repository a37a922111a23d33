"""The code this pgbuild writes into an artifact, made from its source files: the runtime package
and the training code, minified.

The challenge counts every byte of code that trains and evaluates, so both bundles drop
docstrings and comments. The training bundle is the import closure of builder/standalone.py
inside `builder`: what trains, calibrates, quantizes, fits and packs, and nothing of the audit,
verify or the click/rich command line (nor this module: an artifact copies its own code instead,
builder/artifact/code.py).
"""

import ast
import functools
import json
import lzma
from importlib import resources
from pathlib import Path

from builder.artifact.code import Code
from builder.provenance import pgbuild_version
from runtime.artifact import RUNTIME, TRAINING
from runtime.codec import LZMA_FILTERS

ROOT = Path(__file__).resolve().parents[2]
"""The folder holding pgbuild's packages."""
TRAINING_ENTRY = "builder.standalone"


class _DropDocstrings(ast.NodeTransformer):
    """Removes every statement that is a bare string literal (docstrings, field docs)."""

    def _strip(self, node):
        self.generic_visit(node)
        body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                             and isinstance(s.value.value, str))]
        node.body = body or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def minify(source):
    """Source without docstrings or comments (ast.unparse drops comments)."""
    return ast.unparse(_DropDocstrings().visit(ast.parse(source)))


def module_path(name):
    """The source file of a pgbuild module or package, or None if `name` is neither."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(name, package):
    """The modules of `package` that module `name` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if (m == package or m.startswith(package + ".")) and module_path(m)}


def import_closure(entry, package):
    """`entry` and every module of `package` it needs, parent packages included."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        todo += imported_modules(name, package)
    return sorted(seen)


def compress_sources(sources):
    """{module: source} as the raw LZMA stream of its JSON, which the bootstrap decodes."""
    bundle = json.dumps(sources, separators=(",", ":")).encode()
    return lzma.compress(bundle, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def bundle_sources(names):
    return {name: minify(module_path(name).read_text()) for name in names}


def runtime_sources():
    """{module name: minified source} for every module of the runtime package."""
    return bundle_sources(["runtime"] + [f"runtime.{p.stem}" for p in sorted((ROOT / "runtime").glob("*.py"))
                                         if p.stem != "__init__"])


def training_sources():
    """{module name: minified source} of the training code (builder/standalone.py's closure)."""
    return bundle_sources(import_closure(TRAINING_ENTRY, "builder"))


@functools.cache
def installed_code():
    """The code this pgbuild writes (cached: packing builds many candidate artifacts)."""
    template = minify(resources.files("templates").joinpath("bootstrap.py").read_text())
    return Code(pgbuild_version(), template,
                {RUNTIME: compress_sources(runtime_sources()), TRAINING: compress_sources(training_sources())})


def bootstrap_source(manifest_sha256):
    return installed_code().bootstrap(manifest_sha256)

