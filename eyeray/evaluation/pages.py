"""HTML pages from the Jinja2 templates in eyeray/templates (the scoring and sweep reports, the model card).

Autoescaping is on, so a file name, an error message or a class name is printed as text, never as
markup; only what our own code marks with `markupsafe.Markup` (data: URIs of images we encoded)
goes out raw. A variable a template needs but was not given fails the render (StrictUndefined)
instead of leaving a silent gap in a report someone reads to make a decision.
"""

from __future__ import annotations

import base64
from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup


@cache
def environment() -> jinja2.Environment:
    """One environment per process: templates are parsed once and cached by Jinja."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("eyeray", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """The page `template` (a file name in eyeray/templates) filled with `context`."""
    return environment().get_template(template).render(**context)


def data_uri(data: bytes, mime: str) -> Markup:
    """Image bytes we encoded ourselves as a data: URI: the one kind of value the templates print unescaped."""
    return Markup(f"data:{mime};base64,{base64.b64encode(data).decode()}")
