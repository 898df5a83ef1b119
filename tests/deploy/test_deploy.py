"""Deployment files (docker/, compose.yaml) proven without Docker.

- compose.yaml is valid for Compose, and every `stride serve` command and STRIDE_* variable in it is
  one the CLI and the settings accept (a typo in an env var would otherwise be silently ignored);
- docker/prometheus.yml passes promtool, and scrapes the ports compose gives the API and workers;
- the Dockerfile has its stages, non-root user, health check, port and command, and pins torch as .ci/run;
- the topology: Redis, one API and two CPU workers started with compose's commands and environment
  (ports moved to loopback), scraped by a real Prometheus with the project's scrape config; after
  traffic at several step counts, every PromQL expression of every Grafana panel returns data.

Tools: docker-compose (v1 or the v2 plugin), promtool, prometheus, redis-server; each test that needs
one is skipped, saying which, when it is absent. YAML comes from PyYAML, or else from the system
python3-yaml that Debian's docker-compose package depends on.
"""
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_helpers import ROOT, dockerfile_stages, image_env, load_yaml, need

COMPOSE = ROOT / "compose.yaml"
PROMETHEUS_YML = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stride.json"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


# -- helpers ---------------------------------------------------------------------------------------
def compose_cmd():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], check=False,
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed")


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


def serve_services(compose) -> dict:
    """Services whose command is `stride serve ...` -> their flags after `serve`."""
    out = {}
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        cmd = shlex.split(cmd) if isinstance(cmd, str) else cmd
        if cmd and cmd[:2] == ["stride", "serve"]:
            out[name] = cmd[2:]
    return out


def stride_env(svc) -> dict:
    """A service's environment as compose sets it with no variable given: `${VAR:-default}` is its default."""
    env = svc.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) if isinstance(v, str) else v for k, v in env.items()}


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


# -- compose -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_file_is_valid(profile):
    cmd = [*compose_cmd(), "-f", str(COMPOSE), *(["--profile", profile] if profile else []), "config", "-q"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stderr}"


