"""Sphinx configuration. ``sphinx-build -W -E -b html docs docs/_build/html``.

The build needs no network: intersphinx links to Python, Flask and SQLAlchemy
are made only when ``SIDELOG_DOCS_INTERSPHINX=1`` is set (and the inventories
can be fetched); without it, such references render as plain code.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
# Document the checkout when flask-sidelog is not installed.
sys.path.insert(0, os.path.dirname(HERE))

project = "Flask-SideLog"
copyright = "2026, the Flask-SideLog authors"
author = "the Flask-SideLog authors"
try:
    release = metadata.version("flask-sidelog")
except metadata.PackageNotFoundError:
    with open(os.path.join(HERE, "..", "pyproject.toml"), encoding="utf-8") as f:
        release = re.search(r'^version = "(.+)"', f.read(), re.M).group(1)  # type: ignore[union-attr]
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx_click",
    "pallets_sphinx_themes",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
if os.environ.get("SIDELOG_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3/", None),
        "flask": ("https://flask.palletsprojects.com/en/stable/", None),
        "sqlalchemy": ("https://docs.sqlalchemy.org/en/20/", None),
    }

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_static_path = ["_static"]
html_sidebars = {
    "index": ["searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_title = f"Flask-SideLog Documentation ({version})"
html_show_sourcelink = False
exclude_patterns = ["_build"]
