"""Take the README's picture of a canary in Prometheus: its own graph page, in headless
Chromium (Debian's chromium and chromedriver, through Selenium).

    python scripts/screenshot-prometheus.py --model smollm2-chat
    python scripts/screenshot-prometheus.py --model smollm2-chat-e2e \\
        --prometheus http://127.0.0.1:9091 --end "2025-01-31 10:42:00" --range 15m

The query is a panel of the Grafana dashboard (docs/dashboards/gantry-model.json, default
"Request rate by version": candidate vs champion as the canary shifts traffic), for one
model, with a fixed rate window in place of Grafana's ``$__rate_interval``. ``--end`` (UTC)
points the graph at a canary that is over, e.g. in a Prometheus replaying the TSDB a test
left behind. Prometheus defaults to the embedded one (``GANTRY_PROMETHEUS_ADDR``).
Exits 1, and writes nothing, when the graph has no data points.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gantry.metrics.dashboard import instantiate, panel_queries  # noqa: E402
from gantry.proc import which  # noqa: E402

DASHBOARD = ROOT / "docs" / "dashboards" / "gantry-model.json"
OUT = ROOT / "docs" / "img" / "prometheus-canary.png"
_HINT = "run `make system-deps` (Debian's chromium and chromium-driver)"


def graph_url(prometheus: str, expr: str, range_input: str, end: datetime | None) -> str:
    """The graph page of ``prometheus`` showing ``expr`` (graph tab) over ``range_input``."""
    params = {"g0.expr": expr, "g0.tab": "0", "g0.range_input": range_input}
    if end is not None:
        # The classic UI's pickers (Debian's 2.42 serves it): minutes for a range's end.
        params["g0.end_input"] = end.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        params["g0.moment_input"] = end.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{prometheus.rstrip('/')}/graph?{urlencode(params)}"


def _end(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def screenshot(url: str, out: Path, *, width: int, height: int, timeout_s: float) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = str(which("chromium", env_var=None, install_hint=_HINT))
    # --no-sandbox: as root in a container chromium's sandbox cannot start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    service = Service(str(which("chromedriver", env_var=None, install_hint=_HINT)))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(timeout_s)
    try:
        driver.get(url)

        # Debian's Prometheus serves the classic UI: a Rickshaw chart, a legend line per
        # series once drawn, or a visible alert ("No datapoints found.", a query error).
        def drawn_or_empty(d: webdriver.Chrome) -> str | None:
            if d.find_elements(By.CSS_SELECTOR, ".rickshaw_legend .line"):
                return "drawn"
            shown = [a for a in d.find_elements(By.CSS_SELECTOR, ".alert") if a.is_displayed()]
            return shown[0].text or "an empty alert" if shown else None

        try:
            state = WebDriverWait(driver, timeout_s).until(drawn_or_empty)
        except TimeoutException:
            raise SystemExit(f"the graph did not render within {timeout_s:g}s: {url}") from None
        if state != "drawn":
            raise SystemExit(f"Prometheus shows no graph ({state}): {url}")
        time.sleep(1)  # the chart draws once the legend is in
        out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out)):
            raise SystemExit(f"chromium could not write {out}")
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="the model's MLflow name (its model label)")
    p.add_argument("--prometheus", help="Prometheus base URL (default: the embedded one)")
    p.add_argument("--panel", default="Request rate by version", help="dashboard panel title")
    p.add_argument("--rate-interval", default="30s", help="for $__rate_interval (default 30s)")
    p.add_argument("--range", default="10m", dest="range_input", help="graph range (10m)")
    p.add_argument("--end", type=_end, help="graph end, ISO time (UTC unless it says)")
    p.add_argument("--out", type=Path, default=OUT, help=f"PNG to write (default {OUT})")
    p.add_argument("--size", default="1280x900", help="browser window WxH (1280x900)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the page")
    args = p.parse_args(argv)

    if args.prometheus is None:
        from gantry.settings import Settings

        args.prometheus = Settings.from_env().prometheus_url
    exprs = [q.expr for q in panel_queries(DASHBOARD) if q.title == args.panel]
    if not exprs:
        titles = sorted({q.title for q in panel_queries(DASHBOARD)})
        p.error(f"no panel {args.panel!r} in {DASHBOARD.name}; one of: {', '.join(titles)}")
    expr = instantiate(exprs[0], args.model, args.rate_interval)
    width, height = (int(n) for n in args.size.split("x"))
    url = graph_url(args.prometheus, expr, args.range_input, args.end)
    print(url)
    screenshot(url, args.out, width=width, height=height, timeout_s=args.timeout)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
