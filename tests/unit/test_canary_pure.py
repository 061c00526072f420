"""The canary's pure parts: weights, judgement, router config, runtime API and log parsing,
the persisted status and the deployment lock."""

from __future__ import annotations

import multiprocessing
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gantry.adapters.haproxy import (
    RouterConfig,
    Slot,
    parse_access_line,
    parse_server_weights,
    parse_show_stat,
    render_config,
)
from gantry.deploy.docker import apply_order, check_weights
from gantry.errors import CanaryLockedError, SpecError
from gantry.spec import CanaryOptions, parse_spec
from gantry.stages.canary.analysis import (
    CheckResult,
    Quality,
    SlotWindow,
    StepVerdict,
    WindowObservations,
    analysed_steps,
    describe_failure,
    failed,
    inconclusive,
    judge,
    next_weight,
    probes_wanted,
)
from gantry.stages.canary.state import (
    CanaryStatus,
    DeploymentStatus,
    DeploymentStore,
    Phase,
    Served,
    deployment_name,
)

pytestmark = pytest.mark.unit

OPTS = CanaryOptions(min_requests=10, max_error_rate=0.1, max_latency_ratio=1.5)
T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _win(n: int, fail: int = 0, ms: float = 10.0) -> SlotWindow:
    return SlotWindow.from_latencies(n, fail, [ms] * (n - fail))


# --- steps and weights -----------------------------------------------------------------------


def test_steps_default_and_next_weight() -> None:
    steps = CanaryOptions().steps
    assert steps == (10, 50, 100)
    assert analysed_steps(steps) == (10, 50)
    assert [next_weight(steps, i) for i in range(3)] == [50, 100, None]


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        ([10, 150, 100], "1-100"),
        ([0, 50, 100], "1-100"),
        ([-5, 100], "1-100"),
        ([50, 10, 100], "increase"),
        ([10, 10, 100], "increase"),
        ([10, 50], "last step must be 100"),
        ([], "at least 1"),
    ],
)
def test_bad_steps_are_refused_with_the_field_named(steps: list[int], needle: str) -> None:
    spec = {"name": "m", "source": {"repo_id": "o/r"}, "canary": {"steps": steps}}
    with pytest.raises(SpecError) as info:
        parse_spec(spec, origin="in test")
    assert "canary.steps" in str(info.value)
    assert needle in str(info.value)


def test_weights_must_leave_someone_serving() -> None:
    check_weights({Slot.A: 100, Slot.B: 0})
    with pytest.raises(ValueError, match="at least one slot"):
        check_weights({Slot.A: 0, Slot.B: 0})
    with pytest.raises(ValueError, match="0-100"):
        check_weights({Slot.A: 101})


def test_weights_rise_before_they_fall() -> None:
    # Shifting 90/10 -> 50/50 raises b first, so no moment has both at their lowest.
    assert apply_order({Slot.A: 90, Slot.B: 10}, {Slot.A: 50, Slot.B: 50}) == [Slot.B, Slot.A]
    # A rollback (candidate b to 0) raises the champion first.
    assert apply_order({Slot.A: 50, Slot.B: 50}, {Slot.A: 100, Slot.B: 0}) == [Slot.A, Slot.B]


def test_probes_make_up_for_thin_traffic_only() -> None:
    assert probes_wanted(20, 0.0, 10.0, 0) == 0
    assert probes_wanted(20, 3.0, 10.0, 0) == 10  # half of 60 % of the window
    assert probes_wanted(20, 3.0, 10.0, 25) == 0  # live traffic already enough
    assert probes_wanted(20, 9.0, 10.0, 5) == 15


