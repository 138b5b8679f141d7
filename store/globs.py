"""Glob patterns over metric names, as regexes polars can run.

Reads select metrics by name with fnmatch-style globs (`at_step(pattern=...)`, the dashboard's
metric search); matching happens inside polars (`str.contains`), whose Rust regex engine has no
look-arounds, so Python's fnmatch.translate cannot be used and this module translates instead.
"""

from __future__ import annotations

from store.base import InvalidInput


def _lit(c: str) -> str:
    return c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}"


def glob_to_regex(pattern: str) -> str:
    """fnmatch.fnmatchcase semantics as a Rust-regex (polars) pattern: `*` (also across "/"),
    `?`, `[abc]`, `[a-z]`, `[!x]`. Python's own fnmatch.translate emits look-arounds that
    polars' regex engine rejects, hence this."""
    if not isinstance(pattern, str):
        raise InvalidInput(f"pattern must be a string, got {type(pattern).__name__}")
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + (i < n and pattern[i] == "!")
            j += j < n and pattern[j] == "]"  # a leading "]" is literal
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: literal "["
                out.append(_lit("["))
                continue
            body, i = pattern[i:j], j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            items, k = [], 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    if body[k] <= body[k + 2]:  # fnmatch drops reversed ranges
                        items.append(f"{_lit(body[k])}-{_lit(body[k + 2])}")
                    k += 3
                else:
                    items.append(_lit(body[k]))
                    k += 1
            if items:
                out.append(("[^" if negate else "[") + "".join(items) + "]")
            else:  # empty class: matches nothing,
                out.append("(?s:.)" if negate else r"[^\x{0}-\x{10FFFF}]")  # or any char
        else:
            out.append(_lit(c))
    out.append("$")
    return "(?s)" + "".join(out)
