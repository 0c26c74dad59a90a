"""docs/monitoring/: the Prometheus alert rules and the Grafana dashboard, against promtool,
a real Prometheus, and a running daemon's /metrics.

- the rules pass `promtool check rules`, and their unit tests (`promtool test rules
  docs/monitoring/tests/webhookd-alerts.test.yml`) pass;
- every metric name (and label) the rules and the dashboard use is served by a real
  `webhookd serve` that has seen an event, a failed attempt, an intake rejection and a
  tracking hit, scraped over admin.http_listen with the admin token as a bearer, as
  docs/monitoring/README.md says;
- a real Prometheus, configured as the README says, scrapes that daemon, loads the rules
  and evaluates every dashboard query;
- webhookd_oldest_pending_age_seconds follows the daemon's clock (a fake one), and time
  on the real daemon.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it).
Without them those tests are skipped, unless WEBHOOKD_REQUIRE_PROMTOOL=1 (CI), where
that is an error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Harness, event, eventually, free_port, make_config
from tests.test_process import Proc, ThreadReceiver, wait_until
from webhookd.daemon import Daemon
from webhookd.reasons import INTAKE_REASONS
from webhookd.store import DELIVERY_STATUSES

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "docs" / "monitoring"
RULES = MONITORING / "webhookd-alerts.yml"
RULE_TESTS = MONITORING / "tests" / "webhookd-alerts.test.yml"
DASHBOARD = MONITORING / "webhookd-grafana.json"
TOKEN = "monitoring-test-admin-token-0123456789"
REQUIRE_PROMTOOL = os.environ.get("WEBHOOKD_REQUIRE_PROMTOOL") == "1"

NAME = re.compile(r"\bwebhookd_[a-z0-9_]*[a-z0-9]\b")
SELECTOR = re.compile(r"\b(webhookd_[a-z0-9_]+)\{([^{}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BY = re.compile(r"\bby \(([a-z_, ]+)\) \(\s*(?:[a-z_]+\()?(webhookd_[a-z0-9_]+)")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
# label values a rule may name that a quiet daemon does not have a sample of yet
KNOWN_VALUES = {
    "reason": {r.value for r in INTAKE_REASONS},
    "status": set(DELIVERY_STATUSES),
    "state": {"enabled", "disabled"},
}


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        message = f"{name} is missing (apt-get install prometheus)"
        if REQUIRE_PROMTOOL:
            pytest.fail(message + "; WEBHOOKD_REQUIRE_PROMTOOL=1")
        pytest.skip(message)
    return path


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: the panels' and the variables' queries."""
    variables = [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return dashboard_exprs() + variables


def concrete(expr: str) -> str:
    """A dashboard query as Grafana sends it, with every host selected."""
    return expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"')


def rules_text() -> str:
    return RULES.read_text()


# -- the files themselves -----------------------------------------------------------------------
def test_promtool_checks_the_rules() -> None:
    p = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS: 9 rules found" in p.stdout, p.stdout


def test_the_rules_unit_tests_pass() -> None:
    p = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_every_alert_has_a_severity_and_names_its_host() -> None:
    text = rules_text()
    alerts = re.findall(r"^      - alert: (\w+)$", text, re.M)
    assert len(alerts) == 9 and len(set(alerts)) == 9
    blocks = re.split(r"^      - alert: ", text, flags=re.M)[1:]
    for block in blocks:
        name = block.split("\n", 1)[0]
        assert re.search(r"severity: (critical|warning|info)$", block, re.M), name
        assert block.count("{{ $labels.instance }}") >= 2, f"{name}: summary and description name the host"
        readme = (MONITORING / "README.md").read_text()
        assert f"`{name}`" in readme, f"{name} is explained in docs/monitoring/README.md"


def test_the_dashboard_queries_every_host_through_its_variables() -> None:
    d = dashboard()
    assert d["schemaVersion"] == 39 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["multi"] is True and instance["includeAll"] is True
    assert instance["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = dashboard_panels()
    titles = [p["title"] for p in panels]
    assert len(set(titles)) == len(titles)
    ids = [p["id"] for p in d["panels"]]
    assert len(set(ids)) == len(ids)
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            for name, matchers in SELECTOR.findall(t["expr"]):
                assert 'instance=~"$instance"' in matchers, (p["title"], name)
    # what the dashboard was asked to show
    exprs = "\n".join(dashboard_exprs())
    for name in ("webhookd_events_received_total", "webhookd_intake_rejections_total",
                 "webhookd_delivery_attempts_total", "webhookd_attempt_duration_seconds_bucket",
                 "webhookd_deliveries", "webhookd_webhooks", "webhookd_in_flight", "webhookd_store_queue",
                 "webhookd_oldest_pending_age_seconds", "webhookd_tracking_hits_total"):
        assert re.search(rf"\b{name}\b", exprs), name


# -- against a running daemon ------------------------------------------------------------------------
def get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:  # loopback only
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def samples(text: str) -> tuple[dict[str, list[dict[str, str]]], set[str]]:
    """Sample name -> the label sets it has; and the families' names (without _total, _bucket ...)."""
    out: dict[str, list[dict[str, str]]] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out, families


class Fleet:
    """One `webhookd serve` as on an MTA host: admin.http_listen with a token, [tracking] on,
    a webhook whose receiver fails (retried an hour later: it stays pending)."""

    def __init__(self, proc: Proc, receiver: ThreadReceiver) -> None:
        self.proc = proc
        self.receiver = receiver
        self.admin_port = free_port()
        self.tracking_port = free_port()
        proc.write_config(
            {"retry_base": "1h", "retry_max": "4h"},
            tables=(
                f'[admin]\nhttp_listen = "127.0.0.1:{self.admin_port}"\ntoken = "{TOKEN}"\n'
                f'[tracking]\nenabled = true\nlisten = "127.0.0.1:{self.tracking_port}"\n'
                f'base_url = "http://127.0.0.1:{self.tracking_port}"\n'
            ),
        )
        self.metrics_url = f"http://127.0.0.1:{self.admin_port}/metrics"

    def start(self) -> Fleet:
        self.proc.start()
        self.receiver.status = 500
        self.proc.json("webhooks", "create", "--url", self.receiver.url)
        self.submitted = time.time()
        ok = self.proc.cli("submit", json.dumps(event("delivered", 1)))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        bad = self.proc.cli("submit", "{not json")
        assert bad.returncode == 65, bad.stdout + bad.stderr
        status, _ = get(f"http://127.0.0.1:{self.tracking_port}/o/not-a-token.gif")
        assert status == 200  # the pixel is always answered; the hit is counted as bad_token
        wait_until(lambda: 'outcome="http_status"' in self.scrape(), what="a failed attempt in /metrics")
        return self

    def scrape(self) -> str:
        status, text = get(self.metrics_url, TOKEN)
        assert status == 200, text
        return text


@pytest.fixture
def fleet(proc: Callable[..., Proc], thread_receiver: ThreadReceiver) -> Iterator[Fleet]:
    yield Fleet(proc(), thread_receiver).start()


def test_metrics_on_the_admin_tcp_listener_need_the_token(fleet: Fleet) -> None:
    assert get(fleet.metrics_url)[0] == 401
    assert get(fleet.metrics_url, "wrong-token-0123456789")[0] == 401
    status, text = get(fleet.metrics_url, TOKEN)
    assert status == 200 and "webhookd_deliveries" in text
    # the admin socket needs none (file permissions guard it)
    p = subprocess.run(["curl", "-sf", "--unix-socket", str(fleet.proc.run / "admin.sock"), "http://admin/metrics"],
                       capture_output=True, text=True, timeout=30) if shutil.which("curl") else None
    if p is not None:
        assert p.returncode == 0 and "webhookd_deliveries" in p.stdout


def test_every_metric_of_the_rules_and_the_dashboard_is_served(fleet: Fleet) -> None:
    served, families = samples(fleet.scrape())
    # what PromQL names is a sample name (webhookd_x_total, webhookd_x_bucket); prose in the
    # dashboard's descriptions may name a family (webhookd_x)
    prose = set(NAME.findall(DASHBOARD.read_text())) - set(NAME.findall("\n".join(dashboard_queries())))
    assert not sorted(prose - families), "the dashboard's descriptions name metrics that do not exist"
    used = {
        "docs/monitoring/webhookd-alerts.yml": rules_text(),
        "docs/monitoring/webhookd-grafana.json": "\n".join(dashboard_queries()),
    }
    for where, text in used.items():
        names = set(NAME.findall(text))
        assert names, where
        missing = sorted(n for n in names if n not in served)
        assert not missing, f"{where} uses metrics the daemon does not serve: {missing}"
        for name, matchers in SELECTOR.findall(text):
            have = {k for labels in served[name] for k in labels}
            for label, op, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                assert label in have, f"{where}: {name} has no label {label!r} (it has {sorted(have)})"
                seen = {labels[label] for labels in served[name] if label in labels}
                known = KNOWN_VALUES.get(label, seen) | seen
                values = value.split("|") if op in ("=~", "!~") else [value]
                unknown = [v for v in values if v not in known]
                assert not unknown, f"{where}: {name}{{{label}{op}{value!r}}}: no such value {unknown}"
        for labels, name in BY.findall(text):
            have = {k for s in served[name] for k in s} | TARGET_LABELS
            for label in (x.strip() for x in labels.split(",")):
                assert label in have, f"{where}: by ({label}) on {name}, which has {sorted(have)}"


def test_oldest_pending_age_grows_on_the_real_daemon(fleet: Fleet) -> None:
    def age() -> float:
        [value] = [s["value"] for s in parse_values(fleet.scrape(), "webhookd_oldest_pending_age_seconds")]
        return float(value)

    first = age()
    assert 0 < first <= time.time() - fleet.submitted + 1
    time.sleep(1.1)
    second = age()
    assert second >= first + 1


def parse_values(text: str, name: str) -> list[dict[str, Any]]:
    return [{"labels": s.labels, "value": s.value} for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


# -- through a real Prometheus, configured as the README says ------------------------------------------
def test_prometheus_scrapes_with_the_documented_config_and_evaluates_everything(
    fleet: Fleet, tmp_path: Path
) -> None:
    prometheus = tool("prometheus")
    token_file = tmp_path / "webhookd-admin.token"
    token_file.write_text(TOKEN + "\n")  # as `echo TOKEN > file` leaves it
    token_file.chmod(0o600)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n"
        "  - job_name: webhookd\n"
        "    authorization:\n"
        f"      credentials_file: {token_file}\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{fleet.admin_port}']\n"
    )
    readme = (MONITORING / "README.md").read_text()
    assert "job_name: webhookd" in readme and "credentials_file:" in readme  # what this test runs
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[Any]:
        status, body = get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", (expr, body)
        return list(doc["data"]["result"])

    def ready() -> bool:
        if p.poll() is not None:
            raise AssertionError(f"prometheus exited {p.returncode}: {log.read_text()[-3000:]}")
        try:
            return get(f"http://127.0.0.1:{port}/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout=60, what="prometheus to start")
        up = wait_until(lambda: query('up{job="webhookd"} == 1'), timeout=30, what="a successful scrape")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{fleet.admin_port}"
        wait_until(lambda: query("webhookd_oldest_pending_age_seconds > 0"), timeout=30, what="the gauge")

        def rules_evaluated() -> list[dict[str, Any]] | None:
            _, body = get(f"{api}/rules")
            rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

        rules = wait_until(rules_evaluated, timeout=30, what="every rule evaluated")
        assert len(rules) == 9
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        for expr in dashboard_queries():
            if expr.startswith("label_values("):
                metric = expr[len("label_values("):].split(",")[0]
                assert query(metric), expr
                continue
            query(concrete(expr))  # every panel's query is valid PromQL that Prometheus runs
        for name in ("webhookd_events_received_total", "webhookd_delivery_attempts_total",
                     "webhookd_tracking_hits_total", "webhookd_intake_rejections_total"):
            assert query(f'{name}{{job="webhookd"}}'), name
    finally:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


# -- the gauge on a fake clock ---------------------------------------------------------------------------
async def test_oldest_pending_age_follows_the_daemons_clock(tmp_path: Path, short_dir: Path,
                                                            make_receiver: Any) -> None:
    now = [1_800_000_000.0]
    receiver = await make_receiver(default=500)
    config = make_config(tmp_path / "state", short_dir, delivery={"retry_base": "1h", "retry_max": "4h"})
    daemon = Daemon(config, clock=lambda: now[0])
    await daemon.start()
    h = Harness(daemon)
    try:
        async def age() -> float:
            assert config.admin.socket is not None
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(config.admin.socket))) as s, \
                    s.get("http://admin/metrics") as r:
                [sample] = parse_values(await r.text(), "webhookd_oldest_pending_age_seconds")
            return float(sample["value"])

        assert await age() == 0  # nothing pending
        await h.create_webhook(receiver.url)
        assert all(a["ok"] for a in await h.submit(event("delivered", 1)))
        await receiver.wait_for(1)  # failed: pending again, an hour later
        now[0] += 90
        assert all(a["ok"] for a in await h.submit(event("delivered", 2)))  # younger: does not count
        now[0] += 30
        assert await age() == 120
        now[0] += 7200
        assert await age() == 7320

        wid = (await h.api("GET", "/v1/webhooks"))[1]["webhooks"][0]["id"]
        assert (await h.api("POST", f"/v1/webhooks/{wid}/disable"))[0] == 200  # paused: not pending

        async def paused() -> bool:
            return await age() == 0

        await eventually(paused, what="the age to drop to 0 once the backlog is paused")
    finally:
        await h.close()
