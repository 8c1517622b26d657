"""The docs stand alone and keep up with the code (after datasette's tests/test_docs.py).

- README.md and docs/*.md link only inside the repository, and only to files that exist.
- Every error code the appliance raises, and every WebSocket close code it sends, appears in
  docs/api.md. Both are read from the source (its syntax tree), not from a list kept here, so a
  new code fails this test until it is documented.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "appliance"
API_DOC = ROOT / "docs" / "api.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and [text]: target, outside code spans and blocks; <http…> autolinks need no check.
_INLINE = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_EXTERNAL = ("http://", "https://", "mailto:")

# The 401/403 classes take the error code first, as `reason` (it is also the metric's label).
_REASON_FIRST = {"Unauthorized": 0, "Forbidden": 0, "Refused": 0}
_SNAKE = re.compile(r"^[a-z][a-z0-9_]*\Z")


def _links(path: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", path.read_text()))
    return _INLINE.findall(text) + _REFERENCE.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_link_only_to_files_of_this_repository(doc: Path) -> None:
    bad = []
    for target in _links(doc):
        if target.startswith(_EXTERNAL) or target.startswith("#"):
            continue
        if "://" in target:
            bad.append(f"{target}: not a link a reader can follow")
            continue
        relative = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (doc.parent / relative).resolve()
        if not resolved.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif not resolved.exists():
            bad.append(f"{target}: no such file")
    assert bad == [], f"{doc.relative_to(ROOT)} links: {bad}"


def test_link_check_catches_what_it_should(tmp_path: Path) -> None:
    """The link pattern finds inline and reference links, and ignores code."""
    doc = tmp_path / "x.md"
    doc.write_text(
        'See [design](../shared/DESIGN.md) and [api](docs/api.md#who "t").\n'
        "[ref]: ./missing.md\n"
        "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n"
    )
    assert _links(doc) == ["../shared/DESIGN.md", "docs/api.md#who", "./missing.md"]


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _code_positions() -> dict[str, int]:
    """Callable name → position of its `code` parameter, for every function, method and class
    (through `__init__`) of the package that takes one: error_frame, error_body, a helper that
    ends a subscription with a code, … ."""
    positions = dict(_REASON_FIRST)
    for _, tree in _sources():
        for node in ast.walk(tree):
            function: ast.FunctionDef | ast.AsyncFunctionDef | None = None
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                function = node
            elif isinstance(node, ast.ClassDef):
                inits = [f for f in node.body if isinstance(f, ast.FunctionDef)]
                function = next((f for f in inits if f.name == "__init__"), None)
            if function is None:
                continue
            names = [a.arg for a in function.args.args if a.arg not in ("self", "cls")]
            if "code" in names:
                positions.setdefault(node.name, names.index("code"))
    return positions


def error_codes() -> dict[str, str]:
    """code → where it is raised, from every place the source names an error code."""
    found: dict[str, str] = {}
    positions = _code_positions()

    def add(code: str | None, path: Path, node: ast.AST) -> None:
        if code is not None and _SNAKE.match(code):
            found.setdefault(code, f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}")

    for path, tree in _sources():
        for node in ast.walk(tree):
            # class SomeError(ApplianceError): code = "…"
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.Assign) and [_name(t) for t in item.targets] == [
                        "code"
                    ]:
                        add(_str(item.value), path, item)
            elif isinstance(node, ast.Call):
                # Unauthorized("key_revoked", …), error_frame("already_subscribed", …),
                # error_response(400, "invalid", …), self._end("seq_reset", …)
                at = positions.get(_name(node.func))
                if at is not None and at < len(node.args):
                    add(_str(node.args[at]), path, node)
                # ApplianceError(…, code="already_subscribed")
                for keyword in node.keywords:
                    if keyword.arg == "code":
                        add(_str(keyword.value), path, node)
            # Reason tables: (jwt.ExpiredSignatureError, "token_expired", "the token has expired")
            elif isinstance(node, ast.Tuple) and len(node.elts) == 3:
                kind, code, message = node.elts
                if isinstance(kind, ast.Name | ast.Attribute) and _str(message) is not None:
                    add(_str(code), path, node)
            # The status → code table of the HTTP error mapping ({404: "not_found", …}).
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    status = key.value if isinstance(key, ast.Constant) else None
                    if type(status) is int and 400 <= status <= 599:
                        add(_str(value), path, node)
    return found


def close_codes() -> dict[int, str]:
    """WebSocket close code → where: constants named `*CLOSE*` (or in a class named so, such as
    an IntEnum `CloseCode`) and the numbers given to any `close` call."""
    found: dict[int, str] = {}
    for path, tree in _sources():
        in_close_class = {
            id(item)
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and "close" in node.name.lower()
            for item in node.body
        }
        for node in ast.walk(tree):
            numbers: list[ast.AST] = []
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                named = any("close" in _name(t).lower() for t in targets)
                if (named or id(node) in in_close_class) and node.value is not None:
                    numbers = [node.value]
            elif isinstance(node, ast.Call) and _name(node.func).lower().endswith("close"):
                numbers = [*node.args, *(k.value for k in node.keywords)]
            for expr in numbers:
                for leaf in ast.walk(expr):
                    number = leaf.value if isinstance(leaf, ast.Constant) else None
                    if type(number) is int and 1000 <= number <= 4999:
                        found.setdefault(number, f"{path.relative_to(ROOT)}:{leaf.lineno}")
    return found


# Codes that never reach a client of the API, with the reason.
NOT_API = {"config": "configuration problems are reported by the CLI and at start, never over HTTP"}


def test_the_code_scan_finds_what_it_should() -> None:
    """Guards the scan itself: codes of each kind of definition are found."""
    codes = error_codes()
    for code in ("invalid", "key_revoked", "token_expired", "not_member", "already_subscribed",
                 "resume_too_old", "seq_reset", "method_not_allowed"):  # fmt: skip
        assert code in codes, code
    closes = close_codes()
    for code in (4001, 4003, 4008, 1013, 1011, 1001):
        assert code in closes, code


def test_every_error_code_is_in_the_api_doc() -> None:
    doc = API_DOC.read_text()
    missing = {
        code: where
        for code, where in error_codes().items()
        if code not in NOT_API and f"`{code}`" not in doc
    }
    assert missing == {}, f"error codes raised but not documented in docs/api.md: {missing}"


def test_every_close_code_is_in_the_api_doc() -> None:
    doc = API_DOC.read_text()
    missing = {
        code: where
        for code, where in close_codes().items()
        if not re.search(rf"\*\*{code}\*\*|\b{code}\b", doc)
    }
    assert missing == {}, f"WebSocket close codes sent but not documented in docs/api.md: {missing}"
