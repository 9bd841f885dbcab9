"""The website in a real browser: headless Chromium, driven by Playwright, reads the built book
from a local HTTP server with every request to another host blocked, as a reader offline would.

Checks: every page of the table of contents loads (HTTP 200) without a JavaScript error or a
failed request; every image shows (``naturalWidth > 0``); every internal link points to an
existing file and, with ``#anchor``, to an element of that page; every equation is typeset by the
bundled MathJax (no raw TeX left); the search page finds each chapter by a word of its title.

Needs Chromium at ``$MOE_COURSE_CHROMIUM`` (default ``/usr/bin/chromium``; Debian's package
``chromium``, which ``.ci/run`` installs) and the ``playwright`` package (the ``dev`` extra; its
own browser download is not used). Without them the tests skip locally, and FAIL when ``CI`` is
set, so CI cannot pass without running them. The book is built once per session by the
``built_book`` fixture in conftest.py.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
CHROMIUM = os.environ.get("MOE_COURSE_CHROMIUM", "/usr/bin/chromium")
# Flags known to work on these machines: no sandbox as root, no GPU, and no background traffic
# (the closed network refuses it, noisily). Playwright adds --headless and a fresh profile dir.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 30_000


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    if _in_ci():
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs chromium)", pytrace=False)
    pytest.skip(reason)


def _toc_pages() -> list[str]:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return pages


def _chapter_title(stem: str) -> str:
    import nbformat

    path = BOOK / f"{stem}.ipynb"
    if path.is_file():
        for cell in nbformat.read(path, as_version=4).cells:
            for line in cell.source.splitlines():
                if cell.cell_type == "markdown" and line.startswith("# "):
                    return line[2:]
    return ""


def _search_word(title: str) -> str:
    """The longest plain word of a title ("5. Quantization" -> "Quantization")."""
    words = [w for w in re.findall(r"[A-Za-z]+", title) if len(w) >= 5]
    assert words, f"no word of 5+ letters to search for in the title {title!r}"
    return max(words, key=len)


# --- serving and driving ------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def site(built_book):
    """``(base_url, html_dir)`` of the built book, served on localhost from a thread."""
    done, html_dir = built_book
    if done.returncode != 0:
        pytest.fail("the book did not build; see tests/test_book.py::test_book_builds_without_warnings",
                    pytrace=False)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html_dir))
    )
    thread = threading.Thread(target=server.serve_forever, name="book-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", html_dir
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable('playwright is not installed (pip install -e ".[dev]")')
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MOE_COURSE_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=shutil.which(CHROMIUM) or CHROMIUM, args=CHROMIUM_FLAGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


class _Tab:
    """One browser tab that records what went wrong while it loads pages of the site."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 900):
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(PAGE_TIMEOUT_MS)
        self.outside: list[str] = []
        self.problems: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda err: self.problems.append(f"JavaScript error: {err}"))
        self.page.on("console", self._console)
        self.page.on("requestfailed", lambda req: self._failed(req.url, req.failure))
        self.page.on("response", lambda resp: resp.status >= 400 and self._failed(resp.url, resp.status))

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.base) or url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:  # the site must work offline: nothing may come from elsewhere
            self.outside.append(url)
            route.abort()

    def _console(self, message):
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def _failed(self, url, why):
        # ERR_ABORTED: the next navigation cancelled a fetch in flight (the search page fetches
        # each result's page for its summary); a missing file shows up as a 404 response instead.
        if url.startswith(self.base) and why != "net::ERR_ABORTED":
            self.problems.append(f"request failed ({why}): {url[len(self.base):]}")

    def close(self):
        self.context.close()


