"""Build the smoke book end to end and open every page in headless Chromium (Playwright, no download).

Checks, on every built page: it loads; every <img> has a natural width > 0; every embedded widget
draws; choosing another value in a widget's selector changes what it shows; no error output cell;
no console error beyond ALLOWED_CONSOLE_ERRORS; no request leaves the site (widgets and MathJax are
served from the site's own copy).

The book is built under _build/site-test/ (not _build/html, so `make test` never replaces the book
you built); the runs come from the usual cache ($ICL_RUNS_DIR or runs/).
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "_build" / "site-test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Console messages of type "error" that are known and harmless. Keep this list short and explain
# every entry. (Warnings are not errors: the widget manager's JSON-schema validator prints
# "strict mode: use allowUnionTypes ..." as a warning, which is not checked.)
ALLOWED_CONSOLE_ERRORS: list[tuple[str, str]] = [
    # (regex on the message, why it is harmless)
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def site():
    """Build the smoke book (train what is missing, execute, render) and return its html folder."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "icl_core.book", "build", "--profile", "smoke", "--out", str(OUT)],
                       cwd=ROOT, capture_output=True, text=True)
    elapsed = time.time() - t
    print(r.stdout[-4000:])
    assert r.returncode == 0, f"smoke book build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"smoke book built in {elapsed:.0f}s")
    html = OUT / "_build" / "html"
    assert (html / "index.html").exists()
    return html


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _pages(site: Path) -> list[str]:
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html")
                  if not p.relative_to(site).parts[0].startswith("_"))


def test_every_chapter_has_a_page(site):
    pages = _pages(site)
    for nb in sorted((ROOT / "chapters").glob("0*.ipynb")):
        assert f"chapters/{nb.stem}.html" in pages


# JavaScript helpers evaluated in the page
_WIDGET_STATUS = """() => Array.from(document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"]')).map(s => {
        const root = s.parentElement;
        return {drawn: !!root.querySelector('.jupyter-widgets'), id: JSON.parse(s.textContent).model_id};
    })"""
_IMAGES = """() => Array.from(document.images).map(i => ({src: i.src.slice(0, 80), complete: i.complete,
    width: i.naturalWidth}))"""
_SHOWN = """(root) => {
    const vis = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
    const imgs = Array.from(root.querySelectorAll('img')).filter(vis).map(i => i.src);
    const text = Array.from(root.querySelectorAll('.widget-html-content, .widget-label')).filter(vis)
        .map(e => e.textContent);
    return JSON.stringify([imgs, text]);
}"""


def _check_page(browser, server, page_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, external, failed = [], [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: failed.append(r.url))

    def route(r):
        if r.request.url.startswith(server):
            r.continue_()
        else:  # the site must work offline: nothing is fetched from elsewhere
            external.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    resp = page.goto(f"{server}/{page_path}", wait_until="load")
    assert resp is not None and resp.ok, f"{page_path}: HTTP {resp and resp.status}"
    assert page.title(), f"{page_path}: no title"

    widgets = page.evaluate(_WIDGET_STATUS)
    if widgets:  # the widget manager renders asynchronously after the load event
        try:
            page.wait_for_function(f"() => ({_WIDGET_STATUS})().every(w => w.drawn)", timeout=20000)
        except Exception:  # reported below with the ids of the widgets that did not draw
            pass
        not_drawn = [w["id"] for w in page.evaluate(_WIDGET_STATUS) if not w["drawn"]]
        assert not not_drawn, f"{page_path}: widgets not drawn: {not_drawn}; console errors: {errors}"
    page.wait_for_load_state("networkidle")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=20000)
    bad_imgs = [i for i in page.evaluate(_IMAGES) if i["width"] <= 0]
    assert not bad_imgs, f"{page_path}: images that did not load: {bad_imgs}"

    assert page.locator(".cell_output .traceback, .cell_output .output.error").count() == 0, \
        f"{page_path}: has an error output cell"

    changed = _check_selectors(page, page_path)

    page.close()
    unexpected = [e for e in errors if not any(re.search(p, e) for p, _ in ALLOWED_CONSOLE_ERRORS)]
    assert not unexpected, f"{page_path}: console errors: {unexpected}"
    assert not external, f"{page_path}: requests outside the site: {external}"
    assert not failed, f"{page_path}: failed requests: {failed}"
    return {"widgets": len(widgets), "selectors": changed}