def test_the_traffic_observation_is_long_enough_for_the_probes_to_fill() -> None:
    from gantry.spec import CanaryOptions
    from gantry.stages.canary.analysis import min_observation_s, probes_per_check

    default = CanaryOptions()
    # The defaults fill 20 requests at 5/s well within half a 30 s window.
    assert min_observation_s(default) < default.window_s / 2
    # A 2 s window with 2 probes per 0.5 s check needs more than its half for 5 requests.
    short = CanaryOptions(window_s=2, interval_s=0.5, min_requests=5)
    assert probes_per_check(short) == 2
    need = min_observation_s(short)
    assert need > short.window_s / 2
    # Sending at the paced rate over that span reaches min_requests before it ends.
    ticks = [i * short.interval_s for i in range(int(need / short.interval_s))]
    sent = 0
    for t in ticks:
        sent += min(probes_wanted(short.min_requests, t, need, sent), probes_per_check(short))
    assert sent >= short.min_requests


# --- judgement -------------------------------------------------------------------------------


def test_a_good_window_passes_only_at_its_end() -> None:
    obs = WindowObservations(candidate=_win(20), champion=_win(100))
    assert all(c.passed is None for c in judge(obs, OPTS, final=False) if c.name != "health")
    assert not failed(judge(obs, OPTS, final=True))


def test_errors_beyond_what_the_rate_allows_fail_at_once() -> None:
    # 2 failures > 10 % of min_requests (10): more requests cannot save the window.
    obs = WindowObservations(candidate=_win(5, fail=2), champion=_win(50))
    assert "success-rate" in failed(judge(obs, OPTS, final=False))
    one = WindowObservations(candidate=_win(5, fail=1), champion=_win(50))
    assert not failed(judge(one, OPTS, final=False))


def test_too_few_requests_are_inconclusive_at_the_end_never_a_pass() -> None:
    obs = WindowObservations(candidate=_win(3), champion=_win(50))
    checks = {c.name: c for c in judge(obs, OPTS, final=True)}
    assert checks["success-rate"].passed is None and checks["success-rate"].inconclusive
    assert "min_requests" in checks["success-rate"].detail
    assert "success-rate" in inconclusive(tuple(checks.values()))
    # Failures the rate cannot allow, even over min_requests, fail however few they are.
    bad = WindowObservations(candidate=_win(3, fail=2), champion=_win(50))
    assert "success-rate" in failed(judge(bad, OPTS, final=True))


def test_latency_is_relative_to_the_champion_plus_slack() -> None:
    opts = CanaryOptions(min_requests=10, max_latency_ratio=1.5, latency_slack_ms=5)
    fast = WindowObservations(candidate=_win(100, ms=19.0), champion=_win(100, ms=10.0))
    assert not failed(judge(fast, opts, final=True))  # 19 <= 10 * 1.5 + 5
    slow = WindowObservations(candidate=_win(100, ms=21.0), champion=_win(100, ms=10.0))
    assert set(failed(judge(slow, opts, final=True))) == {"latency-p95", "latency-p99"}
    # With too few samples the p99 is the maximum: it is reported, not judged.
    few = {
        c.name: c
        for c in judge(
            WindowObservations(candidate=_win(30, ms=21.0), champion=_win(30)), opts, final=True
        )
    }
    assert few["latency-p95"].passed is False and few["latency-p99"].passed is None
    assert "not judged" in few["latency-p99"].detail


def test_quality_below_the_champion_fails_at_once() -> None:
    q = Quality(metric="top1", items=20, candidate=0.55, champion=1.0)
    obs = WindowObservations(candidate=_win(0), champion=_win(0), quality=q)
    checks = {c.name: c for c in judge(obs, OPTS, final=False)}
    assert checks["quality"].passed is False
    assert "0.550 vs champion 1.000" in checks["quality"].detail


