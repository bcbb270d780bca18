"""The package keeps anomalib's model-folder shape: ``lightning_model.py`` holds the anomalib contract only."""

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_aand"
SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def code_lines(source: str) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in SKIPPED:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def test_code_line_counter() -> None:
    source = '"""Module."""\n\n# comment\ndef f(x):\n    """Doc\n    string."""\n    return (x +\n            1)\n'
    assert code_lines(source) == 3


def test_lightning_model_stays_small() -> None:
    assert code_lines((PACKAGE / "lightning_model.py").read_text()) <= 250


def test_lightning_model_reads_no_hparams_and_has_no_private_helpers() -> None:
    """Settings go into the parts in ``__init__``; helpers live in their own rooms, not as private methods."""
    tree = ast.parse((PACKAGE / "lightning_model.py").read_text())
    reads = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "hparams"
    ]
    assert reads == []
    methods = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert [name for name in methods if name.startswith("_") and not name.startswith("__")] == []
