"""Offline JavaScript for the site: npm packages fetched once (``npm pack``), checked and copied.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .chapters import BookError, Paths, _sha

# npm packages copied into the site at render time, pinned by version and checked by sha256 of the
# files we use (npm itself checks the tarball's integrity against the registry). They go to
# <src>/site_js/, which _config.yml lists in html_static_path, so they land in html/_static/.
# Never put them in a source folder named `_static`: Jupyter Book 1 adds every .js there to
# every page.
VENDOR = {  # npm spec: (folder under site_js/, prefix stripped from package paths, globs)
    "@jupyter-widgets/html-manager@1.0.15": ("ipywidgets", "dist/", [
        "dist/embed-amd.js", "dist/*.woff2", "dist/*.woff", "dist/*.ttf", "dist/*.eot", "dist/*.svg"]),
    "requirejs@2.3.7": ("ipywidgets", "", ["require.js"]),
    "mathjax@3.2.2": ("mathjax", "es5/", [
        "es5/tex-mml-chtml.js", "es5/a11y/*", "es5/adaptors/*", "es5/input/*", "es5/output/chtml.js",
        "es5/output/chtml/*", "es5/ui/*"]),
}
VENDOR_STAMP = "vendor.json"
# embed-amd.js defines its modules (html-manager, base, controls, output) under AMD names, and
# their webpack code finds its font files next to the module's RequireJS URL, which by default is
# a path relative to the page that does not exist. This script (loaded after require.js, before
# embed-amd.js) maps those names to the folder the script itself was loaded from.
REQUIRE_CONFIG_JS = """(function () {
  var base = document.currentScript.src.replace(/\\/[^\\/]*$/, "");  // .../_static/ipywidgets
  window.__jupyter_widgets_assets_path__ = base + "/";
  require.config({paths: {"@jupyter-widgets/html-manager/dist": base, "@jupyter-widgets": base}});
})();
"""


def _npm_pack(spec: str, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise BookError("npm is needed once to fetch the widget JavaScript (apt-get install npm), "
                        f"or copy the files of {spec} into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", str(dest)],
                       capture_output=True, text=True)
    if r.returncode:
        raise BookError(f"npm pack {spec} failed:\n{r.stderr}")
    return dest / r.stdout.strip().splitlines()[-1]


def vendor_js(paths: Paths, log=print) -> Path:
    """Fetch (once, via npm) and unpack the pinned JS packages into ``_build/vendor``; return it."""
    import fnmatch

    vdir = paths.vendor
    stamp = vdir / VENDOR_STAMP
    want = sorted(VENDOR)
    want.append(_sha(REQUIRE_CONFIG_JS.encode()))
    if stamp.exists() and json.loads(stamp.read_text()).get("packages") == want:
        return vdir
    shutil.rmtree(vdir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as td:
        for spec, (dest, strip, globs) in VENDOR.items():
            log(f"[render] fetching {spec} (npm pack, once)")
            tgz = _npm_pack(spec, Path(td))
            with tarfile.open(tgz) as tf:
                names = [m.name[len("package/"):] for m in tf.getmembers() if m.isfile()]
                for g in globs:
                    hits = [n for n in names if fnmatch.fnmatch(n, g)]
                    if not hits:
                        raise BookError(f"npm package {spec} has no file matching {g}")
                    for n in hits:
                        target = vdir / dest / n[len(strip):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tf.extractfile("package/" + n).read())
    (vdir / "ipywidgets" / "require-config.js").write_text(REQUIRE_CONFIG_JS)
    stamp.write_text(json.dumps({"packages": want}))
    return vdir
