"""mkdocs hook: the package's docstrings use Sphinx roles (:func:`~actcomp.x.name`), which
mkdocstrings' Markdown renders as the role's text followed by inline code. Show the code alone,
shortened to its last name where the role says ``~``, as Sphinx would."""

import re

ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def shorten(match: re.Match) -> str:
    tilde, path, call = match.groups()
    return f"<code>{path.rsplit('.', 1)[-1] if tilde else path}{call or ''}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(shorten, html)
