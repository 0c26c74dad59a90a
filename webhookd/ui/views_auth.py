"""Log-in (admin token or one-time link) and log-out."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from webhookd.tokens import ADMIN, Principal, token_hash
from webhookd.tokens import PREFIX as TOKEN_PREFIX
from webhookd.ui.auth import client_bucket, new_token, same
from webhookd.ui.security import LOGIN_COOKIE, SESSION_COOKIE, TOKEN_KEY, form_of, session_of

if TYPE_CHECKING:
    from webhookd.ui.app import Dashboard

log = structlog.get_logger("webhookd.ui")

_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")

LOGIN_OFF = ("Log-in with the admin token is off: admin.token is not set. Run `webhookd dashboard` "
            "on the server for a one-time log-in link.")
BAD_LINK = ("This log-in link is not valid: it was already used, has expired or was mistyped. "
            "Run `webhookd dashboard` on the server for a new one.")


class AuthViews:
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/login", self.login_form, name="login")
        r.add_post("/login", self.login, name="login-post")
        r.add_get("/login/{token}", self.link, name="login-link")
        r.add_post("/logout", self.logout)

    def _cookie_path(self) -> str:
        return self.dash.prefix

    def _form(self, request: web.Request, *, error: str | None = None, status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
        """The log-in page, with a fresh double-submit value for its CSRF field."""
        csrf = request.cookies.get(LOGIN_COOKIE, "")
        if not _TOKEN_SHAPE.fullmatch(csrf):
            csrf = new_token()
        response = self.dash.page(
            request, "login.html",
            {"login_csrf": csrf, "token_login": bool(self.dash.admin_token), "error": error,
             "link_minutes": max(1, round(self.dash.cfg.login_link_ttl / 60))},
            status=status, headers=headers,
        )
        response.set_cookie(LOGIN_COOKIE, csrf, path=self._cookie_path(), max_age=3600, httponly=True,
                            samesite="Strict", secure=request.secure)
        return response

    def _blocked(self, request: web.Request) -> web.Response | None:
        found = self.dash.failed_logins.blocked(client_bucket(request.remote))
        if found is None:
            return None
        which, wait = found
        whom = "from this address" if which == "client" else "in all"
        message = f"Too many failed log-ins {whom}. Wait {wait:.0f} seconds and try again."
        return self._form(request, error=message, status=429, headers={"Retry-After": str(int(wait) + 1)})

    def _failed(self, request: web.Request, method: str) -> None:
        client = client_bucket(request.remote)
        self.dash.failed_logins.failed(client)
        log.warning("dashboard log-in failed", method=method, client=client)

    def _start_session(self, request: web.Request, method: str, principal: Principal = ADMIN,
                       hashed: str | None = None) -> web.Response:
        self.dash.sessions.revoke(request.cookies.get(SESSION_COOKIE))  # no fixation: always a new token
        token, _session = self.dash.sessions.create(principal, hashed)
        log.info("dashboard log-in", method=method, client=client_bucket(request.remote))
        response = self.dash.redirect("/")
        response.set_cookie(SESSION_COOKIE, token, path=self._cookie_path(), max_age=int(self.dash.cfg.session_ttl),
                            httponly=True, samesite="Strict", secure=request.secure)
        response.del_cookie(LOGIN_COOKIE, path=self._cookie_path())
        return response

    async def login_form(self, request: web.Request) -> web.Response:
        if session_of(request) is not None:
            return self.dash.redirect("/")
        return self._form(request, error=None if self.dash.admin_token else LOGIN_OFF)

    async def login(self, request: web.Request) -> web.Response:
        blocked = self._blocked(request)
        if blocked is not None:
            return blocked
        if not self.dash.admin_token:
            return self._form(request, error=LOGIN_OFF, status=403)
        given = form_of(request).get("token", "").strip()
        if given.startswith(TOKEN_PREFIX) and self.dash.tokens is not None:
            who = await self.dash.tokens.principal(given)
            if who is None:
                self._failed(request, "scoped token")
                return self._form(request, error="That is not a valid API token.", status=403)
            return self._start_session(request, "scoped token", who, token_hash(given))
        if not given or not same(given, self.dash.admin_token):
            self._failed(request, "token")
            return self._form(request, error="That is not the admin token.", status=403)
        return self._start_session(request, "token")

    async def link(self, request: web.Request) -> web.Response:
        blocked = self._blocked(request)
        if blocked is not None:
            return blocked
        if not self.dash.links.consume(request.match_info["token"]):
            self._failed(request, "link")
            return self._form(request, error=BAD_LINK, status=403)
        return self._start_session(request, "link")

    async def logout(self, request: web.Request) -> web.Response:
        self.dash.sessions.revoke(request.get(TOKEN_KEY))
        log.info("dashboard log-out", client=client_bucket(request.remote))
        response = self.dash.redirect("/login")
        response.del_cookie(SESSION_COOKIE, path=self._cookie_path())
        return response