def _check_selectors(page, page_path) -> int:
    """Choose another option in every widget <select>; what the widget shows must change."""
    n = 0
    views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]')
    for i in range(views.count()):
        root = views.nth(i).locator("xpath=..").locator(".jupyter-widgets").first  # the widget's top level
        selects = root.locator("select")
        for j in range(selects.count()):
            sel = selects.nth(j)
            n_opts = sel.locator("option").count()
            if n_opts < 2:
                continue
            before = root.evaluate(_SHOWN)
            current = sel.evaluate("s => s.selectedIndex")
            sel.select_option(index=(current + 1) % n_opts)
            page.wait_for_timeout(200)
            after = root.evaluate(_SHOWN)
            assert after != before, f"{page_path}: selector {j} of widget {i} changed nothing on the page"
            sel.select_option(index=current)
            n += 1
    return n


def test_every_page_in_chromium(site, server, browser):
    pages = _pages(site)
    assert "index.html" in pages
    report = {}
    for p in pages:
        report[p] = _check_page(browser, server, p)
    # the introduction has the attention widget with three selectors (layer, head, checkpoint)
    intro = report["chapters/00_intro.html"]
    assert intro["widgets"] >= 1 and intro["selectors"] >= 3, intro
    print(report)


def test_widget_javascript_is_vendored(site):
    intro = (site / "chapters" / "00_intro.html").read_text()
    assert "cdn.jsdelivr" not in intro and "cdnjs" not in intro and "unpkg.com/@jupyter" not in intro
    for f in ("require.js", "require-config.js", "embed-amd.js"):
        assert f"_static/ipywidgets/{f}" in intro, f
        assert (site / "_static" / "ipywidgets" / f).exists()
    # only pages with widgets load the widget manager (it is not in a `_static` source folder)
    assert "embed-amd.js" not in (site / "chapters" / "07_methods.html").read_text()


# --- publishing (issue 21): the header's buttons, the launch links, `make publish` of the site ---

def _book_config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text())


