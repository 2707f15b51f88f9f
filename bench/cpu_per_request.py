"""CPU per request, in-process: the project's apps against the naive reference, one thread, no HTTP server.

    python bench/cpu_per_request.py [--quick] [--requests N]

On a machine shared with other jobs, req/s moves by 2-3x from one minute to the next; the CPU time a request
costs the process that serves it moves much less. This drives the same requests as bench/yardsticks.py (a fresh
RS256 token and a new user for every assign, half with a fresh Idempotency-Key; 1,000 hosts' heartbeats with
their secrets and 2 RUNNING mandelboxes each) through Flask's test client, one request at a time, and divides the
process CPU time (time.process_time) by the requests, in 5 slices of which the cheapest counts (other jobs can
only add to a slice's CPU time): bare hello, healthz, reference assign, assign, reference heartbeat, heartbeat.
The database's and Redis's own CPU are not in it (see yardsticks' db CPU column), nor gunicorn's (the same for
every app). The apps log as in production; the log lines go to a file.

Then where an assign's CPU goes, feature by feature (``part_*`` figures, the cheapest of 5 slices each, measured
in the same process on the same app): Flask's request/response (the bare hello), RS256 verification of a token
never seen, the Redis round trip (the rate limit's count carrying the image summary's MGET), the Postgres work
(the service's checkout, statement and commit, with the Postgres backend's CPU beside it, from /proc), what an
Idempotency-Key adds to it, the audit event (the statement with and without its insert: Postgres CPU), the
request metrics and assign counter, the JSON access line, and the body's validation and the answer's
serialisation (pydantic, JSON). What is left of an assign is the framework's own (routing, decorators, APIFlask,
the test client) and what the parts cost inside a whole request beyond their figures alone: each part runs in a
tight loop of its own, warm in the CPU's caches, so the sum of the parts understates them (a profile of whole
assigns, not this difference, says where that time goes).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h
from bench import reference_app
from bench.heartbeats import heartbeat_body
from bench.yardsticks import HOSTS, mint_tokens, seed

CHUNKS = 5


def main(argv: list[str] | None = None) -> int:
    parser = h.load_parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="requests per assign phase (default 1000)")
    args = parser.parse_args(argv)
    n = args.requests or (100 if args.quick else 1000)
    report = h.Report("cpu_per_request", args.quick, client="flask test client, 1 thread")

    from fractal.blueprints import HOST_BLUEPRINTS, PUBLIC_BLUEPRINTS
    from fractal.factory import create_app

    with h.workdir("cpu") as work, h.bench_database("cpu") as url:
        seed(url)
        h.vacuum_analyze(url)
        keypair = h.new_keypair()
        warm = 20
        tokens = mint_tokens(keypair, [f"bench-cpu-user-{k}" for k in range(2 * (n + warm))])
        body = h.assign_body()
        settings = h.app_settings(url, keypair, "cpu")
        with h.apps_in_process(url, keypair, work / "apps.log"):
            public_app = create_app(blueprints=PUBLIC_BLUEPRINTS, settings=settings)
            public = public_app.test_client()
            host = create_app(blueprints=HOST_BLUEPRINTS, settings=settings).test_client()
            reference = reference_app.app.test_client()
            beats = [(h.host_secret(k), heartbeat_body(k)) for k in range(HOSTS)]

            def measure(name: str, send: Callable[[int], Any], count: int, warm_up: int = warm) -> float:
                for k in range(warm_up):
                    send(k)
                # In CHUNKS slices; the cheapest slice counts: what else runs on the machine can only add to a
                # slice's CPU time (cache and frequency effects), never take from it.
                size = max(1, count // CHUNKS)
                slices = []
                for first in range(warm_up, warm_up + size * CHUNKS, size):
                    started = time.process_time()
                    for k in range(first, first + size):
                        send(k)
                    slices.append((time.process_time() - started) / size * 1000)
                per_request = min(slices)
                mean = sum(slices) / len(slices)
                report.add(f"{name}_cpu_ms", per_request, "ms of CPU per request", requests=size * CHUNKS, mean=mean)
                return per_request

            def assign(client: Any, path: str, offset: int) -> Callable[[int], None]:
                def send(k: int) -> None:
                    headers = {"Authorization": f"Bearer {tokens[offset + k]}"}
                    if k % 2 == 0:
                        headers["Idempotency-Key"] = uuid.uuid4().hex
                    h.expect_status(client.post(path, data=body, headers=headers, content_type="application/json"), 201)

                return send

            cpu = {
                "bare": measure("bare", lambda _k: h.expect_status(reference.get("/hello"), 200), 4 * n),
                "healthz": measure("healthz", lambda _k: h.expect_status(public.get("/healthz"), 200), 4 * n),
                "ref_assign": measure("ref_assign", assign(reference, "/assign", 0), n),
                "assign": measure("assign", assign(public, "/mandelbox/assign", n + warm), n),
                # Every host has sent a heartbeat before (as in production, where each does every few seconds).
                "ref_heartbeat": measure("ref_heartbeat", h.heartbeat_sender(reference, "/heartbeat", beats), n, HOSTS),
                "heartbeat": measure("heartbeat", h.heartbeat_sender(host, "/host/heartbeat", beats), n, HOSTS),
            }

            fresh = mint_tokens(keypair, [f"bench-cpu-part-{k}" for k in range(n)])
            parts = breakdown(report, public_app, url=url, n=n, tokens=fresh, body=body)

    # The assign less the bare request and every part measured: routing, decorators, APIFlask, the test client.
    rest = cpu["assign"] - cpu["bare"] - sum(parts.values())
    report.add("part_rest_cpu_ms", rest, "ms of CPU per request", note="assign - bare - the parts above")

    report.add("healthz_to_bare", cpu["healthz"] / cpu["bare"], "ratio of CPU per request")
    report.add("assign_to_ref", cpu["assign"] / cpu["ref_assign"], "ratio of CPU per request")
    report.add("heartbeat_to_ref", cpu["heartbeat"] / cpu["ref_heartbeat"], "ratio of CPU per request")
    report.emit()
    return 0


def _cheapest(run: Callable[[int], Any], count: int, *, backends: list[int] | None = None) -> tuple[float, float]:
    """ms of this process's CPU per call of ``run(k)`` (k = 0 .. count-1), the cheapest of CHUNKS slices; and the ms of
    the ``backends``' CPU per call over all of them (Postgres: /proc ticks, too coarse for a slice of its own)."""
    size = max(1, count // CHUNKS)
    slices = []
    db_before = h.cpu_seconds(backends or [])
    for first in range(0, size * CHUNKS, size):
        started = time.process_time()
        for k in range(first, first + size):
            run(k)
        slices.append((time.process_time() - started) / size * 1000)
    db_ms = (h.cpu_seconds(backends or []) - db_before) / (size * CHUNKS) * 1000
    return min(slices), db_ms


def breakdown(report: h.Report, app: Any, *, url: str, n: int, tokens: list[str], body: str) -> dict[str, float]:
    """Each feature of an assign measured alone, in-process, on the project's app (see the module docstring).

    Returns the worker-side ms per request of each part (what the request pays on top of the bare framework)."""
    import json

    from flask import Response

    from fractal.assignment import service
    from fractal.assignment.schemas import AssignIn, AssignOut
    from fractal.auth.tokens import build_verifier
    from fractal.database import advisory_key
    from fractal.fleet import mandelboxes
    from fractal.observability import _access_log
    from fractal.ratelimit import check_route_limit
    from fractal.web import EXTENSION_KEY

    state = app.extensions[EXTENSION_KEY]
    settings = state.settings
    parts: dict[str, float] = {}
    answer = {
        "mandelbox_id": str(uuid.uuid4()),
        "ip": "10.0.0.1",
        "region": h.REGIONS[0],
        "instance_name": "bench-i-000001",
        "status": "ALLOCATED",
    }

    def add(name: str, what: str, measured: tuple[float, float], *, db: bool = False) -> None:
        worker, db_ms = measured
        parts[name] = worker
        report.add(f"part_{name}_cpu_ms", worker, "ms of CPU per request", what=what)
        if db:
            report.add(f"part_{name}_db_cpu_ms", db_ms, "ms of Postgres backend CPU per request", what=what)

    verifier = build_verifier(settings)
    assert verifier is not None
    add(
        "rs256_new_token",
        "JwtVerifier.verify of a token never seen",
        _cheapest(lambda k: verifier.verify(tokens[k]), n),
    )

    with app.test_request_context("/mandelbox/assign", method="POST"):
        limit = settings.assign_rate_limit
        from fractal.images import active_image_summary, active_image_summary_read_ahead

        with state.session_factory() as warm:
            active_image_summary(warm, cache=state.cache)  # the entry is cached: the parts read it (MGET)

            def limit_and_images(k: int) -> None:
                # As the assign does it: the summary's MGET in the limit's round trip, then answered from the reply.
                along = active_image_summary_read_ahead(state.cache)
                check_route_limit(limit, key=f"user:bench-part-{k}", scope="assign", along=along)
                active_image_summary(warm, cache=along if along is not None else state.cache)

            add(
                "redis",
                "the assign limit counted and the active-image summary read in the same Redis round trip",
                _cheapest(limit_and_images, n),
            )
            summary = active_image_summary(warm, cache=state.cache)

        class Fixed:
            """The image summary without I/O, so the Postgres parts measure Postgres alone."""

            def get_or_load(self, _namespace: str, _name: str, _load: Any) -> Any:
                return summary

        regions = json.loads(body)["regions"]

        def assign(user: str, key: str | None) -> None:
            with state.session_factory() as session:
                service.assign_mandelbox(
                    session,
                    user_id=user,
                    regions=regions,
                    client_commit_hash=h.COMMIT,
                    max_per_user=h.MAX_PER_USER,
                    idempotency_key=key,
                    cache=Fixed(),  # type: ignore[arg-type]
                )

        backends = h.database_backend_pids(url)
        assign("bench-part-warm", None)
        backends = sorted(set(backends) | set(h.database_backend_pids(url)))
        plain = _cheapest(lambda k: assign(f"bench-part-pg-{k}", None), n, backends=backends)
        add("postgres", "checkout (BEGIN, bounds), the assign statement, COMMIT: service, no key", plain, db=True)
        keyed = _cheapest(lambda k: assign(f"bench-part-key-{k}", uuid.uuid4().hex), n, backends=backends)
        # Half the yardstick's assigns carry a key: half the difference is what idempotency costs on average.
        idem = ((keyed[0] - plain[0]) / 2, (keyed[1] - plain[1]) / 2)
        add("idempotency", "half of (with a key - without): the stored answer read, written, purged", idem, db=True)

        # The audit event: the same statement with and without its insert, on the driver (Postgres CPU).
        sql = mandelboxes._FIRST_CHOICE_PLAIN
        start, end = sql.index("), audited AS ("), sql.index("SELECT (SELECT n FROM live)")
        without_audit = sql[:start] + ")\n" + sql[end:]
        engine = state.engine

        def statement(text_sql: str, user: str) -> None:
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    text_sql,
                    {
                        "user_lock_key": advisory_key(user),
                        "region": regions[0],
                        "commit": h.COMMIT,
                        "mandelbox_id": str(uuid.uuid4()),
                        "user_id": user,
                        "session_id": None,
                        "max_per_user": h.MAX_PER_USER,
                        "actor": f"user:{user}",
                        "event_kind": "MANDELBOX_ASSIGNED",
                    },
                )

        with_event = _cheapest(lambda k: statement(sql, f"bench-part-ev-{k}"), n, backends=backends)
        without_event = _cheapest(lambda k: statement(without_audit, f"bench-part-noev-{k}"), n, backends=backends)
        add(
            "audit_event",
            "the assign statement with its audit insert - without it",
            (max(0.0, with_event[0] - without_event[0]), with_event[1] - without_event[1]),
            db=True,
        )

        before = [f for f in app.before_request_funcs.get(None, []) if f.__name__ == "_start_request_timer"]
        after = [f for f in app.after_request_funcs.get(None, []) if f.__name__ == "_count_request"]
        response = Response(status=201)
        from fractal.metrics import record_assignment

        def metrics(_k: int) -> None:
            for hook in before:
                hook()
            for hook in after:
                hook(response)
            record_assignment("assigned")

        add("metrics", "the request metrics hooks and the assign counter", _cheapest(metrics, n))

        def access_line(_k: int) -> None:
            _access_log.info("request", status=201, duration_ms=1.23)

        add("access_log", "one JSON access line (structlog, redaction, to a file)", _cheapest(access_line, n))

        def serialise(_k: int) -> None:
            AssignIn.model_validate(json.loads(body))
            json.dumps(AssignOut.model_validate(answer).model_dump(mode="json"))

        add("json", "the body parsed and validated, the answer validated and serialised", _cheapest(serialise, n))
    return parts


if __name__ == "__main__":
    h.run_main(main)
