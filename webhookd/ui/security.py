"""The dashboard's one middleware: every request passes the same checks, in this order.

1. Host allowlist (`dashboard.allowed_hosts`, port ignored): a DNS-rebinding page
   reaches us with its own host name and is refused before anything else.
2. Session: the cookie's token is looked up (hashed); a route that is not public
   answers 303 to the log-in page, with an empty body, when there is none.
3. POST only: Sec-Fetch-Site must be same-origin and Origin must name this host when
   the browser sends them (see origin_problem for `Origin: null`); the body must be a
   urlencoded form of at most MAX_FORM bytes; its `csrf` field must equal the session's
   token (or, on the log-in form, the log-in cookie's: a double submit), compared in
   constant time.

Whatever the handler answers or raises, the response gets the security headers
(CSP without inline script or style, frame-ancestors 'none', nosniff, no-referrer,
Cache-Control: no-store unless the handler set its own) and errors become HTML pages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

import structlog
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from webhookd.apimodel import ApiError
from webhookd.store.model import Conflict, NotFound, StoreError
from webhookd.ui.auth import Session, same

if TYPE_CHECKING:
    from webhookd.ui.app import Dashboard

log = structlog.get_logger("webhookd.ui")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_FORM = 64 * 1024
MAX_FIELDS = 200
SESSION_COOKIE = "webhookd_session"
LOGIN_COOKIE = "webhookd_login"  # the log-in form's CSRF double-submit value

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

SESSION_KEY = web.RequestKey("webhookd_ui_session", Session)
TOKEN_KEY = web.RequestKey("webhookd_ui_token", str)
FORM_KEY = web.RequestKey("webhookd_ui_form", MultiDictProxy[str])

PUBLIC_ROUTES = frozenset({"login", "login-post", "login-link", "static"})


class FormError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def session_of(request: web.Request) -> Session | None:
    return request.get(SESSION_KEY)


def form_of(request: web.Request) -> MultiDictProxy[str]:
    return request[FORM_KEY]


def host_name(host: str) -> str:
    """The name part of a Host header value, lowercased, without port or brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def origin_problem(request: web.Request) -> str | None:
    """Why a POST looks cross-site, or None.

    Sec-Fetch-Site, when sent, must be same-origin. Origin, when it names an origin, must
    be this host. Our pages' Referrer-Policy: no-referrer makes browsers send
    `Origin: null` on their own forms, so a null Origin passes only with Sec-Fetch-Site:
    same-origin. Requests with neither header (non-browser clients) pass: the CSRF token
    still has to be right."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() != "same-origin":
        return f"This form was sent from another site (Sec-Fetch-Site: {site}); it was refused."
    origin = request.headers.get("Origin")
    if origin is None or (origin.strip() == "null" and site is not None):
        return None
    netloc = urlsplit(origin.strip()).netloc.lower() if origin.strip() != "null" else ""
    if not netloc or netloc != request.headers.get("Host", "").strip().lower():
        return "This form was sent from another origin; it was refused."
    return None


async def read_form(request: web.Request) -> MultiDictProxy[str]:
    ctype = request.content_type if request.body_exists else ""
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise FormError(413, f"The form is larger than {MAX_FORM // 1024} KiB.")
    if not request.body_exists:
        return MultiDictProxy(MultiDict())
    if ctype != "application/x-www-form-urlencoded":
        raise FormError(415, "Forms must be sent as application/x-www-form-urlencoded.")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_FORM:
            raise FormError(413, f"The form is larger than {MAX_FORM // 1024} KiB.")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "The form could not be read (bad encoding or too many fields).") from None
    return MultiDictProxy(MultiDict(pairs))


class Guard:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash
        self.allowed_hosts = frozenset(h.strip("[]").lower().rstrip(".") for h in dash.cfg.allowed_hosts)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        dash = self.dash
        try:
            response = await self._checked(request, handler)
        except web.HTTPException as exc:
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = dash.error(request, exc.status, _MESSAGES.get(exc.status, exc.reason), headers=headers)
        except FormError as exc:
            response = dash.error(request, exc.status, exc.message)
        except NotFound as exc:
            response = dash.error(request, 404, str(exc))
        except Conflict as exc:
            response = dash.error(request, 409, str(exc))
        except ApiError as exc:
            response = dash.error(request, exc.status, exc.message)
        except StoreError as exc:
            response = dash.error(request, 503, f"The database could not answer: {exc}. Try again shortly.")
        except Exception:
            log.exception("dashboard request failed", path=request.path)
            response = dash.error(request, 500, "Something went wrong on the server; the log has the details.")
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if host_name(host) not in self.allowed_hosts:
            return web.Response(
                status=421, content_type="text/plain",
                text=f"This dashboard answers only for the host names in dashboard.allowed_hosts, "
                     f"not {host_name(host)!r}. Add it there if it is yours.\n",
            )
        token = request.cookies.get(SESSION_COOKIE)
        session = self.dash.sessions.get(token)
        if session is not None and token is not None:
            request[SESSION_KEY] = session
            request[TOKEN_KEY] = token
        public = request.match_info.route.name in PUBLIC_ROUTES
        if session is None and not public:
            return see_other(f"{self.dash.prefix}/login")
        if session is not None and not session.principal.admin and not public:
            who = None
            if session.token_hash is not None and self.dash.tokens is not None:
                who = await self.dash.tokens.principal_by_hash(session.token_hash)
            if who is None:  # revoked since the log-in: the session ends now
                self.dash.sessions.revoke(token)
                return see_other(f"{self.dash.prefix}/login")
            kind = ui_route_class(request, self.dash.prefix)
            if kind == "admin":
                raise web.HTTPNotFound()  # the page of an unknown address
            if kind == "write" and who.read_only:
                return self.dash.error(request, 403, "This API token is read-only.")
        if request.method == "POST":
            problem = origin_problem(request)
            if problem is not None:
                return self.dash.error(request, 403, problem)
            form = await read_form(request)
            request[FORM_KEY] = form
            expected = session.csrf if session is not None else request.cookies.get(LOGIN_COOKIE, "")
            if not expected or not same(form.get("csrf", ""), expected):
                return self.dash.error(
                    request, 403, "The form's security token is missing or out of date. "
                                  "Go back, reload the page and send the form again.",
                )
        return await handler(request)


# Who may open each dashboard route with a scoped API token's session (the admin's
# sessions open every one): "read", "write" (not with a read-only token) or "admin" (the
# page of an unknown address). A route missing here is admin-only; tests/test_tokens.py
# fails for a route that is not classified. Every view reaches webhooks and deliveries
# through the Dashboard's principal view (webhook, webhooks, scoped_where, check_delivery).
UI_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/login"): "read", ("POST", "/login"): "read", ("GET", "/login/{token}"): "read",
    ("POST", "/logout"): "read", ("GET", "/static/{version}/{name}"): "read", ("GET", ""): "read",
    ("GET", "/"): "read",
    ("GET", "/chart.svg"): "admin",  # attempts of every webhook
    ("GET", "/webhooks"): "read",
    ("GET", "/webhooks/new"): "write", ("POST", "/webhooks/new"): "write",
    ("GET", "/webhooks/{id}"): "read", ("POST", "/webhooks/{id}"): "write",
    ("POST", "/webhooks/{id}/disable"): "write",
    ("GET", "/webhooks/{id}/enable"): "write", ("POST", "/webhooks/{id}/enable"): "write",
    ("POST", "/webhooks/{id}/test"): "write",
    ("POST", "/webhooks/{id}/secret"): "write",  # the signing secret: not for a read-only token
    ("POST", "/webhooks/{id}/rotate-secret"): "write",
    ("GET", "/webhooks/{id}/replay"): "write", ("POST", "/webhooks/{id}/replay"): "write",
    ("GET", "/webhooks/{id}/delete"): "write", ("POST", "/webhooks/{id}/delete"): "write",
    ("GET", "/deliveries"): "read", ("GET", "/deliveries/rows"): "read",
    ("GET", "/deliveries/retry-failed"): "write", ("POST", "/deliveries/retry-failed"): "write",
    ("GET", "/deliveries/{id}"): "read", ("POST", "/deliveries/{id}/retry"): "write",
}


def ui_route_class(request: web.Request, prefix: str) -> str:
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return "admin"
    return UI_ROUTES.get((route.method, resource.canonical.removeprefix(prefix)), "admin")


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


_MESSAGES = {
    404: "There is no page at this address.",
    405: "This address does not take that method.",
    413: f"The form is larger than {MAX_FORM // 1024} KiB.",
}
