"""Docs that contradict the code fail here: generated tables, config fields, paths, flags, variables, names."""
import re
from pathlib import Path

import pytest

import diffpar
from diffpar.testing import support_table
from diffpar.testing.coverage import FIRST_CASES

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _text(path):
    return path.read_text()


def _generated_release(block: str) -> str:
    match = re.search(r"diffusers (\d+\.\d+\.\d+)", block)
    assert match, block[:300]
    return match.group(1)


@pytest.mark.parametrize("path,start,end,make", [
    pytest.param("docs/models.md", support_table.MODELS_START, support_table.MODELS_END, support_table.models_table,
                 id="models"),
    pytest.param("README.md", support_table.README_START, support_table.README_END, support_table.readme_table,
                 id="readme"),
])
def test_generated_tables_match_the_code(path, start, end, make):
    import diffusers

    block = support_table.generated_block(_text(ROOT / path), start, end)
    release = _generated_release(block)
    if release != diffusers.__version__:
        pytest.skip(f"{path}'s table was generated on diffusers {release}; this is {diffusers.__version__}")
    assert block == make(), (f"{path} is out of date: run `python -m diffpar.testing.support_table --write` "
                             "and commit the result")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.builder) for c in FIRST_CASES])
def test_first_cases_are_what_their_suites_run(case):
    """The table's claims for the first families match the parameters of the files that test them."""
    suite = _text(ROOT / case.suite)
    assert f'"{case.builder}"' in suite, (case.suite, case.builder)
    for layout in case.cp:
        assert f'id="{layout}"' in suite, (case.suite, layout)
    tp_suite = _text(ROOT / "tests/test_transformer_tp.py")
    for layout in case.tp:
        if layout == "w4-ulysses2xtp2":
            assert re.search(rf'"{case.builder}", \{{"ulysses_size": 2, "tp_size": 2}}', tp_suite), case.builder
        else:
            assert re.search(rf'pytest.param\("{case.builder}", ', tp_suite), case.builder


def _config_keywords(text: str) -> set[str]:
    """Keyword names given to ParallelismConfig(...) and keys of parallel_kwargs={...} in code snippets."""
    names = set()
    for call in re.finditer(r"ParallelismConfig\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
        names.update(re.findall(r"\b([a-z_]+)\s*=(?!=)", call.group(1)))
    for kwargs in re.finditer(r"parallel_kwargs=\{([^}]*)\}", text):
        names.update(re.findall(r"[\"']([a-z_]+)[\"']\s*:", kwargs.group(1)))
    return names


def test_config_fields_in_docs_exist_and_every_field_is_documented():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(diffpar.ParallelismConfig)}
    all_text = "\n".join(_text(p) for p in DOCS)
    unknown = {}
    for path in DOCS:
        bad = _config_keywords(_text(path)) - fields
        if bad:
            unknown[path.name] = sorted(bad)
    assert not unknown, f"docs pass ParallelismConfig arguments that do not exist: {unknown}"
    undocumented = sorted(f for f in fields - {"parallel_kwargs"} if f"`{f}" not in all_text and f"{f}=" not in all_text)
    assert not undocumented, f"ParallelismConfig fields no doc mentions: {undocumented}"


_PATH = re.compile(r"(?<![\w/.-])((?:src/diffpar|tests|benchmarks|docs|families|engines|compat|testing)/[\w/.*-]+\.(?:py|md))")


def test_paths_in_docs_exist():
    missing = {}
    for path in DOCS:
        for ref in set(_PATH.findall(_text(path))):
            if "*" in ref or "<" in ref:
                continue
            candidates = [ROOT / ref, ROOT / "src/diffpar" / ref]
            if not any(c.exists() for c in candidates):
                missing.setdefault(path.name, []).append(ref)
    assert not missing, f"docs name files that do not exist: {missing}"


def test_environment_variables_in_docs_are_read_by_the_code():
    source = "\n".join(p.read_text() for p in (ROOT / "src/diffpar").rglob("*.py"))
    named = {v for p in DOCS for v in re.findall(r"\bDIFFPAR_[A-Z0-9_]+", _text(p))}
    unread = sorted(v for v in named if v not in source)
    assert not unread, f"docs name environment variables the code never reads: {unread}"


def test_generate_flags_in_docs_exist():
    from diffpar import generate

    parser = generate.build_parser() if hasattr(generate, "build_parser") else None
    if parser is None:
        import argparse
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
            generate.parse_args(["--help"])
        known = set(re.findall(r"(--[a-z][a-z0-9-]*)", out.getvalue()))
    else:
        known = {o for a in parser._actions for o in a.option_strings}
    unknown = {}
    for path in (ROOT / "docs/generate.md", ROOT / "README.md"):
        for line in _text(path).splitlines():
            if "diffpar.generate" not in line and not line.lstrip().startswith(("--", "|", "`--")):
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", line):
                if flag not in known and flag not in ("--nproc_per_node", "--nnodes", "--standalone"):
                    unknown.setdefault(path.name, set()).add(flag)
    assert not unknown, f"docs show diffpar.generate flags it does not have: {unknown}"


def test_public_names_in_docs_exist():
    missing = set()
    for path in DOCS:
        for name in re.findall(r"\bdiffpar\.([a-zA-Z_][a-zA-Z0-9_]*)\(", _text(path)):
            if not hasattr(diffpar, name):
                missing.add(f"{path.name}: diffpar.{name}")
    assert not missing, sorted(missing)


def test_pipelines_the_table_claims_are_in_their_test_files():
    from diffpar.testing.coverage import PIPELINES_TESTED

    source = {}
    for path in list((ROOT / "tests").rglob("*.py")) + list((ROOT / "src/diffpar/testing").rglob("*.py")):
        source[path] = path.read_text()
    everything = "\n".join(source.values())
    for cls, pipelines in PIPELINES_TESTED.items():
        for pipeline, test_file in pipelines.items():
            assert (ROOT / test_file).exists(), (cls, pipeline, test_file)
            assert pipeline in everything, f"{pipeline} ({cls}) is named by no test or builder"
