"""The embedded default corpus: the Python standard library of the running interpreter.

Two kinds of seq2seq pairs, built with ``ast`` (no download):
  * ``module``:   module skeleton (docstring, imports, class/def signatures and docstrings,
                  bodies replaced by ``...``) -> the full module source;
  * ``function``: function signature + docstring -> the full function source.
The split (train / validation / test) is decided by a hash of the module name, so every
pair of one module lands in the same split on every machine.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
import textwrap
from collections import Counter
from pathlib import Path

from .splits import SplitWriter, hash_bucket

log = logging.getLogger(__name__)

VERSION = "code-2"  # bump when the pairs change, so that prepare_data rebuilds old copies
EXCLUDED_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                  "__phello__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib source file, tests and idlelib excluded.

    When root is itself a package (has __init__.py), names keep its name as prefix.
    """
    base = root.parent if (root / "__init__.py").exists() else root
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(base)
        if EXCLUDED_PARTS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        name = ".".join(rel.with_suffix("").parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def split_of(module: str, fractions: tuple[float, float] = (0.9, 0.05)) -> str:
    """Deterministic split from the module name's hash."""
    bucket = hash_bucket(module)
    if bucket < fractions[0]:
        return "train"
    if bucket < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _docstring_body(node: ast.AST) -> list[ast.stmt]:
    doc = ast.get_docstring(node, clean=False)
    body: list[ast.stmt] = [ast.Expr(ast.Constant(doc))] if doc is not None else []
    return body


class _Skeleton(ast.NodeTransformer):
    """Keeps signatures and docstrings; every function body becomes ``...``."""

    def _function(self, node):
        node.body = [*_docstring_body(node), ast.Expr(ast.Constant(...))]
        return node

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef):
        kept = [self.visit(n) for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        node.body = [*_docstring_body(node), *kept] or [ast.Expr(ast.Constant(...))]
        return node


def module_skeleton(tree: ast.Module) -> str:
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    body = [*_docstring_body(tree), *(n for n in tree.body if isinstance(n, keep))]
    skeleton = _Skeleton().visit(ast.Module(body=body, type_ignores=[]))
    return ast.unparse(ast.fix_missing_locations(skeleton))


def function_pairs(tree: ast.Module, source: str) -> list[tuple[str, str]]:
    """(signature + docstring, full function) for every documented function or method."""
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in ast.walk(tree):
        if (not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                or ast.get_docstring(node) is None):
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        full = textwrap.dedent("".join(lines[first - 1 : node.end_lineno])).rstrip() + "\n"
        try:  # a method whose strings are less indented than its body does not dedent cleanly
            stub = ast.unparse(_Skeleton().visit(ast.parse(full)))
        except SyntaxError:
            continue
        pairs.append((stub, full))
    return pairs


def build_code_corpus(out_dir: str | Path, root: str | Path | None = None) -> dict[str, int]:
    """Write {train,validation,test}.jsonl under out_dir; returns row counts per split.

    Files that are not UTF-8 or do not parse are skipped with a count in the log.
    """
    root = Path(root) if root is not None else stdlib_root()
    skipped: Counter[str] = Counter()
    with SplitWriter(out_dir) as writer:
        for module, path in module_files(root):
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except UnicodeDecodeError:
                skipped["not utf-8"] += 1
                continue
            except (SyntaxError, ValueError):
                skipped["does not parse"] += 1
                continue
            if not source.strip():
                skipped["empty"] += 1
                continue
            skeleton = module_skeleton(tree)
            # A module of plain statements has an empty skeleton: no pair to learn from.
            rows = [("module", skeleton, source)] if skeleton.strip() else []
            rows += [("function", src, trg) for src, trg in function_pairs(tree, source)]
            for i, (kind, src, trg) in enumerate(rows):
                row = {"id": f"{module}:{i}", "kind": kind, "module": module, "src": src,
                       "trg": trg}
                writer.write(split_of(module), row)
    if skipped:
        log.warning("code corpus: skipped files %s", dict(skipped))
    return writer.counts