@pytest.mark.parametrize("artifacts", [None, "artifacts/mine,artifacts/digits"])
def test_compose_serves_the_artifacts_stride_artifacts_names(artifacts, tmp_path):
    """`STRIDE_ARTIFACTS=... docker compose up` serves an imported model: the rendered config gives the
    API and every worker the same list (the digits model when it is unset)."""
    env = {k: v for k, v in os.environ.items() if k != "STRIDE_ARTIFACTS"}
    if artifacts:
        env["STRIDE_ARTIFACTS"] = artifacts
    r = subprocess.run([*compose_cmd(), "-f", str(COMPOSE), "--profile", "cpu", "--profile", "gpu", "config"],
                       check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    (tmp_path / "rendered.yaml").write_text(r.stdout)
    services = load_yaml(tmp_path / "rendered.yaml")["services"]
    for name in ("api", "worker", "worker-cpu"):
        assert services[name]["environment"]["STRIDE_ARTIFACTS"] == (artifacts or "artifacts/digits"), name


def test_compose_services_have_the_intended_shape(compose):
    s = compose["services"]
    assert {"redis", "api", "worker", "worker-cpu", "prometheus", "grafana"} <= set(s)
    assert "redis-cli" in s["redis"]["healthcheck"]["test"] and "ping" in s["redis"]["healthcheck"]["test"]
    for name in ("api", "worker", "worker-cpu"):
        assert s[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    # scalable workers: no fixed name, no host port
    for name in ("worker", "worker-cpu"):
        assert "container_name" not in s[name] and "ports" not in s[name], name
    assert s["worker"]["profiles"] == ["gpu"] and s["worker-cpu"]["profiles"] == ["cpu"]
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in s["worker-cpu"], "the CPU worker must not reserve a GPU"
    # images: the GPU worker from the cuda target, the API and CPU worker from the cpu target
    targets = {n: s[n]["build"]["target"] for n in ("api", "worker", "worker-cpu")}
    assert targets == {"api": "cpu", "worker": "cuda", "worker-cpu": "cpu"}
    built = [svc["image"] for svc in s.values() if "build" in svc]
    assert len(built) == len(set(built)), "services built under one image name fail to build concurrently"
    _, stages = dockerfile_stages()
    assert set(targets.values()) <= set(stages)
    env = s["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_commands_and_environment_are_what_stride_serve_accepts(compose, monkeypatch):
    from stride_diffusion.service.cli import parser, settings_from
    from stride_diffusion.service.settings import Settings

    fields = set(Settings.model_fields)
    services = serve_services(compose)
    assert {"api", "worker", "worker-cpu"} <= set(services)
    roles = {}
    for name, argv in services.items():
        env = stride_env(compose["services"][name])
        for key in env:
            assert key == "REDIS_URL" or (key.startswith("STRIDE_") and key[7:].lower() in fields), \
                f"{name}: {key} is no setting of `stride serve` (fields: {sorted(fields)})"
        for key in list(os.environ):
            if key.startswith("STRIDE_") or key == "REDIS_URL":
                monkeypatch.delenv(key)
        for key, value in env.items():
            if value is not None:  # None: passed through from the host shell, unset here
                monkeypatch.setenv(key, str(value))
        try:
            args = parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `stride serve {' '.join(argv)}` is rejected by the CLI")
        s = settings_from(args)  # the settings' own validation: e.g. --role worker needs REDIS_URL
        roles[name] = s
    assert roles["api"].role == "api" and roles["worker"].role == roles["worker-cpu"].role == "worker"
    assert roles["worker"].device.startswith("cuda") and roles["worker-cpu"].device == "cpu"
    # the published API port is the one the API listens on
    api_ports = [str(p).rsplit(":", 1)[-1] for p in compose["services"]["api"]["ports"]]
    assert str(roles["api"].port) in api_ports
    # workers export metrics; API and workers agree on what is served
    for w in ("worker", "worker-cpu"):
        assert roles[w].metrics_port is not None, f"{w} needs --metrics-port for Prometheus"
        for k in ("artifacts", "steps", "redis_url", "key_prefix", "max_batch"):
            assert getattr(roles[w], k) == getattr(roles["api"], k), f"{w} and api disagree on {k}"


# -- prometheus ----------------------------------------------------------------------------------------
def test_prometheus_config_passes_promtool():
    promtool = need("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], check=False, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_ports_compose_serves_on(compose):
    from stride_diffusion.service.cli import parser

    prom = load_yaml(PROMETHEUS_YML)
    services = serve_services(compose)
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    api_targets = [t for sc in jobs["stride-api"]["static_configs"] for t in sc["targets"]]
    assert api_targets == [f"api:{flag(services['api'], '--port')}"]
    dns = jobs["stride-worker"]["dns_sd_configs"]
    assert len(dns) == 1 and dns[0]["type"] == "A"
    workers = {n for n, argv in services.items() if parser().parse_args(argv).role == "worker"}
    assert set(dns[0]["names"]) == workers, "every worker service (and nothing else) is discovered"
    for n in workers:
        assert int(flag(services[n], "--metrics-port")) == dns[0]["port"], n


# -- dockerfile ------------------------------------------------------------------------------------------
def test_dockerfile_structure():
    args, stages = dockerfile_stages()
    assert {"artifacts", "cpu-builder", "cpu", "cuda-builder", "cuda"} <= set(stages)
    assert list(stages)[-1] == "cuda", "the default target (last stage) is the CUDA image"
    assert stages["cpu"][0] == stages["cpu-builder"][0] == "python:3.11-slim"
    assert stages["cuda"][0] == stages["cuda-builder"][0]
    assert re.match(r"nvidia/cuda:.*-runtime-", stages["cuda"][0])
    ci_pin = re.search(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert args["TORCH_VERSION"] == ci_pin, "the image pins torch as .ci/run does"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["ARTIFACTS"] == "artifacts"
    for builder, extras, index in (("cpu-builder", "serve,diffusers", "TORCH_CPU_INDEX"),
                                   ("cuda-builder", "serve,gpu,diffusers", "TORCH_CUDA_INDEX")):
        runs = [a for k, a in stages[builder][1] if k == "RUN"]
        assert any('"torch==${TORCH_VERSION}"' in r and f'"${{{index}}}"' in r for r in runs), builder
        assert any(f'"/src[{extras}]" "torch==${{TORCH_VERSION}}"' in r for r in runs), builder
    for name in ("cpu", "cuda"):
        ins = stages[name][1]
        kws = [k for k, _ in ins]
        users = [a for k, a in ins if k == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{name}: runs as a non-root user"
        assert "HEALTHCHECK" in kws and "/healthz" in HEALTHCHECK.read_text(), name
        assert any(k == "EXPOSE" and "8000" in a.split() for k, a in ins), name
        cmd = [a for k, a in ins if k in ("CMD", "ENTRYPOINT")]
        assert cmd and json.loads(cmd[-1])[:2] == ["stride", "serve"], name
        assert any(k == "COPY" and "--from=artifacts" in a for k, a in ins), f"{name}: artifacts baked in"
    # every source the Dockerfile COPYs from the context is let through .dockerignore's allow-list
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for _, ins in stages.values():
        for k, a in ins:
            if k == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    assert src == "." or src.rstrip("/") in allowed, f"{src} is excluded by .dockerignore"
    # the packages pyproject installs are all copied into the builders
    for builder in ("cpu-builder", "cuda-builder"):
        copies = [a for k, a in stages[builder][1] if k == "COPY"]
        for pkg in re.findall(r'"(\w+)\*"', (ROOT / "pyproject.toml").read_text()):
            assert f"{pkg} /src/{pkg}" in copies, f"{builder} does not copy package {pkg}"


# -- grafana ------------------------------------------------------------------------------------------------
def dashboard_panels():
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        out += [p] + p.get("panels", [])  # rows may nest their panels when collapsed
    return dash, [p for p in out if p["type"] != "row"]


def test_grafana_provisioning_is_consistent(compose):
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    uid = ds[0]["uid"]
    assert ds[0]["url"] == "http://prometheus:9090" and ds[0]["type"] == "prometheus"
    prom = load_yaml(PROMETHEUS_YML)
    assert ds[0]["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "stride.yml")["providers"][0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == "./docker/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    assert "${DS_" not in DASHBOARD.read_text(), "a datasource reference of an export for sharing fails"
    dash, panels = dashboard_panels()
    assert dash["uid"] and len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for needed in ("latency vs steps", "throughput by steps", "batch size", "queue depth", "queue wait",
                   "rejected requests by reason", "live workers"):
        assert needed in titles, needed


# -- the topology -------------------------------------------------------------------------------------------
LATENCY_COUNT = "sum(stride_request_duration_seconds_count)"
GRAFANA_VARS = {"$__rate_interval": "15s", "$__range": "2m", "$__interval": "5s", "$model": ".*"}


def promql(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):  # longest first: no name is cut by a shorter one
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, timeout=10.0):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Procs:
    def __init__(self, logdir: Path):
        self.logdir, self.procs = logdir, {}

    def start(self, name, argv, env=None):
        with open(self.logdir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                                start_new_session=True)
        return self.procs[name]

    def logs(self) -> str:
        return "\n".join(f"--- {n} (exit {p.poll()}) ---\n"
                         + (self.logdir / f"{n}.log").read_text(errors="replace")[-3000:]
                         for n, p in self.procs.items())

    def alive(self):
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"exited early: {dead}\n{self.logs()}"

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(what, fn, timeout, procs):
    end = time.time() + timeout
    while time.time() < end:
        procs.alive()
        try:
            if fn():
                return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}\n{procs.logs()}")


@pytest.fixture
def topology(compose, tmp_path):
    redis_server, prometheus = need("redis-server"), need("prometheus")
    services = serve_services(compose)
    procs = Procs(tmp_path)
    ports = {"redis": free_port(), "api": free_port(), "prometheus": free_port()}
    try:
        procs.start("redis", [redis_server, "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])
        base = {k: v for k, v in os.environ.items() if not (k.startswith("STRIDE_") or k == "REDIS_URL")}
        base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]).rstrip(os.pathsep)

        def service_env(name):
            env = dict(base)
            env.update({k: v for k, v in image_env("cpu").items() if k.startswith("STRIDE_")})
            env.update({k: str(v) for k, v in stride_env(compose["services"][name]).items() if v is not None})
            # loopback instead of the compose network; the analytic test model instead of artifacts/
            env.update(REDIS_URL=f"redis://127.0.0.1:{ports['redis']}/0", STRIDE_HOST="127.0.0.1",
                       STRIDE_TEST_MODEL="gmm", STRIDE_THREADS="1")
            return env

        def argv_for(name, **port_flags):
            argv = list(services[name])
            for fl, value in port_flags.items():
                fl = "--" + fl.replace("_", "-")
                assert fl in argv, f"{name}'s command has no {fl}"
                argv[argv.index(fl) + 1] = str(value)
            return [sys.executable, "-m", "stride_diffusion.cli", "serve", *argv]

        def redis_up():
            socket.create_connection(("127.0.0.1", ports["redis"]), 0.5).close()
            return True

        wait_for("redis", redis_up, 10, procs)
        procs.start("api", argv_for("api", port=ports["api"]), service_env("api"))
        workers = []
        for i in range(2):
            ports[f"worker{i}"] = free_port()
            procs.start(f"worker{i}", argv_for("worker-cpu", metrics_port=ports[f"worker{i}"]),
                        service_env("worker-cpu"))
            workers.append(f"worker{i}")

        # the project's scrape config, targets moved to loopback, scraped every second
        prom = load_yaml(PROMETHEUS_YML)
        prom["global"].update(scrape_interval="1s", evaluation_interval="1s")
        address = {"api": [f"127.0.0.1:{ports['api']}"], "worker": [],
                   "worker-cpu": [f"127.0.0.1:{ports[w]}" for w in workers]}
        for job in prom["scrape_configs"]:
            groups = []
            for sc in job.pop("static_configs", []):
                for t in sc["targets"]:
                    groups.append({"targets": address[t.split(":")[0]], "labels": sc.get("labels", {})})
            for sd in job.pop("dns_sd_configs", []):
                for name in sd["names"]:  # what Docker's DNS would answer, and the label dns_sd would set
                    if address[name]:
                        groups.append({"targets": address[name], "labels": {"__meta_dns_name": name}})
            job["static_configs"] = groups
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(json.dumps(prom))  # JSON is YAML
        procs.start("prometheus", [prometheus, f"--config.file={cfg}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{ports['prometheus']}"])
        yield procs, ports, workers
    finally:
        procs.stop()


def prom_query(port, expr):
    status, body = http(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    reply = json.loads(body)
    assert status == 200 and reply["status"] == "success", f"{expr}: {reply}"
    return reply["data"]["result"]


def finite(result):
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.mark.slow
def test_topology_every_dashboard_query_returns_data(topology):
    procs, ports, workers = topology
    api = f"http://127.0.0.1:{ports['api']}"
    wait_for("the API to see two ready workers",
             lambda: http(f"{api}/readyz", timeout=2)[0] == 200
             and json.loads(http(f"{api}/readyz")[1])["workers"].get("gmm", 0) >= 2, 45, procs)

    # the image's health check, against the API and a worker, as Docker would run it
    for name in ("api", workers[0]):
        r = subprocess.run([sys.executable, str(HEALTHCHECK), str(procs.procs[name].pid)], check=False,
                           capture_output=True, text=True, timeout=20,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, f"health check of {name}: {r.stderr}"

    steps = [1, 2, 4, 8]
    reqs = [(s, i) for i in range(6) for s in steps]

    def generate(item):
        s, i = item
        body = json.dumps({"class_label": i % 10, "seed": i, "steps": s, "n": 1 + i % 2,
                           "guidance": 1.0 + i % 2}).encode()
        return s, http(f"{api}/generate", body, timeout=30)[0]

    port = ports["prometheus"]
    # Two waves: a labelled series is born at its first observation, and Prometheus's first sample of
    # it already holds that count, so rate() only sees what comes after it was first scraped.
    sent = images = 0
    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(generate, reqs))
        assert all(c == 200 for _, c in codes), codes
        streamed = json.dumps({"class_label": 3, "steps": 4, "preview": True}).encode()  # the streaming panel
        assert http(f"{api}/generate/stream", streamed, timeout=30)[0] == 200
        sent, images = sent + len(reqs), images + sum(1 + i % 2 for _, i in reqs)
        wait_for("Prometheus to scrape every image",
                 lambda n=images: sum(finite(prom_query(port, "sum(stride_images_total)"))) >= n, 30, procs)
        wait_for("Prometheus to scrape the API's latency histogram",
                 lambda n=sent: sum(finite(prom_query(port, LATENCY_COUNT))) >= n, 15, procs)
    not_offered = json.dumps({"class_label": 0, "steps": 7}).encode()
    assert http(f"{api}/generate", not_offered)[0] == 422  # counted as rejected, reason "invalid"
    time.sleep(1.5)  # one more scrape after the last request

    # the scrape config found every target, and the fleet is what the dashboard says it is
    up = {r["metric"]["job"]: r["value"][1] for r in prom_query(port, "count by (job) (up == 1)")}
    assert up == {"stride-api": "1", "stride-worker": "2"}, up
    assert finite(prom_query(port, "sum(stride_worker_ready)")) == [2.0]
    assert {r["metric"]["service"] for r in prom_query(port, 'up{job="stride-worker"}')} == {"worker-cpu"}
    by_steps = prom_query(port, promql('histogram_quantile(0.5, sum by (le, steps) '
                                       '(rate(stride_request_duration_seconds_bucket[$__range])))'))
    assert {r["metric"]["steps"] for r in by_steps if finite([r])} == {str(s) for s in steps}

    _, panels = dashboard_panels()
    empty = []
    for p in panels:
        for t in p["targets"]:
            expr = promql(t["expr"])
            if not finite(prom_query(port, expr)):
                empty.append(f"{p['title']}: {expr}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"]).groups()
        assert {r["metric"].get(label) for r in prom_query(port, metric)} >= {"gmm"}, var["name"]


# -- a plain `up`, Redis persistence, and the files the docs name --------------------------------------
def _env_file_profiles() -> list[str]:
    for line in (ROOT / ".env").read_text().splitlines():
        k, _, v = line.partition("=")
        if k.strip() == "COMPOSE_PROFILES":
            return [p.strip() for p in v.split(",") if p.strip()]
    return []


def _started(profiles_env: str | None) -> set:
    """Services `docker compose up` starts: Compose's resolved config (cwd = the project, so .env is
    read), keeping those without a profile or with an active one (Compose v1's `config` lists every
    service; v2's lists the active ones)."""
    env = {k: v for k, v in os.environ.items() if k != "COMPOSE_PROFILES"}
    if profiles_env is not None:
        env["COMPOSE_PROFILES"] = profiles_env
    r = subprocess.run([*compose_cmd(), "config"], check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    import yaml

    services = yaml.safe_load(r.stdout)["services"]
    active = set(profiles_env.split(",")) if profiles_env is not None else set(_env_file_profiles())
    return {n for n, s in services.items() if not s.get("profiles") or active & set(s["profiles"])}


def test_plain_compose_up_starts_redis_api_a_gpu_worker_prometheus_grafana():
    assert _env_file_profiles() == ["gpu"], "the committed .env makes a plain `up` start the GPU worker"
    assert _started(None) == {"redis", "api", "worker", "prometheus", "grafana"}
    # CPU hosts: one variable
    assert _started("cpu") == {"redis", "api", "worker-cpu", "prometheus", "grafana"}


def test_compose_redis_keeps_an_append_only_file(compose):
    redis_svc = compose["services"]["redis"]
    cmd = redis_svc["command"]
    assert cmd[0] == "redis-server" and flag(cmd, "--appendonly") == "yes"
    assert flag(cmd, "--appendfsync") in ("everysec", "always")
    assert any(str(v).endswith(":/data") for v in redis_svc["volumes"]), "the AOF must outlive the container"


def _links(text: str) -> set:
    """Relative Markdown link targets (images too), without their #fragment."""
    return {t.split("#")[0] for t in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+:|#", t)}


def _named_paths(text: str, markdown: bool) -> set:
    """Repository paths a file names in inline code (Markdown) or anywhere (YAML) whose first part is a
    top-level entry of the repository. Placeholders (<N>, *), URLs and GitHub references
    (owner/repo#123) are not paths."""
    top = {p.name for p in ROOT.iterdir()} - {".git"}
    out = set()
    if markdown:
        candidates = re.findall(r"`([^`\s]+)`", text)
    else:
        candidates = re.findall(r"(?<![\w/.:-])(?:\./)?[\w.-]+(?:/[\w.-]+)+(?![\w#])", text)
    for c in candidates:
        c = c.rstrip(".,:;)").removeprefix("./").split("::")[0]  # a pytest node id names its file
        repo_path = c.split("/")[0] in top or "/" in c and re.search(r"\.(md|ya?ml|json|py|sh|toml)$", c)
        if repo_path and not c.startswith("/") and not re.search(r"[<>*{}$|#]|\.\.\.", c):
            out.add(c)
    return out


def _heading_anchors(text: str) -> set:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for h in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.DOTALL), re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))
    return out


# Inline paths may be given from the import namespace (`service/app.py`) or from inside one of its
# packages (`samplers/base.py`, `adapters/__init__.py`), as docs/ does.
PACKAGE_ROOTS = [ROOT, ROOT / "stride_diffusion", *sorted(p for p in (ROOT / "stride_diffusion").iterdir() if p.is_dir())]
# files a worked example creates (docs/samplers.md adds a family)
EXAMPLE_PATHS = {"stride_diffusion/solvers/samplers/times.py"}


def _exists(p: str) -> bool:
    return p in EXAMPLE_PATHS or any((r / p).exists() for r in PACKAGE_ROOTS)


DOCS = ["README.md", "compose.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("name", DOCS)
def test_every_relative_link_and_path_named_exists(name):
    """Paths in inline code are repository paths; a Markdown link resolves from the file's own folder,
    as GitHub resolves it, and a #fragment names a heading of its target."""
    path = ROOT / name
    text = path.read_text()
    named = _named_paths(text, path.suffix == ".md")
    assert named, f"{name}: no paths found: the scan is broken"
    missing = sorted(p for p in named if not _exists(p))
    assert not missing, f"{name} names files that do not exist: {missing}"
    if path.suffix == ".md":
        broken = sorted(t for t in _links(text) if not (path.parent / t).exists())
        assert not broken, f"{name} links to files that do not exist (relative to {path.parent.name}/): {broken}"
        for target in re.findall(r"\]\(([^)\s]*#[\w-]+)\)", text):
            file, _, anchor = target.partition("#")
            if re.match(r"[a-z]+:", file):
                continue
            dest = path.parent / file if file else path
            if dest.suffix == ".md":
                assert anchor in _heading_anchors(dest.read_text()), f"{name}: no heading #{anchor} in {dest.name}"
    assert "../shared" not in path.read_text() and "DESIGN.md" not in path.read_text()
