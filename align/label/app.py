"""The web pages: FastAPI routes over a Task (the items, the queue and the journal).

    GET  /                    the name form, or (with ?annotator=NAME) that annotator's next item
    POST /answer              one answer: appended and fsync'ed (store.Journal), then a redirect to the next item
    GET  /static/...          the page's CSS and JS, served from this package (no CDN: works without a network)

Model output is shown as text: Jinja escapes every value (autoescape), and the Content-Security-Policy allows
scripts from this server's /static only, so markup in a response can neither render nor run.
With a token (required when --host is not loopback) every request must carry it, as ?token=... once (a cookie
keeps it) or the cookie itself. On loopback, requests must name a loopback host (a page elsewhere that resolves its
own name to 127.0.0.1, DNS rebinding, gets 400), and a POST whose Origin is another site gets 403 (no cross-site
answers, token or not).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from .store import Item, Journal, Queue, check_annotator, shown_order

HERE = Path(__file__).parent
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COOKIE = "align_label_token"
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                      "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


@dataclass
class Task:
    kind: str
    """rank or compare."""
    items: list[Item]
    journal: Journal
    queue: Queue
    token: Optional[str] = None
    title: str = ""
    hosts: Optional[set[str]] = None
    """Host names requests may address (None: any; the token guards a server on the network)."""


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class BadAnswer(ValueError):
    """An answer the server cannot record (the page is shown again with the reason)."""


def build_app(task: Task) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)

    @app.middleware("http")
    async def same_site(request: Request, call_next):
        host = request.headers.get("host", "")
        if task.hosts is not None and urlsplit(f"//{host}").hostname not in task.hosts:
            return Response("unknown host", status_code=400)
        origin = request.headers.get("origin")
        if request.method == "POST" and origin and urlsplit(origin).netloc != host:
            return Response("cross-site answers are refused", status_code=403)
        return await call_next(request)

    def page(template: str, status: int = 200, **values) -> HTMLResponse:
        html = env.get_template(template).render(kind=task.kind, title=task.title, **values)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def allowed(request: Request) -> bool:
        if task.token is None:
            return True
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        return secrets.compare_digest(given.encode(), task.token.encode())

    def with_cookie(response: Response, request: Request) -> Response:
        if task.token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, task.token, httponly=True, samesite="strict")
        return response

    def item_page(annotator: str, item: Item, error: str = "", status: int = 200) -> HTMLResponse:
        order = shown_order(item, annotator)
        shown = [{"letter": LETTERS[i], "text": item.texts[j]} for i, j in enumerate(order)]
        return page(f"{task.kind}.html", status, annotator=annotator, item=item, shown=shown, error=error,
                    shown_at=f"{time.time():.3f}", progress=task.queue.progress(annotator))

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, annotator: str = ""):
        if not allowed(request):
            return page("message.html", 403, heading="A token is needed",
                        text="Open the address the server printed (it ends in ?token=...).")
        if not annotator:
            return with_cookie(page("entry.html", error="", name=""), request)
        try:
            annotator = check_annotator(annotator)
        except ValueError as err:
            return page("entry.html", 400, error=str(err), name=annotator)
        item = task.queue.next(annotator)
        if item is None:
            return with_cookie(page("message.html", heading=f"All done, {annotator}",
                                    text=done_text(task.queue.progress(annotator))), request)
        return with_cookie(item_page(annotator, item), request)

    @app.post("/answer")
    async def answer(request: Request):
        if not allowed(request):
            return page("message.html", 403, heading="A token is needed", text="Open the address the server printed.")
        form = await request.form()
        try:
            annotator = check_annotator(str(form.get("annotator", "")))
        except ValueError as err:
            return page("entry.html", 400, error=str(err), name="")
        item = task.queue.by_id.get(str(form.get("item", "")))
        if item is None:
            return page("message.html", 400, heading="Unknown item", text="Reload the page to get the next one.")
        if item.id not in task.queue.seen[annotator]:  # a second submit of the same page records nothing
            try:
                record = make_answer(task.kind, item, annotator, form)
            except BadAnswer as err:
                return item_page(annotator, item, str(err), 400)
            try:
                task.journal.append(record)  # on disk before the next page is sent
            except OSError as err:
                return item_page(annotator, item, f"Not saved ({err}); tell whoever runs the server.", 503)
            task.queue.record(record)
        return RedirectResponse("/?" + urlencode({"annotator": annotator}), status_code=303)

    return app


def done_text(progress: dict) -> str:
    return (f"You answered {progress['mine']} items; {progress['complete']} of {progress['total']} items have all "
            f"the answers they need. Nothing is left for you to do now.")


def make_answer(kind: str, item: Item, annotator: str, form) -> dict:
    """The line written for one submitted form: the ranking format (rank) or a verdict (compare), with who, when,
    how long the item was on screen, and the order the responses were shown in (indices into `responses`)."""
    order = shown_order(item, annotator)
    action = str(form.get("action", ""))
    try:
        seconds = round(max(0.0, time.time() - float(form.get("shown_at", ""))), 1)
    except ValueError:
        seconds = None
    shown = order if kind == "rank" else [item.policies[j] for j in order]  # compare: names, e.g. [baseline, candidate]
    common = {"item": item.id, "annotator": annotator,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds, "shown": shown}
    if kind == "rank":
        base = {"prompt": item.prompt, "responses": item.responses, "policies": item.policies}
    else:
        base = {"prompt": item.prompt, "candidate": item.responses[0], "baseline": item.responses[1],
                "reward_candidate": item.rewards[0], "reward_baseline": item.rewards[1]}
    if action == "skip":
        return {"label": "skip", **base, **common}
    if action == "flag":
        reason = str(form.get("reason", "")).strip()
        if not reason:
            raise BadAnswer("Say what is unsafe or broken before flagging.")
        return {"label": "flag", **base, "reason": reason[:2000], **common}
    if kind == "rank" and action == "rank":
        given = {}
        for pos, j in enumerate(order):
            value = form.get(f"rank_{LETTERS[pos]}")
            if value is None or not str(value).isdigit() or not 1 <= int(value) <= len(order):
                raise BadAnswer(f"Give response {LETTERS[pos]} a rank from 1 to {len(order)}.")
            given[j] = int(value)
        raw = [given[j] for j in range(len(order))]
        dense = {v: r for r, v in enumerate(sorted(set(raw)), 1)}  # 1, 1, 3 -> 1, 1, 2: ties kept, gaps closed
        return {"label": "rank", **base, "ranks": [dense[v] for v in raw], **common}
    if kind == "compare" and action in ("", "verdict"):  # the A / tie / B buttons send only `choice`
        choice = str(form.get("choice", ""))
        if choice == "tie":
            verdict = "tie"
        elif choice in ("A", "B"):
            verdict = ("candidate", "baseline")[order[LETTERS.index(choice)]]
        else:
            raise BadAnswer("Choose A, B or tie.")
        return {"label": "verdict", **base, "verdict": verdict, **common}
    raise BadAnswer(f"Unknown action {action!r}.")
