"""The selection in the URL, both ways, and the browser's history in step with the view.

Panel's ``Location`` pushes a history entry for every URL it is given and listens to ``hashchange`` only, not
to ``popstate``: after Back the address bar showed one view and the page another. ``BrowserUrl`` owns the
URL instead. The browser reports its query when the page is up and on every Back/Forward; the server shows
that view, and answers with the URL to write:

- the first change of the view after a pause pushes an entry at once, so Back, even right away, returns
  to the view before; further changes replace that entry once the view has been still (``sync_url``);
- a reported URL that the server had to complete or correct (missing or invalid values) is replaced, not
  pushed: a normalisation is not a navigation, and Back must not land on a URL that pushes again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

import panel as pn
import param
from bokeh.document import Document
from panel.custom import JSComponent
from panel.util import parse_query

URL_DELAY_MS = 400  # a view change is written to the URL once the view has not changed for this long


class UrlView(Protocol):
    def query(self) -> dict[str, str]: ...

    def apply_query(self, query: Mapping[str, Any]) -> None: ...


class BrowserUrl(JSComponent):
    """Invisible: reports the browser's query (when rendered, and on Back/Forward) and writes the URLs it is
    sent, as a new history entry (``push``) or in place of the current one."""

    # Idempotent if rendered again: one popstate listener per page and one message handler per model.
    # A write is skipped when the page no longer shows the URL it was based on: Back/Forward came first, and
    # the report of the new URL is on its way to the server, which then writes again from there.
    _esm = """
    let listener = null
    const handled = new WeakSet()
    export function render({ model }) {
      if (listener) window.removeEventListener("popstate", listener)
      listener = () => model.send_msg(window.location.search)
      window.addEventListener("popstate", listener)
      if (!handled.has(model)) {
        handled.add(model)
        model.on("msg:custom", ({ search, push, base }) => {
          if (window.location.search !== base) return
          const url = search + window.location.hash
          if (push) window.history.pushState(null, "", url)
          else window.history.replaceState(window.history.state, "", url)
        })
      }
      listener()
    }
    """

    def __init__(self, **params: Any) -> None:
        super().__init__(**{"width": 0, "height": 0, "margin": 0, **params})
        self.on_report: Callable[[str], None] | None = None

    def _handle_msg(self, data: Any) -> None:
        if isinstance(data, str) and self.on_report is not None:
            self.on_report(data)

    def write(self, search: str, push: bool, base: str) -> None:
        """Show ``search`` (a new history entry if ``push``), if the page still shows ``base``."""
        self._send_msg({"search": search, "push": push, "base": base})


def sync_url(
    viewer: UrlView,
    browser: BrowserUrl,
    opened: Mapping[str, Any],
    watched: Sequence[tuple[param.Parameterized, Sequence[str]]],
) -> None:
    """Show the view of the query the session was opened with, then keep the browser's URL and the view in
    step: ``viewer.query()`` is the URL of the view, ``watched`` the (object, parameter names) it depends on."""
    viewer.apply_query(opened)
    shown: str | None = None  # the browser's query; None until it has reported it (nothing can be written)
    following = False  # the view is changing to follow the browser's URL: nothing to push
    pending = False
    changed_at = 0.0

    def write(push: bool) -> None:
        nonlocal shown, pending
        pending = False
        if shown is None:
            return
        current = dict(parse_qsl(shown.lstrip("?")))
        wanted = viewer.query()
        if all(current.get(k) == v for k, v in wanted.items()):
            return
        base, shown = shown, "?" + urlencode({**current, **wanted})  # all keys, also those the link did not carry
        browser.write(shown, push, base)

    def reported(search: str) -> None:
        """The browser shows ``search`` (page up, Back or Forward): show its view, then complete the URL."""
        nonlocal shown, following
        shown = search
        current = dict(parse_qsl(search.lstrip("?")))
        if {k: current.get(k) for k in viewer.query()} != viewer.query():
            following = True
            try:
                viewer.apply_query(parse_query(search))  # typed as the opening query was; bad values fall back
            finally:
                following = False
        write(push=False)

    def write_when_quiet(doc: Document) -> None:
        quiet_ms = (time.monotonic() - changed_at) * 1000
        if quiet_ms < URL_DELAY_MS:
            doc.add_timeout_callback(partial(write_when_quiet, doc), max(1, round(URL_DELAY_MS - quiet_ms)))
        else:
            write(push=False)  # the burst's entry was pushed at its first change

    def write_soon(*_: Any) -> None:
        """Push an entry at the first change of a burst, then replace it with the view once the view has not
        changed for URL_DELAY_MS. A URL change costs the browser work: written on every click, it competed
        with drawing the next maps; while a user clicks through heads or layers only the last view needs it."""
        nonlocal pending, changed_at
        if following:
            return
        changed_at = time.monotonic()
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            write(push=True)
        elif not pending:
            write(push=True)
            pending = True
            doc.add_timeout_callback(partial(write_when_quiet, doc), URL_DELAY_MS)

    browser.on_report = reported
    for owner, names in watched:
        owner.param.watch(write_soon, list(names))