_PAGE_FACTS = """async () => {
  for (const img of document.images) { if (img.loading === "lazy") img.loading = "eager"; }
  await Promise.all([...document.images].map(img => img.complete ? null :
      new Promise(done => { img.addEventListener("load", done); img.addEventListener("error", done); })));
  const hasMath = document.querySelector(".math") !== null;
  if (hasMath) {
    const t0 = Date.now();
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() - t0 < 10000) {
      await new Promise(r => setTimeout(r, 50));
    }
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  }
  const visibleText = node => {
    const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER"]);
    let text = "";
    const walk = n => {
      if (n.nodeType === Node.TEXT_NODE) { text += n.textContent; return; }
      if (n.nodeType !== Node.ELEMENT_NODE || skip.has(n.tagName)) return;
      for (const c of n.childNodes) walk(c);
    };
    walk(node);
    return text;
  };
  const containers = [...document.querySelectorAll("mjx-container")];
  return {
    images: [...document.images].map(img => [img.getAttribute("src"), img.complete, img.naturalWidth]),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    math: document.querySelectorAll(".math").length,
    untypeset: [...document.querySelectorAll(".math")].filter(e => !e.querySelector("mjx-container"))
                  .map(e => e.textContent.slice(0, 80)),
    containers: containers.length,
    shown: containers.filter(c => c.checkVisibility()).length,
    empty: containers.filter(c => c.checkVisibility())
                     .filter(c => { const r = c.getBoundingClientRect(); return !(r.width > 0 && r.height > 0); })
                     .map(c => c.textContent.slice(0, 80)),
    errors: [...document.querySelectorAll("mjx-merror")].map(e => e.textContent.slice(0, 120)),
    // Any dollar left in the prose is TeX that MyST paired wrongly (e.g. $$...$$ inside a paragraph).
    rawTeX: (visibleText(document.body).match(/\\$|\\\\\\(|\\\\\\[/g) || []).length,
    // A Markdown table printed as text: an output rendered without GitHub-flavoured tables.
    // (smartquotes may have turned the --- into dashes).
    rawTables: (visibleText(document.body).match(/\\|\\s*:?(-{3,}|[\u2013\u2014]+):?\\s*\\|/g) || []).length,
    mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
  };
}"""


@pytest.fixture(scope="module")
def visited(browser, site):
    """Every page of the table of contents, loaded once: ``{page: facts}`` plus the seconds taken."""
    base, _ = site
    tab = _Tab(browser, base)
    facts: dict[str, dict] = {}
    start = time.perf_counter()
    try:
        for stem in _toc_pages():
            before = len(tab.problems)
            response = tab.page.goto(base + f"{stem}.html", wait_until="load")
            info = tab.page.evaluate(_PAGE_FACTS)
            tab.page.wait_for_load_state("networkidle")
            info["status"] = response.status if response is not None else None
            info["problems"] = tab.problems[before:]
            facts[stem] = info
        facts_outside = list(tab.outside)
    finally:
        tab.close()
    return facts, facts_outside, time.perf_counter() - start


# --- the checks ---------------------------------------------------------------------------------


def test_every_page_loads_without_errors(visited):
    facts, outside, seconds = visited
    assert list(facts) == _toc_pages()
    bad = {page: f["status"] for page, f in facts.items() if f["status"] != 200}
    assert not bad, f"pages not served with HTTP 200: {bad}"
    assert not outside, f"the site asked other hosts for {sorted(set(outside))}: it must work offline"
    problems = {page: f["problems"] for page, f in facts.items() if f["problems"]}
    assert not problems, f"errors while loading pages: {problems}"
    assert seconds < 120, f"loading {len(facts)} pages took {seconds:.0f} s"


def test_every_image_shows(visited):
    facts, _, _ = visited
    broken = {page: [src for src, complete, width in f["images"] if not (complete and width > 0)]
              for page, f in facts.items()}
    broken = {page: srcs for page, srcs in broken.items() if srcs}
    assert not broken, f"images that did not load: {broken}"
    assert sum(len(f["images"]) for f in facts.values()) >= 10, "expected the chapters' figures and badges"


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


def test_every_internal_link_resolves(visited, site):
    facts, _, _ = visited
    base, html_dir = site
    ids: dict[Path, set[str]] = {}
    broken: list[str] = []
    checked = 0
    for page, f in facts.items():
        for href in f["links"]:
            if not href.startswith(base):
                continue  # GitHub, Colab, DOIs: not reachable from here, and not ours to check
            checked += 1
            parts = urlsplit(href)
            target = html_dir / unquote(parts.path[len(urlsplit(base).path):])
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page}.html -> {href[len(base):]} (no such file)")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html":
                if target not in ids:
                    parser = _Ids()
                    parser.feed(target.read_text(encoding="utf-8"))
                    ids[target] = parser.ids
                if fragment not in ids[target]:
                    broken.append(f"{page}.html -> {href[len(base):]} (no id {fragment!r})")
    assert not broken, "broken internal links:\n" + "\n".join(broken)
    assert checked > 50, f"only {checked} internal links found: is the navigation there?"