def test_missing_champion_data_is_inconclusive_never_a_pass() -> None:
    """A champion that could not be scored, or served no request, leaves nothing to compare
    the candidate with: the window cannot pass on it."""
    q = Quality(metric="top1", items=20, candidate=0.99, champion=None)
    obs = WindowObservations(candidate=_win(100), champion=_win(100), quality=q)
    checks = {c.name: c for c in judge(obs, OPTS, final=True)}
    assert checks["quality"].passed is None and checks["quality"].inconclusive
    assert inconclusive(tuple(checks.values())) == ("quality",)
    no_champion = WindowObservations(candidate=_win(100), champion=_win(0))
    latency = {c.name: c for c in judge(no_champion, OPTS, final=True)}
    assert latency["latency-p95"].passed is None and latency["latency-p95"].inconclusive
    assert not latency["success-rate"].inconclusive  # the candidate's own rate is known
    # Not yet final: nothing is inconclusive until the window has had its chance.
    early = judge(no_champion, OPTS, final=False)
    assert not [c for c in early if c.name.startswith("latency") and c.inconclusive]
    # A verdict with an inconclusive check names it among the failed ones.
    v = StepVerdict(
        step=0, weight=10, started_at=T0, finished_at=T0, passed=False,
        checks=tuple(checks.values()), candidate_requests=100, champion_requests=100,
        synthetic_requests=0,
    )  # fmt: skip
    assert "quality" in v.failed_checks and "(inconclusive)" in describe_failure(v.checks)


def test_steps_of_only_100_need_skip_analysis() -> None:
    spec = {"name": "m", "source": {"repo_id": "o/r"}, "canary": {"steps": [100]}}
    with pytest.raises(SpecError, match="skip_analysis"):
        parse_spec(spec)
    spec["canary"] = {"steps": [100], "skip_analysis": True}
    assert parse_spec(spec).canary.steps == (100,)


def test_a_crashed_candidate_fails_at_once() -> None:
    obs = WindowObservations(candidate=_win(0), champion=_win(5), candidate_down="exited (137)")
    assert failed(judge(obs, OPTS, final=False)) == ("health",)


def test_status_transitions_record_the_decision() -> None:
    c = CanaryStatus(
        model="m", release_id="m-1", candidate_version="2", champion_version="1", steps=(10, 100)
    )
    c.to(Phase.PROGRESSING)
    assert c.decided_at is None and not c.phase.final
    c.to(Phase.ROLLED_BACK, "quality")
    assert c.phase.final and c.decided_at is not None and c.message == "quality"
    assert CanaryStatus.model_validate_json(c.model_dump_json()) == c


# --- router config, runtime API, access log ------------------------------------------------


TOKEN = "ab" * 32


def test_router_config_routes_by_weight_and_probe_header() -> None:
    text = render_config(
        RouterConfig(
            deployment="gantry-m-1",
            runtime_port=8080,
            probe_token=TOKEN,
            weights={Slot.A: 90, Slot.B: 10},
        )
    )
    assert "server a gantry-m-1-a:8080 weight 90" in text
    assert "server b gantry-m-1-b:8080 weight 10" in text
    assert "use-server b if { req.hdr(x-gantry-route) -m str b }" in text
    # The runtime API is on a unix socket only, never on the network the servers share.
    assert "stats socket /run/gantry/admin.sock mode 666 level admin" in text
    assert "ipv4@" not in text and ":9999" not in text
    # Route and probe headers count only with the token, which never reaches a server; the
    # headers are removed before the probe kind is captured for the access log.
    lines = [ln.strip() for ln in text.splitlines()]
    acl = f"acl gantry_probe req.hdr(x-gantry-probe-token) -m str {TOKEN}"
    strip = [
        "http-request del-header x-gantry-route unless gantry_probe",
        "http-request del-header x-gantry-probe unless gantry_probe",
        "http-request del-header x-gantry-probe-token",
    ]
    capture = "http-request capture req.hdr(x-gantry-probe) len 16"
    at = [lines.index(x) for x in (acl, *strip, capture)]
    assert at == sorted(at)
    assert "http-check send meth GET uri /health" in text
    assert "retry-on conn-failure empty-response" in text
    assert "option http-no-delay" in text  # streamed tokens are forwarded as they come
    assert "option redispatch" in text
    with pytest.raises(ValueError, match="0-100"):
        render_config(
            RouterConfig(deployment="d", runtime_port=1, probe_token=TOKEN, weights={Slot.A: 300})
        )
    with pytest.raises(ValueError, match="probe_token"):
        RouterConfig(deployment="d", runtime_port=1, probe_token="x; acl all always_true")


