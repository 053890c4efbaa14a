"""``%pilot dashboard``: the gateway's web dashboard from a notebook.

Shows a link that logs in once (``pilot dashboard``'s) and, where the front end draws HTML
(JupyterLab, Notebook, VS Code), the dashboard itself in an IFrame, logged in with a second
link (each link logs in once). A front end that shows only text gets the link as text. The
gateway's page allows being framed by pages of ``localhost`` and ``127.0.0.1`` only (its
Content-Security-Policy); elsewhere the link still works.
"""

from __future__ import annotations

import html
from typing import Any

from IPython.core.error import UsageError
from IPython.display import display

from gateway.client import Client, dashboard_link

__all__ = ["show_dashboard"]

FRAME_HEIGHT_PX = 560


def show_dashboard(client: Client, embed: bool = True) -> None:
    link = dashboard_link(client).url
    if not link:
        raise UsageError("This gateway runs without a dashboard (it was started --http-port none).")
    url = html.escape(link, quote=True)
    page = f'<a href="{url}" target="_blank" rel="noopener">Open the Parallel Pilot dashboard</a>'
    if embed:
        frame = html.escape(dashboard_link(client).url, quote=True)
        page += (
            f'<br><iframe src="{frame}" width="100%" height="{FRAME_HEIGHT_PX}" '
            'style="border:1px solid #ddd;border-radius:6px"></iframe>'
        )
    bundle: dict[str, Any] = {
        "text/plain": f"Parallel Pilot dashboard (the link logs in once): {link}",
        "text/html": page,
    }
    display(bundle, raw=True)