def test_every_equation_is_typeset_by_the_bundled_mathjax(visited):
    facts, _, _ = visited
    with_math = {page: f for page, f in facts.items() if f["math"]}
    assert len(with_math) >= 5, "the chapters' equations did not reach the pages as math"
    for page, f in with_math.items():
        assert f["mathjax"] and f["mathjax"].startswith("3."), f"{page}: MathJax did not start"
        assert not f["untypeset"], f"{page}: equations left as raw TeX: {f['untypeset'][:5]}"
        assert f["containers"] >= f["math"] and f["shown"] > 0, f"{page}: {f['containers']} of {f['math']} typeset"
        assert not f["empty"], f"{page}: typeset equations with no size (fonts missing?): {f['empty'][:5]}"
        assert not f["errors"], f"{page}: TeX errors: {f['errors'][:5]}"
    raw = {page: f["rawTeX"] for page, f in facts.items() if f["rawTeX"]}
    assert not raw, f"raw $, \\( or \\[ in the text of {raw}"


def test_markdown_outputs_render_as_tables(visited):
    facts, _, _ = visited
    raw = {page: f["rawTables"] for page, f in facts.items() if f["rawTables"]}
    assert not raw, f"Markdown tables shown as text (pipes and dashes) on {raw}"


def test_search_finds_each_chapter_by_a_word_of_its_title(browser, site):
    base, _ = site
    chapters = [stem for stem in _toc_pages() if re.match(r"\d\d_", stem)]
    assert chapters, "no chapters in _toc.yml"
    tab = _Tab(browser, base)
    missing = {}
    try:
        for stem in chapters:
            word = _search_word(_chapter_title(stem))
            tab.page.goto(base + f"search.html?q={word}", wait_until="load")
            tab.page.wait_for_function(
                "() => { const s = document.querySelector('#search-results .search-summary');"
                " return s && /finished/i.test(s.textContent); }"
            )
            found = tab.page.eval_on_selector_all(
                "#search-results ul.search li a", "links => links.map(a => a.getAttribute('href'))"
            )
            if not any(href.split("#")[0].split("?")[0] == f"{stem}.html" for href in found):
                missing[stem] = (word, found)
        assert not tab.problems, tab.problems
    finally:
        tab.close()
    assert not missing, f"search did not list the chapter for its own title word: {missing}"


# --- results shown whole: nothing wider than its column -------------------------------------------

# Outputs, tables and display equations that do not fit: wider than the article's column (their
# box sticks out) or wider inside than their box (the reader must scroll it sideways, or the rest
# is cut off). Code cells' sources are not checked here.
_WIDTH_FACTS = """async () => {
  if (document.querySelector(".math")) {
    const t0 = Date.now();
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() - t0 < 10000) {
      await new Promise(r => setTimeout(r, 50));
    }
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  }
  const column = (document.querySelector("article.bd-article") || document.body).getBoundingClientRect();
  const kinds = {
    text: ".cell_output .output pre",
    table: ".cell_output .output.text_html, .cell_output table, article.bd-article table",
    output: ".cell_output .output",
    equation: "div.math, mjx-container[display='true']",
    image: "article.bd-article img",
  };
  const found = [];
  for (const [kind, selector] of Object.entries(kinds)) {
    for (const el of document.querySelectorAll(selector)) {
      if (!el.checkVisibility({visibilityProperty: true})) continue;
      const r = el.getBoundingClientRect();
      if (r.width === 0) continue;
      // What the reader sees of the box: cut at every ancestor that clips or scrolls it.
      let shownRight = r.right;
      for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
        if (getComputedStyle(a).overflowX !== "visible") shownRight = Math.min(shownRight, a.getBoundingClientRect().right);
      }
      found.push({kind, inside: el.scrollWidth - el.clientWidth,
                  left: r.left - column.left, right: r.right - column.right, viewportRight: shownRight - innerWidth,
                  text: (el.textContent || el.getAttribute("src") || "").trim().replace(/\\s+/g, " ").slice(0, 70)});
    }
  }
  const root = document.scrollingElement;
  return {found, pageScroll: root.scrollWidth - root.clientWidth,
          screens: Math.round(10 * root.scrollHeight / innerHeight) / 10};
}"""


@pytest.fixture(scope="module")
def widths(browser, site):
    """``{(page, width): facts}`` for every page of the table of contents at 1400 and 400 px."""
    base, _ = site
    facts = {}
    for width in (1400, 400):
        tab = _Tab(browser, base, width=width, height=1000)
        try:
            for stem in _toc_pages():
                tab.page.goto(base + f"{stem}.html", wait_until="load")
                facts[stem, width] = tab.page.evaluate(_WIDTH_FACTS)
        finally:
            tab.close()
    return facts


def _describe(items, *keys) -> list[str]:
    return [f"{i['kind']} {i['text']!r} (+{max(i[k] for k in keys):.0f} px)" for i in items]


