"""docs/json.md as a schema: the documents, objects and codes it documents, and a validator.

The tables of docs/json.md are the schema (no second copy to drift from them):
``### document `KIND```, ``### object `NAME``` and ``### codes `NAME```
headings, each followed by a table whose first column is a backticked field
(or code) and, for documents and objects, whose second is a backticked type:
``int``, ``number``, ``string``, ``bool``, ``object``, ``any``, an object
name, ``[T]``, ``code:NAME`` or ``A or B``.  A field whose meaning starts
with "optional" may be missing; a row ``*`` of type NAME brings in every
field of object NAME.  Fields the doc does not list are errors."""

from __future__ import annotations

import os
import re

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "json.md")

_HEAD = re.compile(r"^### (document|object|codes) `([^`]+)`\s*$")
_ROW = re.compile(r"^\| `([^`]+)` \|(?: `([^`]+)` \|)? (.*) \|\s*$")


class Schema:
    def __init__(self, path: str = DOC):
        self.documents: dict[str, dict] = {}
        self.objects: dict[str, dict] = {}
        self.codes: dict[str, set[str]] = {}
        where = None
        for line in open(path, encoding="utf-8"):
            m = _HEAD.match(line)
            if m:
                kind, name = m.groups()
                table = {} if kind != "codes" else set()
                {"document": self.documents, "object": self.objects, "codes": self.codes}[kind][name] = table
                where = (kind, table)
                continue
            if line.startswith("#"):
                where = None
                continue
            m = _ROW.match(line)
            if not m or where is None:
                continue
            kind, table = where
            name, typ, meaning = m.groups()
            if kind == "codes":
                table.add(name)
            elif typ:
                table[name] = (typ, meaning.lower().startswith("optional"))
        for name, fields in list(self.objects.items()) + list(self.documents.items()):
            self._expand(fields)

    def _expand(self, fields: dict) -> None:
        if "*" in fields:
            typ, _ = fields.pop("*")
            base = dict(self.objects[typ])
            self._expand(base)
            fields.update({k: v for k, v in base.items() if k not in fields})

    # ------------------------------------------------------------ checking

    def validate(self, doc) -> list[str]:
        """Every way `doc` differs from docs/json.md (empty: it is valid)."""
        errors: list[str] = []
        if not isinstance(doc, dict):
            return [f"a document is an object, not {type(doc).__name__}"]
        if doc.get("version") != 1:
            errors.append(f"version is {doc.get('version')!r}, not 1")
        kind = doc.get("kind")
        if kind not in self.documents:
            return errors + [f"unknown kind {kind!r}"]
        fields = {**self.objects["envelope"], **self.documents[kind]}
        self._object(doc, fields, f"<{kind}>", errors)
        return errors

    def _object(self, value, fields: dict, where: str, errors: list[str]) -> None:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object, got {value!r:.60}")
            return
        for name, (typ, optional) in fields.items():
            if name not in value:
                if not optional:
                    errors.append(f"{where}: missing field {name!r}")
                continue
            self._check(value[name], typ, f"{where}.{name}", errors)
        for name in value:
            if name not in fields:
                errors.append(f"{where}: field {name!r} is not documented")

    def _check(self, value, typ: str, where: str, errors: list[str]) -> None:
        alternatives = [t.strip() for t in _split_or(typ)]
        if len(alternatives) > 1:
            for alt in alternatives:
                trial: list[str] = []
                self._check(value, alt, where, trial)
                if not trial:
                    return
            errors.append(f"{where}: {value!r:.80} is none of {typ}")
            return
        t = typ.strip()
        if t == "null":
            ok = value is None
        elif t == "any":
            ok = True
        elif t == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t == "string":
            ok = isinstance(value, str)
        elif t == "bool":
            ok = isinstance(value, bool)
        elif t == "object":
            ok = isinstance(value, dict)
        elif t.startswith("[") and t.endswith("]"):
            if not isinstance(value, list):
                errors.append(f"{where}: expected a list, got {value!r:.60}")
                return
            for i, item in enumerate(value):
                self._check(item, t[1:-1], f"{where}[{i}]", errors)
            return
        elif t.startswith("code:"):
            table = self.codes.get(t[5:])
            if table is None:
                errors.append(f"{where}: the doc names no codes table {t[5:]!r}")
                return
            ok = isinstance(value, str) and value in table
        elif t in self.objects:
            self._object(value, self.objects[t], where, errors)
            return
        else:
            errors.append(f"{where}: the doc uses an unknown type {t!r}")
            return
        if not ok:
            errors.append(f"{where}: {value!r:.80} is not {t}")


def _split_or(typ: str) -> list[str]:
    """`A or B` at the top level (not inside [...])."""
    parts, depth, cur = [], 0, ""
    for word in typ.split(" "):
        depth += word.count("[") - word.count("]")
        if word == "or" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur = f"{cur} {word}".strip()
    parts.append(cur)
    return parts
