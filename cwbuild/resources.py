"""Package data: jinja2 templates (top-level templates/, shipped inside the package) and trust material."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import jinja2


def template_root() -> Traversable:
    """The templates shipped with the package."""
    return resources.files("cwbuild") / "templates"


def data_root() -> Traversable:
    """Other package data (cwbuild/data/...): trust anchors and the like."""
    return resources.files("cwbuild") / "data"


class _TraversableLoader(jinja2.BaseLoader):
    def get_source(
        self,
        environment: jinja2.Environment,  # noqa: ARG002 - jinja2's loader signature
        template: str,
    ) -> tuple[str, str | None, Any]:
        node = template_root()
        for part in template.split("/"):
            if part in ("", ".", ".."):
                raise jinja2.TemplateNotFound(template)
            node = node / part
        if not node.is_file():
            raise jinja2.TemplateNotFound(template)
        return node.read_text(encoding="utf-8"), None, lambda: True


def environment() -> jinja2.Environment:
    """A strict jinja2 environment over the packaged templates (undefined variables are errors)."""
    return jinja2.Environment(
        loader=_TraversableLoader(),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - renders shell scripts and JSON; XML templates escape explicitly
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, **context: Any) -> str:
    """Render the packaged template `name` with `context`."""
    return environment().get_template(name).render(**context)
