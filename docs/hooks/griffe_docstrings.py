"""A griffe extension (mkdocs.yml: ``extensions``) that reads the library's docstrings as mkdocstrings expects.

The docstrings are Google style with two habits of Sphinx that mkdocstrings does not read: the section title
``Example:`` (griffe knows ``Examples:``, whose ``>>>`` lines become code; otherwise they would be nested block
quotes) and roles such as ``:func:`structmat.bench``` (shown as plain code here). The library is not changed; only
the text handed to the renderer is.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

__all__ = ["SphinxHabits"]

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):`~?([^`]+)`")


_BARE_DOCTEST = re.compile(r"^>>> .*?(?=\n\s*\n|\Z)", re.M | re.S)


def rewrite(text: str) -> str:
    """``Example:`` -> ``Examples:``; ``:func:`x``` -> ```x```; a doctest outside any section -> a code block."""
    text = _BARE_DOCTEST.sub(lambda m: f"```pycon\n{m.group(0)}\n```", text)
    return _ROLE.sub(r"`\1`", _EXAMPLE.sub(r"\1Examples:", text))


class SphinxHabits(Extension):
    """Rewrite every object's docstring with :func:`rewrite` before it is parsed."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