SHOW_STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,"
    "wretr,wredis,status,weight,act,bck,hrsp_5xx,addr,\n"
    "inference,FRONTEND,,,1,2,4096,10,0,0,0,0,0,,,,,OPEN,,,,,,\n"
    "model,a,0,0,1,2,,8,0,0,,0,,0,0,0,0,UP,90,1,0,0,172.18.0.2:8080,\n"
    "model,b,0,0,0,1,,2,0,0,,0,,3,1,2,1,DOWN,10,1,0,4,172.18.0.3:8080,\n"
    "model,BACKEND,0,0,1,2,410,10,0,0,0,0,,3,1,2,1,UP,100,2,0,4,,\n"
)


def test_show_stat_is_parsed_by_column_name() -> None:
    stats = parse_show_stat(SHOW_STAT)
    assert set(stats) == {"a", "b"}
    a, b = stats["a"], stats["b"]
    assert a.up and a.weight == 90 and a.current_sessions == 1 and a.total_sessions == 8
    assert not b.up and b.connection_errors == 3 and b.retries == 2 and b.http_5xx == 4
    assert b.address == "172.18.0.3:8080"


def test_access_lines_are_parsed_and_others_ignored() -> None:
    line = (
        "2026-11-22T10:30:33.956040238Z gantry-access server=b status=200 ta=12 tr=11 "
        "retries=+1 term=----"
    )
    rec = parse_access_line(line)
    assert rec is not None
    assert rec.server == "b" and rec.status == 200 and rec.total_ms == 12
    assert rec.retries == 1 and rec.redispatched and not rec.failed
    assert rec.at == datetime(2026, 11, 22, 10, 30, 33, 956040, tzinfo=UTC)
    failed_rec = parse_access_line(
        "2026-11-22T10:30:34Z gantry-access server=<NOSRV> status=503 ta=0 tr=-1 retries=0 "
        "term=SC--"
    )
    assert failed_rec is not None and failed_rec.failed
    assert parse_access_line("2026-11-22T10:30:34Z [WARNING] (1) : Server model/b is DOWN") is None


# --- status and lock -------------------------------------------------------------------------


def test_deployment_names_are_docker_safe_and_per_state_dir() -> None:
    a = deployment_name("MiniLM_v2/x", "/state/one")
    assert a.startswith("gantry-minilm-v2-x-") and a == a.lower()
    assert a != deployment_name("MiniLM_v2/x", "/state/two")
    assert deployment_name("minilm", "/s") != deployment_name("MiniLM", "/s")


def test_status_round_trips_atomically(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path, "minilm")
    assert not store.exists() and store.load().champion is None
    st = store.load()
    st.champion = Served(
        version="1", release_id="r1", record="/r1.json", image="x@sha256:0", slot=Slot.A
    )
    st.canary = CanaryStatus(
        model="minilm",
        release_id="r2",
        candidate_version="2",
        champion_version="1",
        steps=(10, 100),
    )
    store.save(st)
    back = store.load()
    assert back.champion == st.champion and back.canary == st.canary
    assert not list(store.dir.glob(".*.tmp"))
    assert isinstance(back, DeploymentStatus) and back.free_slot() is Slot.B


def _hold(path: str, seconds: float) -> None:
    with DeploymentStore(Path(path), "m").lock(0, "holder-release"):
        time.sleep(seconds)


