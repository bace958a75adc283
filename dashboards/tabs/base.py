"""What every tab is: a ``pn.viewable.Viewer`` over the session, with a key, a label and its URL keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import panel as pn
import param

from dashboards.session import Session
from dashboards.state import Selection


class Tab(pn.viewable.Viewer):
    """One tab of the explorer. Subclasses set ``key`` and ``label`` and build their layout in ``__panel__``.

    The open tab is ``session.tab``; a tab whose views are costly to redraw follows the selection only while it
    is open (``is_open``; in a function bound to ``session.param.tab``, ``skip_unless_open`` keeps the last
    output), since the page keeps a visited tab's plots alive."""

    key: ClassVar[str]  # the tab's value in the URL (``tab=...``)
    label: ClassVar[str]  # its title
    url_keys: ClassVar[Mapping[str, str]] = {}  # URL key -> parameter of the tab, kept in the URL

    def __init__(self, session: Session, **params: Any) -> None:
        super().__init__(**params)
        self.session = session
        if self.url_keys:
            session.add_url_keys(self, self.url_keys, self.from_url)

    def from_url(self, name: str, value: Any) -> Any:
        """The value of parameter ``name`` a URL value stands for (the value itself unless overridden)."""
        return value

    def shown_models(self, selection: Selection) -> list[str]:
        """The models whose maps the tab shows (the random-weights banner names those with random weights)."""
        return [selection.model]

    @property
    def is_open(self) -> bool:
        return self.session.tab == self.key

    def skip_unless_open(self, tab: str) -> None:
        if tab != self.key:
            raise param.Skip

    def __panel__(self) -> pn.viewable.Viewable:
        raise NotImplementedError(f"{type(self).__name__} must build its layout in __panel__")
