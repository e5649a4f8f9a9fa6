"""A small read-only model of Bicep files, built on tree-sitter-bicep.

There is no Bicep compiler here (no network to fetch it), so the offline checks parse the files
with tree-sitter and evaluate the few expression forms the checks need: literals, objects and
arrays, references to params and vars, `loadJsonContent`, member access, `string()`, `union()`
and `empty(x) ? a : b`. Anything else evaluates to an `Expr` (its source text), which a check
must treat as "unknown", never as a value.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field

import tree_sitter
import tree_sitter_bicep

_LANGUAGE = tree_sitter.Language(tree_sitter_bicep.language())
_PARSER = tree_sitter.Parser(_LANGUAGE)


@dataclass(frozen=True)
class Expr:
    """An expression the model does not evaluate (a runtime value)."""

    text: str


@dataclass(frozen=True)
class OneOf:
    """A value that is one of a few literals (`cond ? 'a' : 'b'` with a runtime condition)."""

    values: tuple


@dataclass
class Param:
    name: str
    type: str
    default: object  # evaluated default, Expr, or NO_DEFAULT
    decorators: dict = field(default_factory=dict)  # name -> list of evaluated arguments


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT = _NoDefault()


@dataclass(frozen=True)
class ParamRef:
    """A value that is a template parameter (possibly wrapped in string())."""

    param: Param
    stringified: bool = False


@dataclass
class Declaration:
    kind: str  # 'resource' | 'module'
    symbol: str
    target: str  # resource type@version, or module path
    existing: bool
    condition: object  # node text of `if (...)`, or None
    body: object  # tree-sitter object node


def parse(source: bytes):
    return _PARSER.parse(source)


def syntax_problems(source: bytes) -> list[str]:
    """Every ERROR or MISSING node, as `line:col kind: text`."""
    tree = parse(source)
    out: list[str] = []

    def walk(node):
        if node.is_error or node.is_missing:
            text = source[node.start_byte : node.end_byte].decode(errors="replace")
            kind = "MISSING" if node.is_missing else "ERROR"
            line, col = node.start_point
            out.append(f"{line + 1}:{col + 1} {kind}: {text[:60]!r}")
            if node.is_error:
                return
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    if tree.root_node.has_error and not out:
        out.append("parse tree has errors")
    return out


_ESCAPES = {"\\'": "'", "\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\$": "$"}


class BicepFile:
    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.src = self.path.read_bytes()
        self.tree = parse(self.src)
        problems = syntax_problems(self.src)
        if problems:
            raise ValueError(f"{self.path}: syntax errors: {problems}")
        self.params: dict[str, Param] = {}
        self.vars: dict[str, object] = {}  # name -> node
        self.declarations: list[Declaration] = []
        self.outputs: dict[str, object] = {}
        self.target_scope = "resourceGroup"
        self._read()

    # -- reading -------------------------------------------------------------------------------

    def text(self, node) -> str:
        return self.src[node.start_byte : node.end_byte].decode()

    def _read(self):
        pending_decorators: dict = {}
        for node in self.tree.root_node.named_children:
            if node.type == "decorators":
                pending_decorators = {}
                for dec in node.named_children:
                    call = dec.named_children[0]
                    if call.type == "call_expression":
                        name = self.text(call.child_by_field_name("function"))
                        args = call.child_by_field_name("arguments")
                        pending_decorators[name] = [self.eval(a) for a in args.named_children]
                    else:
                        pending_decorators[self.text(call)] = []
                continue
            decorators, pending_decorators = pending_decorators, {}
            if node.type == "parameter_declaration":
                kids = node.named_children
                name = self.text(kids[0])
                ptype = self.text(kids[1])
                default = self.eval(kids[2]) if len(kids) > 2 else NO_DEFAULT
                self.params[name] = Param(name, ptype, default, decorators)
            elif node.type == "variable_declaration":
                kids = node.named_children
                self.vars[self.text(kids[0])] = kids[-1]
            elif node.type in ("resource_declaration", "module_declaration"):
                kids = node.named_children
                symbol = self.text(kids[0])
                target = self.eval(kids[1])
                existing = any(
                    c.type == "existing" or self.text(c) == "existing" for c in node.children
                )
                body = kids[-1]
                condition = None
                if body.type == "if_statement":
                    condition = self.text(body.named_children[0])
                    body = body.named_children[-1]
                if body.type == "for_statement":
                    body = body.named_children[-1]
                self.declarations.append(
                    Declaration(
                        "resource" if node.type == "resource_declaration" else "module",
                        symbol,
                        target,
                        existing,
                        condition,
                        body,
                    )
                )
            elif node.type == "output_declaration":
                kids = node.named_children
                self.outputs[self.text(kids[0])] = kids[-1]
            elif node.type == "target_scope_assignment":
                self.target_scope = self.eval(node.named_children[-1])

    # -- evaluation ----------------------------------------------------------------------------

    def eval(self, node, depth: int = 0):
        if depth > 50:
            return Expr(self.text(node))
        t = node.type
        if t == "string":
            parts = []
            for c in node.named_children:
                if c.type == "string_content":
                    parts.append(self.text(c))
                elif c.type == "escape_sequence":
                    raw = self.text(c)
                    parts.append(_ESCAPES.get(raw, raw))
                else:
                    return Expr(self.text(node))
            if not node.named_children:
                return ""
            return "".join(parts)
        if t == "multiline_string":
            return self.text(node)[3:-3]
        if t == "number":
            return int(self.text(node))
        if t == "boolean":
            return self.text(node) == "true"
        if t == "null":
            return None
        if t == "array":
            return [self.eval(c, depth + 1) for c in node.named_children]
        if t == "object":
            return {k: self.eval(v, depth + 1) for k, v in self.object_nodes(node).items()}
        if t == "ternary_expression":
            cond = self.eval(node.child_by_field_name("condition"), depth + 1)
            yes = self.eval(node.child_by_field_name("consequence"), depth + 1)
            no = self.eval(node.child_by_field_name("alternative"), depth + 1)
            if isinstance(cond, bool):
                return yes if cond else no
            if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in (yes, no)):
                return OneOf((yes, no))
            return Expr(self.text(node))
        if t == "parenthesized_expression":
            return self.eval(node.named_children[0], depth + 1)
        if t == "identifier":
            name = self.text(node)
            if name in ("true", "false"):
                return name == "true"
            if name in self.params:
                return ParamRef(self.params[name])
            if name in self.vars:
                return self.eval(self.vars[name], depth + 1)
            return Expr(name)
        if t == "member_expression":
            obj = self.eval(node.child_by_field_name("object"), depth + 1)
            prop = self.text(node.child_by_field_name("property"))
            if isinstance(obj, dict) and prop in obj:
                return obj[prop]
            return Expr(self.text(node))
        if t == "call_expression":
            fn = self.text(node.child_by_field_name("function"))
            args = [self.eval(a, depth + 1) for a in node.child_by_field_name("arguments").named_children]
            if fn == "loadJsonContent" and len(args) == 1 and isinstance(args[0], str):
                return json.loads((self.path.parent / args[0]).read_text())
            if fn == "string" and len(args) == 1:
                if isinstance(args[0], ParamRef):
                    return ParamRef(args[0].param, stringified=True)
                if isinstance(args[0], bool):
                    return "true" if args[0] else "false"
                if isinstance(args[0], (int, str)):
                    return str(args[0])
            if fn == "union" and args and all(isinstance(a, dict) for a in args):
                merged: dict = {}
                for a in args:
                    merged.update(a)
                return merged
            return Expr(self.text(node))
        return Expr(self.text(node))

    def object_nodes(self, node) -> dict:
        """The properties of an object node: key -> value node."""
        out = {}
        for prop in node.named_children:
            if prop.type != "object_property":
                continue
            kids = prop.named_children
            key = self.eval(kids[0]) if kids[0].type == "string" else self.text(kids[0])
            out[key] = kids[-1]
        return out

    # -- helpers -------------------------------------------------------------------------------

    def resources(self, type_prefix: str, include_existing: bool = False) -> list[Declaration]:
        return [
            d
            for d in self.declarations
            if d.kind == "resource"
            and isinstance(d.target, str)
            and d.target.split("@")[0] == type_prefix
            and (include_existing or not d.existing)
        ]

    def modules(self) -> list[Declaration]:
        return [d for d in self.declarations if d.kind == "module"]

    def declaration(self, symbol: str) -> Declaration:
        for d in self.declarations:
            if d.symbol == symbol:
                return d
        raise KeyError(f"{self.path}: no resource or module `{symbol}`")

    def prop(self, node, *path):
        """The value node at `path` inside object node `node` (None when absent)."""
        for key in path:
            if node is None or node.type != "object":
                return None
            node = self.object_nodes(node).get(key)
        return node

    def var_value(self, name: str):
        if name not in self.vars:
            raise KeyError(f"{self.path}: no var `{name}`")
        return self.eval(self.vars[name])

    def guid_literals(self) -> list[str]:
        text = self.src.decode()
        return re.findall(r"'([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})'", text)


def load_all(root: pathlib.Path) -> dict[str, BicepFile]:
    """Every .bicep file under root/infra, keyed by its path relative to root/infra."""
    infra = pathlib.Path(root) / "infra"
    return {str(p.relative_to(infra)): BicepFile(p) for p in sorted(infra.rglob("*.bicep"))}
