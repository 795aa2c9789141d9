"""The documentation keeps up with the code."""

from __future__ import annotations

import os
import re

from flask import Flask

from flask_sidelog.config import Settings

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def test_every_config_key_is_documented_with_its_default() -> None:
    app = Flask(__name__)
    Settings.from_app(app)
    keys = {key for key in app.config if key.startswith("SIDELOG_")}
    with open(os.path.join(DOCS, "configuration.rst"), encoding="utf-8") as f:
        text = f.read()
    documented = set(re.findall(r"^\.\. data:: (SIDELOG_\w+)$", text, re.M))
    assert keys == documented
    sections = re.split(r"^\.\. data:: ", text, flags=re.M)[1:]
    assert all("Default: " in section for section in sections)
