"""Where each key of a TOML text stands: the line numbers every policy error names."""

from __future__ import annotations


import attrs



# ---------------------------------------------------------------- where keys are

@attrs.define
class _KeyPos:
    line: int
    elements: list[int] = attrs.field(factory=list)   # lines where array elements start


class Locator:
    """Line numbers of tables, keys and array elements in a TOML text (tomllib gives none).

    A small scanner over text tomllib already accepted: it follows strings,
    comments and bracket nesting, and records each ``[[table]]`` header, each
    key at the start of a line (per table occurrence) and where each element
    of an array value starts."""

    def __init__(self, text: str):
        self.headers: dict[str, list[int]] = {}
        self.keys: dict[tuple[str, int], dict[str, _KeyPos]] = {}
        self._scan(text)

    def header(self, kind: str, index: int) -> int:
        """The line of the `index`-th ``[[kind]]`` table (or of its element in ``kind = [...]``)."""
        lines = self.headers.get(kind, [])
        if 0 <= index < len(lines):
            return lines[index]
        root = self.keys.get(("", 0), {}).get(kind)
        if root is not None:
            return root.elements[index] if 0 <= index < len(root.elements) else root.line
        return 1

    def line(self, kind: str, index: int, key: str | None = None, element: int | None = None) -> int:
        """The line of `key` (its `element`-th array element) in that table; its header if unknown."""
        if kind == "":
            pos = self.keys.get(("", 0), {}).get(key) if key is not None else None
            return pos.line if pos else 1
        pos = self.keys.get((kind, index), {}).get(key) if key is not None else None
        if pos is None:
            return self.header(kind, index)
        if element is not None and 0 <= element < len(pos.elements):
            return pos.elements[element]
        return pos.line

    def _key(self, ctx: tuple[str, int], name: str, line: int) -> _KeyPos:
        table = self.keys.setdefault(ctx, {})
        if name not in table:
            table[name] = _KeyPos(line)
        return table[name]

    def _scan(self, text: str) -> None:
        n, i, line = len(text), 0, 1
        ctx: tuple[str, int] = ("", 0)
        cur: _KeyPos | None = None
        depth, line_start, expect_element = 0, True, False
        while i < n:
            c = text[i]
            if c == "\n":
                line += 1
                i += 1
                line_start = line_start or depth == 0
                continue
            if c in " \t\r":
                i += 1
                continue
            if c == "#":
                j = text.find("\n", i)
                i = n if j < 0 else j
                continue
            if depth == 0 and line_start:
                line_start = False
                if c == "[":
                    double = text.startswith("[[", i)
                    path, i = _key_path(text, i + (2 if double else 1))
                    j = text.find("\n", i)
                    i = n if j < 0 else j
                    ctx, cur = self._header(path, double, line)
                    continue
                path, j = _key_path(text, i)
                if path:
                    i = j
                    cur = self._key(ctx, path[0], line)
                    while i < n and text[i] in " \t":
                        i += 1
                    if i < n and text[i] == "=":
                        i += 1
                    continue
            if depth == 1 and expect_element and c != "]":
                if cur is not None:
                    cur.elements.append(line)
                expect_element = False
            if c in "\"'":
                i, line = _skip_string(text, i, line)
                continue
            if c in "[{":
                depth += 1
                expect_element = depth == 1 and c == "["
            elif c in "]}":
                depth = max(0, depth - 1)
            elif c == "," and depth == 1:
                expect_element = True
            i += 1

    def _header(self, path: tuple[str, ...], double: bool, line: int) -> tuple[tuple[str, int], None]:
        """Record a table header; returns the table the following keys belong to, and None."""
        if not path:
            return ("", -1), None
        name = path[0]
        self._key(("", 0), name, line)
        if len(path) == 1:
            lines = self.headers.setdefault(name, [])
            if double or not lines:
                lines.append(line)
            return (name, len(lines) - 1), None
        # [[rule.sub]] / [rule.sub]: key `sub` of the last `rule`, one element per [[...]] header
        index = len(self.headers.get(name, [])) - 1
        pos = self._key((name, index), path[1], line)
        if double:
            pos.elements.append(line)
        return ("", -1), None


def _key_path(text: str, i: int) -> tuple[tuple[str, ...], int]:
    """The dotted key at `i` (bare or quoted parts); returns its parts and the index after it."""
    n, parts = len(text), []
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] in "\"'":
            q = text[i]
            j = i + 1
            while j < n and text[j] != q and text[j] != "\n":
                j += 2 if (q == '"' and text[j] == "\\") else 1
            parts.append(text[i + 1:min(j, n)])
            i = min(j + 1, n)
        else:
            j = i
            while j < n and (text[j].isalnum() or text[j] in "_-"):
                j += 1
            if j == i:
                break
            parts.append(text[i:j])
            i = j
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        break
    return tuple(parts), i


def _skip_string(text: str, i: int, line: int) -> tuple[int, int]:
    """Skip the string starting at `i`; returns the index after it and the line there."""
    n, q = len(text), text[i]
    if text.startswith(q * 3, i):
        j = i + 3
        while j < n:
            c = text[j]
            if c == "\\" and q == '"':
                if j + 1 < n and text[j + 1] == "\n":
                    line += 1
                j += 2
                continue
            if c == "\n":
                line += 1
            if text.startswith(q * 3, j):
                j += 3
                extra = 0
                while j < n and text[j] == q and extra < 2:
                    j += 1
                    extra += 1
                return j, line
            j += 1
        return n, line
    j = i + 1
    while j < n and text[j] != q and text[j] != "\n":
        j += 2 if (q == '"' and text[j] == "\\") else 1
    return min(j + 1, n), line


