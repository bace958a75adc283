"""Headless Chromium for the dashboard's browser tests and latency benchmark, and JavaScript that reads what
Bokeh actually plotted in the page.

Debian's Chromium, driven by Playwright (``playwright install`` cannot download browsers here). Imported as
``bench.browser`` by bench/dashboard_latency.py (run from the repository root: ``python -m
bench.dashboard_latency``) and by tests/test_dashboard_browser.py (pytest puts the repository root on the path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


def browser_missing_reason() -> str | None:
    """Why Chromium cannot be driven here, or None when it can."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


# --- reading the Bokeh document from the page ---------------------------------------------------------------

# All plotted float images (hv.Image -> bokeh Image glyph) with the title of their figure; rows are flipped
# with respect to the numpy array (bokeh's origin is bottom-left).
PLOTTED_IMAGES_JS = """() => {
  const doc = window.Bokeh?.documents?.[0];
  if (!doc) return [];
  const models = [...doc.all_models];
  const out = [];
  for (const fig of models.filter(m => m.type === 'Plot' || m.type === 'Figure')) {
    for (const r of fig.renderers) {
      if (r.type !== 'GlyphRenderer' || r.glyph.type !== 'Image') continue;
      const a = r.data_source.data.image?.[0];
      if (!a) continue;
      out.push({title: fig.title?.text ?? '', shape: a.shape, values: Array.from(a)});
    }
  }
  return out;
}"""

# A widget's value and visibility, by Bokeh model type and title.
WIDGET_VALUE_JS = """([type, title]) => {
  const doc = window.Bokeh?.documents?.[0];
  const m = doc && [...doc.all_models].find(m => m.type === type && m.title === title);
  return m ? {value: m.value, visible: m.visible} : null;
}"""

# True once a plotted image holds a map (not the 1 x 1 placeholder).
DOC_READY_JS = """() => {
  const doc = window.Bokeh?.documents?.[0];
  return !!doc && [...doc.all_models].some(m => m.type === 'GlyphRenderer' && m.glyph?.type === 'Image'
    && m.data_source.data.image?.[0]?.length > 1);
}"""


def plotted_images(page: Any) -> list[dict[str, Any]]:
    return page.evaluate(PLOTTED_IMAGES_JS)


def plotted_by_title(page: Any, prefix: str) -> dict[str, Any] | None:
    """The first plotted image whose figure title starts with ``prefix``."""
    return next((p for p in plotted_images(page) if p["title"].startswith(prefix)), None)
