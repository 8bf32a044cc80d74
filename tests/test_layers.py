"""The layering rules of docs/design.md, checked on the source: every import of every module in src/diffpar, at
module level and inside functions (read with `ast`, nothing is imported).

1. No import cycle among diffpar modules.
2. `diffpar.engines.*` and `diffpar.compat.*` import nothing above them: families, planning, applying, cache,
   api, demo, the test helpers (`diffpar.testing`), or the `diffpar` package itself (its `__init__` imports api).
3. `diffpar.compat.*` imports nothing of `diffpar.engines`; the base layer (errors, config, mesh, plan_types,
   patch, handle, components, cache_config) imports only itself.
4. Outside `diffpar.compat`, no private diffusers/transformers name is imported: an imported name starting with
   `_`, or a module path under diffusers/transformers with a component starting with `_`.
   `diffpar.testing` follows every rule; it may import anything of diffpar (rules 2-3 never name it anyway).

Each failure names the file, the line and the rule.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import diffpar

PACKAGE_DIR = Path(diffpar.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent

# Layers above the engines and compat shims, by module prefix.
ABOVE_ENGINES = ("diffpar.families", "diffpar.planning", "diffpar.applying", "diffpar.cache", "diffpar.api",
                 "diffpar.demo", "diffpar.testing", "diffpar.loading", "diffpar.generate")
BASE = tuple(f"diffpar.{m}" for m in ("errors", "config", "mesh", "plan_types", "patch", "handle", "components",
                                       "cache_config"))
PRIVATE_CHECKED_LIBRARIES = ("diffusers", "transformers")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    path: Path
    line: int
    module: str  # the module imported (for `from m import n`: `m.n` when that is a diffpar module, else `m`)
    names: tuple[str, ...]  # names taken by `from m import ...` (empty for `import m`)
    source_module: str  # `m` as written (resolved if relative)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = all_modules()


def resolve_relative(importer: str, path: Path, level: int, module: str | None) -> str:
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def imports_of(importer: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):  # module level and inside functions/classes alike
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, path, node.lineno, alias.name, (), alias.name))
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = resolve_relative(importer, path, node.level, node.module)
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES]
            if submodules:
                found.extend(Import(importer, path, node.lineno, m, (m.rpartition(".")[2],), source)
                             for m in submodules)
                rest = tuple(n for n in names if f"{source}.{n}" not in MODULES)
                if rest:
                    found.append(Import(importer, path, node.lineno, source, rest, source))
            else:
                found.append(Import(importer, path, node.lineno, source, names, source))
    return found


IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def where(imp: Import) -> str:
    return f"{imp.path.relative_to(REPO_ROOT)}:{imp.line}"


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def diffpar_target(imp: Import) -> str | None:
    """The diffpar module an import loads, or None for another library."""
    if imp.module in MODULES:
        return imp.module
    if within(imp.module, ("diffpar",)):  # a name of a module that does not exist: take its closest package
        parts = imp.module.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        return ".".join(parts) or None
    return None


def layering_violations() -> list[str]:
    problems = []
    for imp in IMPORTS:
        target = diffpar_target(imp)
        if target is None:
            continue
        if within(imp.importer, ("diffpar.engines", "diffpar.compat")) and (
            within(target, ABOVE_ENGINES) or target == "diffpar"
        ):
            problems.append(f"{where(imp)}: {imp.importer} imports {target}: engines and compat never import "
                            "families, planning, applying, cache, api, demo, testing, loading, generate (or the diffpar package)")
        if within(imp.importer, ("diffpar.compat",)) and within(target, ("diffpar.engines",)):
            problems.append(f"{where(imp)}: {imp.importer} imports {target}: compat never imports engines")
        if imp.importer in BASE and target not in BASE:
            problems.append(f"{where(imp)}: {imp.importer} imports {target}: the base layer imports only itself")
    return problems


def is_private_library_import(imp: Import) -> bool:
    if not within(imp.source_module, PRIVATE_CHECKED_LIBRARIES):
        return False
    if any(part.startswith("_") for part in imp.source_module.split(".")):
        return True
    return any(name.startswith("_") for name in imp.names)


def private_name_violations() -> list[str]:
    return [
        f"{where(imp)}: {imp.importer} imports a private name "
        f"({imp.source_module}{' import ' + ', '.join(imp.names) if imp.names else ''}): only diffpar.compat may"
        for imp in IMPORTS
        if is_private_library_import(imp) and not within(imp.importer, ("diffpar.compat",))
    ]


def import_cycles() -> list[str]:
    """Every strongly connected group of diffpar modules (Tarjan), with the imports that close it."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for imp in IMPORTS:
        target = diffpar_target(imp)
        if target is not None and target in MODULES:
            edges[imp.importer].setdefault(target, imp)

    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    counter = [0]

    def visit(node):  # iterative enough for a package of this size
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges[node]:
                groups.append(sorted(group))

    for module in MODULES:
        if module not in index:
            visit(module)

    problems = []
    for group in groups:
        cycle = shortest_cycle(edges, set(group))
        chain = "; ".join(f"{where(imp)} ({imp.importer} -> {diffpar_target(imp)})" for imp in cycle)
        problems.append(f"import cycle among {len(group)} modules {group}, e.g.: {chain}")
    return problems


def shortest_cycle(edges: dict[str, dict[str, Import]], members: set[str]) -> list[Import]:
    """The imports of one shortest cycle within `members` (breadth-first from each member)."""
    best: list[Import] = []
    for start in sorted(members):
        came_from: dict[str, Import] = {}
        frontier = [start]
        while frontier and start not in came_from:
            following = []
            for node in frontier:
                for target, imp in edges[node].items():
                    if target in members and target not in came_from:
                        came_from[target] = imp
                        following.append(target)
            frontier = following
        if start in came_from:
            path, node = [], start
            while True:
                imp = came_from[node]
                path.append(imp)
                node = imp.importer
                if node == start:
                    break
            path.reverse()
            if not best or len(path) < len(best):
                best = path
    return best


def test_the_walk_sees_module_level_and_function_local_imports():
    # A guard for the checker itself: it must see imports inside functions too, and resolve relative ones.
    local = [i for i in IMPORTS if i.importer == "diffpar.engines.context_parallel" and i.module == "diffpar.mesh"]
    assert local, "the function-local `from diffpar.mesh import current_device` was not seen"
    relative = [i for i in IMPORTS if i.importer.startswith("diffpar.compat.") and i.module == "diffpar.compat.versions"]
    assert relative
    assert len(MODULES) > 30


def test_no_import_cycle():
    problems = import_cycles()
    assert not problems, "\n".join(problems)


def test_layers_import_only_downward():
    problems = layering_violations()
    assert not problems, "\n".join(problems)


def test_private_diffusers_and_transformers_names_only_in_compat():
    problems = private_name_violations()
    assert not problems, "\n".join(problems)


def test_the_private_name_rule_flags_what_it_names():
    def imp(source, *names):
        return Import("diffpar.families.x", PACKAGE_DIR / "x.py", 1, source, names, source)

    assert is_private_library_import(imp("diffusers.models._modeling_parallel", "ContextParallelInput"))
    assert is_private_library_import(imp("diffusers.hooks.context_parallel", "_get_submodule_by_name"))
    assert is_private_library_import(imp("transformers.models.t5", "_private"))
    assert not is_private_library_import(imp("diffusers", "ContextParallelConfig"))
    assert not is_private_library_import(imp("diffusers.hooks", "HookRegistry"))
    assert not is_private_library_import(imp("torch._dynamo"))