def _header_buttons(page: Path) -> dict[str, str]:
    """The article header's link buttons of a built page: tooltip -> href."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page.read_text(), "html.parser")
    return {a.get("title", ""): a["href"] for a in soup.select(".article-header-buttons a[href]")}


def _toc_pages() -> dict[str, Path]:
    """Every page of _toc.yml: its html path -> its source file in the project."""
    from icl_core.book import toc_files

    pages = {}
    for f in toc_files(ROOT):
        src = next(p for p in (ROOT / f"{f}.ipynb", ROOT / f"{f}.md") if p.exists())
        pages[f"{f}.html"] = src
    return pages


def test_repository_issues_and_download_buttons_render(site):
    url = _book_config()["repository"]["url"]
    for rel, src in _toc_pages().items():
        buttons = _header_buttons(site / rel)
        assert buttons.get("Source repository") == url, (rel, buttons)
        assert buttons.get("Open an issue", "").startswith(f"{url}/issues/new?"), (rel, buttons)
        download = (site / rel).parent / buttons["Download source file"]
        assert download.resolve().is_file() and download.suffix == src.suffix, (rel, buttons)


def test_launch_buttons_open_the_chapter_notebooks_of_the_repository(site):
    cfg = _book_config()
    org, repo = cfg["repository"]["url"].removeprefix("https://github.com/").split("/")
    branch, launch = cfg["repository"]["branch"], cfg["launch_buttons"]
    ui = {"classic": "tree", "jupyterlab": "lab/tree"}[launch["notebook_interface"]]
    n_notebooks = 0
    for rel, src in _toc_pages().items():
        buttons = _header_buttons(site / rel)
        if src.suffix != ".ipynb":
            assert "Launch on Binder" not in buttons and "Launch on Colab" not in buttons, rel
            continue
        nb = src.relative_to(ROOT).as_posix()  # e.g. chapters/03_ablation.ipynb, as stored in the repository
        assert buttons["Launch on Binder"] == f"{launch['binderhub_url']}/v2/gh/{org}/{repo}/{branch}?urlpath={ui}/{nb}"
        assert buttons["Launch on Colab"] == f"{launch['colab_url']}/github/{org}/{repo}/blob/{branch}/{nb}"
        n_notebooks += 1
    assert n_notebooks == len(list((ROOT / "chapters").glob("*.ipynb")))


def test_about_page_links_to_the_deviations_table(site):
    from bs4 import BeautifulSoup

    about = site / "chapters" / "about.html"
    links = [a["href"] for a in BeautifulSoup(about.read_text(), "html.parser").select("article a[href]")
             if not a["href"].startswith(("http", "#", "mailto:"))]
    assert "07_methods.html#deviations-from-the-paper" in links
    for href in links:  # every local link of the page lands on an existing page and anchor
        path, _, anchor = href.partition("#")
        target = (about.parent / path).resolve()
        assert target.is_file(), href
        if anchor:
            assert BeautifulSoup(target.read_text(), "html.parser").find(id=anchor), href


def test_make_publish_pushes_the_built_site_to_a_bare_remote(site, tmp_path):
    from tests.test_publish import publish_to_bare_remote

    files = publish_to_bare_remote(site, tmp_path)
    assert "index.html" in files and ".nojekyll" in files
    assert files == {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()} | {".nojekyll"}
    assert set(_pages(site)) <= files
    executed = OUT / "_build" / "executed"
    assert any(executed.rglob("*.key.json"))  # what must stay behind exists beside the site ...
    assert not [f for f in files if f.endswith((".key.json", ".failed.ipynb")) or "executed" in f]  # ... and stays


# --- the reproduction scorecard (issue 21): the landing page's table ---------------------------------

_SCORECARD_ROWS = """() => Array.from(document.querySelectorAll('#scorecard-table tbody tr')).map(tr => ({
    id: tr.dataset.claim, chapter: tr.dataset.chapter, status: tr.dataset.status,
    verdict: tr.querySelector('td.verdict').innerText.trim(),
    href: tr.querySelector('a.scorecard-link').getAttribute('href')}))"""


def test_landing_scorecard_links_every_claim_and_shows_the_chapters_verdicts(site, server, browser):
    """Opened in Chromium (offline): one row per claim, at least ten; every row's link, followed, lands
    on an existing anchor of its chapter's page; every verdict is the one in the results file the
    chapter wrote (and the chapter's own page shows it too); the table names the profile."""
    from icl_core import scorecard as SC

    rows = SC.load(OUT / "_build" / "executed" / "smoke" / "results", "smoke")
    page = browser.new_page()
    external = []
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(server)
               else (external.append(r.request.url), r.abort()))
    page.goto(f"{server}/index.html", wait_until="load")
    shown = page.evaluate(_SCORECARD_ROWS)
    assert len(shown) >= 10 and len({s["id"] for s in shown}) == len(shown)
    assert [s["id"] for s in shown] == [r["id"] for r in rows]
    assert "smoke" in page.inner_text(".scorecard-profile")
    for s, r in zip(shown, rows):
        assert s["status"] == r["status"] != SC.NOT_BUILT, s
        assert s["verdict"] == r["verdict"], s
    for s in shown:
        path, _, anchor = s["href"].partition("#")
        assert path == f"chapters/{s['chapter']}.html" and anchor, s
        page.goto("about:blank")  # a fresh navigation each time (a hash change alone returns no response)
        resp = page.goto(f"{server}/{s['href']}", wait_until="load")
        assert resp is not None and resp.ok, s
        assert page.evaluate("(id) => !!document.getElementById(id)", anchor), s
    for chapter in sorted({r["chapter"] for r in rows}):
        page.goto(f"{server}/chapters/{chapter}.html", wait_until="load")
        text = page.inner_text("body")
        for r in rows:
            if r["chapter"] == chapter:
                assert r["verdict"] in text, (chapter, r["id"])
    assert not external, external
    page.close()
