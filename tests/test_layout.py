"""The layout's rules, read from the source: the runtime imports nothing of pgbuild's builder and
no third-party package beyond what an artifact may use; no import circle anywhere; no module
grown past what one reader holds in their head; the README's Layout section names every package."""

import ast
import re
import sys

from conftest import ROOT

PACKAGES = ("builder", "runtime", "templates")
# flash_attn (FA2) and flash_attn_interface (FA3): optional, used only when installed (SDPA otherwise).
RUNTIME_MAY_IMPORT = {"torch", "numpy", "sentencepiece", "brotli", "flash_attn", "flash_attn_interface"}
MAX_LINES = 400


def modules():
    """{dotted module name: path} of every module in the shipped packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name, path):
    """Every module `name` imports, at any depth of its code (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def graph():
    mods = modules()
    return {name: sorted(m for m in imports(name, path) if m in mods and m != name) for name, path in mods.items()}


def cycle(edges):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in edges:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_module_imports_itself_back_through_others():
    assert cycle(graph()) is None


def test_packages_are_modules_not_parents_of_circles():
    edges = graph()
    # A package's __init__ holds only its docstring: importing a subpackage pulls in nothing else.
    for package in (name for name, path in modules().items() if path.name == "__init__.py"):
        assert edges[package] == [], package


def test_the_runtime_never_imports_builder_or_extra_packages():
    stdlib = set(sys.stdlib_module_names)
    for name, path in modules().items():
        if not name.startswith("runtime"):
            continue
        for imported in imports(name, path):
            top = imported.split(".")[0]
            assert top in stdlib | RUNTIME_MAY_IMPORT | {"runtime"}, f"{name} imports {imported}"


def test_no_module_is_longer_than_one_reading():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"


def test_the_readme_layout_names_every_package():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    listed = set(re.findall(r"^\s*((?:builder|runtime|templates)(?:/\w+)*)/", layout, flags=re.M))
    packages = {str(path.parent.relative_to(ROOT)) for name, path in modules().items() if path.name == "__init__.py"}
    assert listed == packages


def test_the_training_code_an_artifact_carries_needs_only_what_the_runtime_may_import():
    """builder/standalone.py's closure ships inside every artifact and runs where pgbuild is not
    installed: no click, rich or matplotlib, and none of the audit, verify or command line."""
    from builder.artifact.sources import TRAINING_ENTRY, import_closure

    mods = modules()
    bundle = import_closure(TRAINING_ENTRY, "builder")
    assert {"builder.train.trainer", "builder.pipeline", "builder.artifact.pack", "builder.quant.policy"} <= set(bundle)
    stdlib = set(sys.stdlib_module_names)
    for name in bundle:
        assert not name.startswith(("builder.commands", "builder.judge", "builder.artifact.audit",
                                    "builder.artifact.sources")), name
        for imported in imports(name, mods[name]):
            top = imported.split(".")[0]
            # Triton comes with CUDA builds of torch; the trainer takes its kernels only where it imports.
            assert top in stdlib | RUNTIME_MAY_IMPORT | {"runtime", "builder", "triton"}, f"{name} imports {imported}"
            if top == "builder" and imported in mods:
                assert imported in bundle, f"{name} imports {imported}, which the bundle lacks"
