"""What the dashboard shows instead of the explorer, and the notes above it, when the warehouse cannot be
shown in full: an empty or missing warehouse (with the command that fills it), a location that is not a
local path, a warehouse that cannot be read (what failed, never a traceback), partitions left out."""

from __future__ import annotations

import panel as pn
import param

from ssl_attention.warehouse.paths import DEFAULT_WAREHOUSE

TITLE = "SSL attention: fused and individual heads"
FILL_COMMAND = "ssl-attention run --images data/samples --models all --weights random"
POINT_ELSEWHERE = "`$SSL_ATTENTION_WAREHOUSE` or `ssl-attention serve --warehouse DIR`"


def empty_warehouse_markdown(warehouse: str, detail: str = "") -> str:
    """The message shown instead of the dashboard when there is nothing to show."""
    extra = f"\n\n_Detail: {detail}_" if detail else ""
    return (
        "## No attention maps yet\n\n"
        f"The warehouse at `{warehouse}` is empty or missing. Fill it with the bundled sample images "
        "(offline, random weights):\n\n"
        f"```bash\n{FILL_COMMAND} --warehouse {warehouse}\n```\n\n"
        f"then reload this page. Point the dashboard at another warehouse with {POINT_ELSEWHERE}.{extra}"
    )


def unsupported_warehouse_markdown(location: str, detail: str = "") -> str:
    """The message shown when the warehouse location is not one the dashboard can read (``s3://`` ...)."""
    extra = f"\n\n_Detail: {detail}_" if detail else ""
    return (
        "## Unsupported warehouse location\n\n"
        f"`{location}` is not a location the dashboard can read: the warehouse must be a local path or a "
        "`file://` URL (object stores need the setup in docs/scaling.md). Point the dashboard at a local "
        f"warehouse with {POINT_ELSEWHERE}, filled for example with the bundled sample images (offline, random "
        "weights):\n\n"
        f"```bash\n{FILL_COMMAND} --warehouse {DEFAULT_WAREHOUSE}\n```\n\n"
        f"then reload this page.{extra}"
    )


def skipped_markdown(root: str, skipped: dict[str, str]) -> str:
    """Which model/method maps could not be read when the dashboard opened, and why."""
    lines = "".join(f"\n- **{key}**: `{why.replace('`', chr(39))}`" for key, why in sorted(skipped.items()))
    return (
        f"Some maps in the warehouse at `{root}` could not be read and are not offered:{lines}\n\n"
        "Re-run the extraction for these models (`ssl-attention run --images DIR --models MODEL --warehouse "
        f"{root}`) to rewrite their files."
    )


def _page(message: str, alert_type: str) -> pn.viewable.Viewable:
    return pn.Column(
        pn.pane.Markdown(f"## {TITLE}"),
        pn.pane.Alert(message, alert_type=alert_type),
        sizing_mode="stretch_width",
    )


class EmptyWarehouse(pn.viewable.Viewer):
    """Shown instead of the explorer when there is nothing to explore (never a traceback)."""

    warehouse = param.String(default="", doc="the location as given (a path, a URL)")
    detail = param.String(default="")
    unsupported = param.Boolean(default=False, doc="the location is not a local path or file:// URL")

    def message(self) -> str:
        if self.unsupported:
            return unsupported_warehouse_markdown(self.warehouse, self.detail)
        return empty_warehouse_markdown(self.warehouse, self.detail)

    def __panel__(self) -> pn.viewable.Viewable:
        return _page(self.message(), "info")


class WarehouseProblem(pn.viewable.Viewer):
    """Shown instead of the explorer when the warehouse cannot be read (a damaged file, an unexpected error):
    what failed, which warehouse, the error in one line — never a traceback (that goes to the server log)."""

    warehouse = param.String(default="")
    failed = param.String(default="", doc="what the dashboard was doing, e.g. 'reading the list of models'")
    error = param.String(default="", doc="the error in one line")

    def message(self) -> str:
        error = self.error.replace("`", "'")
        return (
            "## The warehouse cannot be read\n\n"
            f"The dashboard failed while {self.failed} from the warehouse at `{self.warehouse}`:\n\n"
            f"`{error}`\n\n"
            "A file may be damaged or half-written. Re-run the extraction to rewrite it "
            f"(`ssl-attention run --images DIR --warehouse {self.warehouse}`), or point the dashboard at another "
            f"warehouse with {POINT_ELSEWHERE}, then reload this page. The server log has the details."
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return _page(self.message(), "danger")
