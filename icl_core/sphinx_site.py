"""A small Sphinx extension for the book's site (loaded by _config.yml via `sphinx.extra_extensions`).

- Drops repeated inline scripts: Jupyter Book 1's sphinx-thebe registers its inline configuration
  script (``const THEBE_JS_URL = ...``) twice with Sphinx 7, and the second copy is a JavaScript
  error ("Identifier 'THEBE_JS_URL' has already been declared") on every page.
"""
from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, out = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {}) or {}
        key = (str(getattr(js, "filename", js) or ""), attrs.get("body"), tuple(sorted(
            (k, str(v)) for k, v in attrs.items() if k != "body")))
        if key in seen:
            continue
        seen.add(key)
        out.append(js)
    context["script_files"] = out


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
