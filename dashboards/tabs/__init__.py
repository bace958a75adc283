"""The dashboard's tabs: one module each, a ``Tab`` (a ``pn.viewable.Viewer``) built on the session.

Adding a tab is one module here and one line in ``dashboards.app.TABS``: subclass ``Tab`` with a ``key``
(its value in the URL's ``tab=``) and a ``label``, build its layout in ``__panel__`` from ``self.session``
(the selection and the shared settings), and name in ``url_keys`` its own parameters that the URL keeps.
"""

from dashboards.tabs.base import Tab

__all__ = ["Tab"]