def test_a_second_canary_of_a_model_waits_then_fails_naming_the_holder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_hold, args=(str(tmp_path), 5.0))
    proc.start()
    store = DeploymentStore(tmp_path, "m")
    try:
        deadline = time.monotonic() + 20
        while not (store.dir / "lock").exists() or "holder" not in (store.dir / "lock").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(CanaryLockedError) as info, store.lock(0.5, "second"):
            pass
        assert time.monotonic() - t0 >= 0.5
        assert "holder-release" in str(info.value) and "gantry rollback m" in str(info.value)
    finally:
        proc.join(30)
    # The holder is gone (its lock went with it): the next one gets it at once.
    with store.lock(0, "third"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_hold, args=(str(tmp_path), 60.0))
    proc.start()
    store = DeploymentStore(tmp_path, "m")
    deadline = time.monotonic() + 20
    while not (store.dir / "lock").exists() or "holder" not in (store.dir / "lock").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.join(10)
    with store.lock(2, "after-kill"):
        pass


SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 model 1 a - 0 32 30 100 0 1 0 0 14 0 0 0 gantry-x-a 8080 - 0 0 - - 0
3 model 2 b 172.18.0.4 2 0 70 0 3 15 3 2 6 0 0 0 gantry-x-b 8080 - 0 0 - - 0
"""  # noqa: E501 - HAProxy's own output


def test_set_weights_are_read_back_from_servers_state() -> None:
    assert parse_server_weights(SERVERS_STATE) == {"a": 30, "b": 70}


def test_no_traffic_series_is_inconclusive_not_zero_requests() -> None:
    """A metrics source with no series (exporter down, scrape missing) says so: the
    window cannot pass, and the candidate is not blamed for serving nothing."""
    opts = CanaryOptions(min_requests=10)
    obs = WindowObservations(
        candidate=_win(0), champion=_win(0), traffic_missing="no series of slot b"
    )
    open_ = {c.name: c for c in judge(obs, opts, final=False)}
    assert open_["success-rate"].passed is None and not open_["success-rate"].inconclusive
    final = {c.name: c for c in judge(obs, opts, final=True)}
    assert final["success-rate"].inconclusive and final["success-rate"].passed is None
    assert "latency-p95" not in final  # nothing to judge latency from either


def test_a_quality_score_not_readable_yet_is_open_then_inconclusive() -> None:
    opts = CanaryOptions()
    obs = WindowObservations(
        candidate=_win(100), champion=_win(100), quality_missing="not scraped yet"
    )
    assert {c.name: c for c in judge(obs, opts, final=False)}["quality"].passed is None
    final = {c.name: c for c in judge(obs, opts, final=True)}["quality"]
    assert final.inconclusive and final.passed is None


def test_ttft_p95_is_judged_like_latency_at_the_window_end() -> None:
    opts = CanaryOptions(max_latency_ratio=1.5, latency_slack_ms=50)

    def ttft(cand_ms: float, champ_ms: float, n: int = 30) -> dict[str, CheckResult]:
        obs = WindowObservations(
            candidate=_win(30),
            champion=_win(30),
            ttft=(SlotWindow(samples=n, p95_ms=cand_ms), SlotWindow(samples=30, p95_ms=champ_ms)),
        )
        return {c.name: c for c in judge(obs, opts, final=True)}

    assert ttft(340, 200)["ttft-p95"].passed is True  # 200 * 1.5 + 50 = 350
    slow = ttft(360, 200)["ttft-p95"]
    assert slow.passed is False and slow.limit == 350.0
    few = ttft(100, 200, n=5)["ttft-p95"]  # not judged, as latency with few samples
    assert few.passed is None and not few.inconclusive and "not judged" in few.detail
    no_base = ttft(100, 200)
    no_base_obs = WindowObservations(
        candidate=_win(30),
        champion=_win(30),
        ttft=(SlotWindow(samples=30, p95_ms=100), SlotWindow(samples=0, p95_ms=None)),
    )
    missing = {c.name: c for c in judge(no_base_obs, opts, final=True)}["ttft-p95"]
    assert missing.inconclusive and missing.passed is None  # nothing to compare with
    assert no_base["ttft-p95"].passed is True
