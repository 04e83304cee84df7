"""The dashboard's routes: login and logout, then one page per view, each renderable whole or as its live part."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape

from edgefleet import __version__
from edgefleet.server.auth import SESSION_COOKIE, OperatorAuth, bearer_token
from edgefleet.server.build_reports import BuildReports
from edgefleet.server.context import ServerContext
from edgefleet.server.orchestrator import rollout_json
from edgefleet.server.routes.models import model_out
from edgefleet.server.ui import views

__all__ = ["EXPORT_STATUS_PATH", "ui_router"]

STATIC = Path(__file__).parent / "static"
EXPORT_STATUS_PATH = "/api/v1/export/status"
"""Shown as a tile on the fleet page when a router serves it (telemetry export)."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
POLL_MS = 2000


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("edgefleet.server.ui", "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["clock"] = lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
    env.filters["ago"] = _ago
    env.filters["num"] = lambda v, digits=3: "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else v
    env.filters["pct"] = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _local_next(value: str | None) -> str:
    """Where to go after the login: a dashboard path only (never another site)."""
    return value if value and value.startswith("/ui/") and "//" not in value and "\\" not in value else "/ui/fleet"


def ui_router(app: FastAPI, ctx: ServerContext, auth: OperatorAuth) -> None:
    """Add the dashboard's routes and static files to ``app``."""
    env = _environment()
    reports = BuildReports(ctx.artifacts.root / "reports")
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def session(request: Request) -> str | None:
        """The CSRF token for the page ('' with a bearer token), or None when the request is not logged in."""
        token = bearer_token(request)
        if token is not None:
            return "" if auth.token_ok(token) else None
        cookie = request.cookies.get(SESSION_COOKIE)
        return auth.sessions.csrf(cookie) if cookie and auth.sessions.valid(cookie) else None

    def guarded(request: Request) -> Response | None:
        """For a request that is not logged in, before any work: the login page (a redirect), or 401 for a
        page's live part."""
        if session(request) is not None:
            return None
        if request.query_params.get("fragment") == "1":
            return Response("login needed", status_code=401, headers=SECURITY_HEADERS)
        target = urlencode({"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")})
        return RedirectResponse(f"/ui/login?{target}", status_code=303, headers=SECURITY_HEADERS)

    def render(request: Request, name: str, title: str, **values: Any) -> Response:
        csrf = session(request) or ""
        fragment = request.query_params.get("fragment") == "1"
        template = env.get_template(name)
        context = {"title": title, "csrf": csrf, "version": __version__, "poll_ms": POLL_MS,
                   "export_status": any(getattr(r, "path", None) == EXPORT_STATUS_PATH for r in app.routes),
                   "path": request.url.path, **values}
        if fragment:
            html = "".join(template.blocks["content"](template.new_context(context)))
        else:
            html = template.render(context)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    @router.get("")
    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/fleet", status_code=303)

    @router.get("/login")
    def login_page(next: str | None = None) -> HTMLResponse:
        html = env.get_template("login.html").render(title="log in", next=_local_next(next), version=__version__)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    @router.post("/login")
    def login(request: Request) -> Response:
        """Trade the operator token (``Authorization: Bearer``, no body) for a session cookie."""
        token = bearer_token(request)
        if token is None:
            raise HTTPException(401, "missing bearer token")
        if not auth.token_ok(token):
            raise HTTPException(403, "wrong operator token")
        response = Response(status_code=204, headers=SECURITY_HEADERS)
        response.set_cookie(SESSION_COOKIE, auth.sessions.issue(), max_age=int(auth.sessions.lifetime_s),
                            path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @router.post("/logout")
    def logout(request: Request) -> Response:
        auth(request)  # a logged-in request with its CSRF token: no logging out from another site
        response = Response(status_code=204, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @router.get("/fleet")
    def fleet(request: Request, tag: str = "", profile: str = "", status: str = "", model: str = "", q: str = "",
              page: int = Query(1, ge=1, le=10**6), per_page: int = Query(100, ge=1, le=views.MAX_PER_PAGE)
              ) -> Response:
        if (redirect := guarded(request)) is not None:
            return redirect
        flt = views.FleetFilter(tag=tag, profile=profile, status=status, model=model, q=q)
        data = views.fleet_page(ctx.store, flt, page=page, per_page=per_page, now=time.time())

        def page_url(n: int) -> str:
            return "/ui/fleet?" + urlencode({**flt.query(), "page": n, "per_page": data.per_page})

        return render(request, "fleet.html", "fleet", fleet=data, flt=flt, page_url=page_url,
                      silent_after=views.SILENT_AFTER_S)

    @router.get("/devices/{device_id}")
    def device(request: Request, device_id: str, window: float = Query(3600.0, gt=0, le=30 * 86400)) -> Response:
        if (redirect := guarded(request)) is not None:
            return redirect
        d = ctx.store.get_device(device_id)
        if d is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        now = time.time()
        names = views.model_names(ctx.store)
        events = list(reversed(ctx.store.events(device_id)))[:100]
        return render(request, "device.html", f"device {device_id}", d=d, now=now, window=window,
                      desired=names.get(d.desired_model_id) if d.desired_model_id is not None else None,
                      shadow=names.get(d.desired_shadow_id) if d.desired_shadow_id is not None else None,
                      online=d.last_seen is not None and now - d.last_seen < views.SILENT_AFTER_S,
                      charts=views.device_charts(ctx.store, device_id, now - window), events=events)

    @router.get("/rollouts")
    def rollouts(request: Request) -> Response:
        if (redirect := guarded(request)) is not None:
            return redirect
        rows = [rollout_json(r, ctx.store, audit=False) for r in ctx.store.list_rollouts()]
        rows.sort(key=lambda r: r["created"], reverse=True)
        return render(request, "rollouts.html", "rollouts", rollouts=rows)

    @router.get("/rollouts/{rollout_id}")
    def rollout(request: Request, rollout_id: str) -> Response:
        if (redirect := guarded(request)) is not None:
            return redirect
        data = views.rollout_detail(ctx.store, rollout_id, time.time())
        if data is None:
            raise HTTPException(404, f"unknown rollout {rollout_id!r}")
        return render(request, "rollout.html", f"rollout {rollout_id}", r=data)

    @router.get("/models")
    def models(request: Request) -> Response:
        if (redirect := guarded(request)) is not None:
            return redirect
        running, desired = views.where_runs(ctx.store)
        rows = [{**model_out(m).model_dump(), "running": len(running.get(f"{m.name}@{m.version}", [])),
                 "desired": desired.get(f"{m.name}@{m.version}", 0), "report": reports.has(f"{m.name}@{m.version}")}
                for m in ctx.store.list_models()]
        rows.sort(key=lambda m: (m["name"], m["release"]), reverse=True)
        return render(request, "models.html", "models", models=rows)

    @router.get("/models/{name}/{version}")
    def model(request: Request, name: str, version: str) -> Response:
        if (redirect := guarded(request)) is not None:
            return redirect
        m = ctx.store.find_model(name, version)
        if m is None:
            raise HTTPException(404, f"unknown model {name}@{version}")
        ref = f"{name}@{version}"
        report = reports.get(ref)
        running, desired = views.where_runs(ctx.store)
        return render(request, "model.html", f"model {ref}", m=model_out(m), ref=ref, manifest=m.manifest,
                      report=report, plots=views.pareto_panels(report) if report else [],
                      running=sorted(running.get(ref, [])), desired=desired.get(ref, 0))

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