def test_no_output_table_or_equation_is_wider_than_its_column_at_1400_px(widths):
    wide = {}
    for (page, width), f in widths.items():
        if width != 1400:
            continue
        bad = [i for i in f["found"] if i["inside"] > 1 or i["right"] > 1 or i["left"] < -1]
        if bad:
            wide[page] = _describe(bad, "inside", "right")
    assert not wide, "wider than the column at 1400 px (clipped or scrolled sideways):\n" + "\n".join(
        f"{page}: {items}" for page, items in wide.items())
    assert sum(len(f["found"]) for (_, w), f in widths.items() if w == 1400) > 200, "no outputs found"


def test_a_400_px_phone_never_scrolls_the_page_sideways(widths):
    """On a phone, text outputs still wrap whole; a table or equation wider than the screen may
    scroll inside its own box (nothing else could show it at a readable size), but nothing sticks
    out of the screen and the page itself never scrolls sideways."""
    problems = {}
    for (page, width), f in widths.items():
        if width != 400:
            continue
        bad = [f"page scrolls sideways by {f['pageScroll']} px"] if f["pageScroll"] > 1 else []
        bad += _describe((i for i in f["found"] if i["viewportRight"] > 1 or i["left"] < -1), "viewportRight")
        bad += _describe((i for i in f["found"] if i["kind"] == "text" and i["inside"] > 1), "inside")
        if bad:
            problems[page] = bad
    assert not problems, "at 400 px:\n" + "\n".join(f"{page}: {items}" for page, items in problems.items())


# --- the theme: a menu that opens at every width, one search bar ----------------------------------

# Where the primary sidebar's chapter links are: shown when the first visible link lies inside the
# viewport and is what the reader would click there (not covered by the page or the header).
_SIDEBAR_STATE = """() => {
  const links = [...document.querySelectorAll("#pst-primary-sidebar nav.bd-docs-nav a, "
                                           + "#pst-primary-sidebar-modal nav.bd-docs-nav a")];
  const link = links.find(a => a.checkVisibility({visibilityProperty: true, opacityProperty: true}));
  let shown = false;
  if (link) {
    const r = link.getBoundingClientRect();
    const x = r.left + Math.min(r.width / 2, 20), y = r.top + r.height / 2;
    shown = r.width > 0 && r.left >= 0 && r.right <= innerWidth && r.top >= 0 && r.bottom <= innerHeight
            && link.contains(document.elementFromPoint(x, y));
  }
  const visible = sel => [...document.querySelectorAll(sel)]
      .filter(e => e.checkVisibility({visibilityProperty: true}) && e.getBoundingClientRect().width > 0);
  return {shown, toggles: visible(".primary-toggle").length,
          searchBars: visible(".search-button-field").length,
          searchButtons: visible(".search-button__button").length};
}"""


@pytest.mark.parametrize("width", [1400, 400])
def test_menu_button_opens_the_primary_sidebar(browser, site, width):
    """The one visible menu button shows the chapter list: on a desktop it hides and re-opens the
    sidebar; on a phone (sidebar hidden at first) it opens it over the page."""
    base, _ = site
    tab = _Tab(browser, base, width=width, height=900)
    try:
        page = tab.page
        page.goto(base + "02_sparse_gating.html", wait_until="load")
        state = page.evaluate(_SIDEBAR_STATE)
        assert state["toggles"] == 1, f"{state['toggles']} visible menu buttons at {width} px"
        button = page.locator(".primary-toggle").filter(visible=True)
        if width >= 992:  # the themes' desktop breakpoint: the sidebar starts open
            assert state["shown"], f"the sidebar is not shown at {width} px"
            button.click()
            page.wait_for_function(f"() => !({_SIDEBAR_STATE})().shown", timeout=5_000)
        else:
            assert not state["shown"], f"the sidebar covers the page at {width} px before any click"
        button.click()
        page.wait_for_function(f"() => ({_SIDEBAR_STATE})().shown", timeout=5_000)
        if width < 992:  # the opened menu works: its links lead to chapters
            page.locator("#pst-primary-sidebar-modal nav.bd-docs-nav a", has_text="Measuring").first.click()
            page.wait_for_url("**/03_measuring_moe.html*")
        assert not tab.problems, tab.problems
    finally:
        tab.close()


def test_one_search_bar_on_desktop(browser, site):
    base, _ = site
    tab = _Tab(browser, base, width=1400, height=900)
    try:
        tab.page.goto(base + "02_sparse_gating.html", wait_until="load")
        state = tab.page.evaluate(_SIDEBAR_STATE)
    finally:
        tab.close()
    assert state["searchBars"] == 1, f"{state['searchBars']} search bars show at 1400 px"
