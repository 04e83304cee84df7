"""The operator dashboard under ``/ui``: server-rendered pages (Jinja2) with a little vanilla JavaScript and CSS
shipped in this package (``static/``), never fetched from elsewhere.

Pages: fleet, device, rollouts (with pause, resume and abort calling the REST API), models (manifest, build
report with its Pareto plot, where each version runs). Each page polls itself for a fresh copy of its content
(``?fragment=1``) so that it updates without a reload. The login page trades the operator token for a session
cookie (:mod:`edgefleet.server.auth`); every other page needs it (or the bearer token).
"""

from edgefleet.server.ui.pages import ui_router

__all__ = ["ui_router"]
