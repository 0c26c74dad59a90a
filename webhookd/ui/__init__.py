"""The web dashboard, served by the daemon under /ui/ on the admin listeners.

    dashboard = Dashboard(ops, storage, config.dashboard, production=..., admin_token=...)
    admin_app.add_subapp("/ui/", dashboard.app())      # one app per listener, shared state
    dashboard.create_login_link()                      # POST /v1/dashboard/links

Modules: app (the Dashboard, page helpers), security (the middleware: Host allowlist,
sessions, CSRF and Origin checks, security headers, HTML errors), auth (sessions, one-time
links, failed log-in limiter), render (Jinja2 and static files), forms (form and query
parsing onto the API's validators), present (labels), chart (SVG), snippets (verification
code and the rebuilt request headers), views_* (the screens).
"""

from webhookd.ui.app import Dashboard

__all__ = ["Dashboard"]
