"""Container health check for `stride serve` (the image's HEALTHCHECK), one script for every role.

    stride-healthcheck [PID]      # PID: the serve process (default: the first found in /proc)

It finds the container's `stride serve` process, resolves its settings exactly as the process did
(its flags, through service.cli's parser, over its own STRIDE_* / REDIS_URL environment), then:
  api / all: GET /healthz on the API port answers 200;
  worker:    its metrics port reports `stride_worker_ready 1` (warmed up and serving).
Exit 0 healthy, 1 not. Standard library plus service.cli (pydantic only; no torch import).
"""
import http.client
import os
import sys
import urllib.request


def serve_process(pid=None):
    """(flags after `serve`, environment) of process PID, else of the first that runs `stride serve`."""
    pids = [pid] if pid else sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for p in pids:  # pid 1 unless an init (compose `init: true`) runs first
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
            with open(f"/proc/{p}/environ", "rb") as f:
                env = dict(kv.decode().partition("=")[::2] for kv in f.read().split(b"\0") if kv)
        except OSError:
            continue
        for i, a in enumerate(argv[:-1]):
            if os.path.basename(a) in ("stride", "cli.py", "stride_diffusion.cli") and argv[i + 1] == "serve":
                return argv[i + 2:], env
    return None, None


def main(args) -> int:
    argv, env = serve_process(int(args[0]) if args else None)
    if argv is None:
        print("no `stride serve` process in this container", file=sys.stderr)
        return 1
    for k in [k for k in os.environ if k.startswith("STRIDE_") or k == "REDIS_URL"]:
        del os.environ[k]
    os.environ.update({k: v for k, v in env.items() if k.startswith("STRIDE_") or k == "REDIS_URL"})
    from stride_diffusion.service.cli import parser, settings_from

    s = settings_from(parser().parse_args(argv))
    if s.role == "worker" and s.metrics_port is None:
        return 0  # nothing to ask: the process is alive, which is all Docker can know
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host  # a wildcard bind answers on loopback
    if s.role == "worker":
        url = f"http://{host}:{s.metrics_port}/metrics"
    else:
        url = f"http://{host}:{s.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            body = r.read().decode()
    except (OSError, http.client.HTTPException) as e:  # refused, timed out, non-2xx (URLError is an OSError)
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    if s.role == "worker":
        ready = any(line.split()[:2] == ["stride_worker_ready", "1.0"] for line in body.splitlines())
        if not ready:
            print("worker not ready yet (warming up, or stopping)", file=sys.stderr)
        return 0 if ready else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
