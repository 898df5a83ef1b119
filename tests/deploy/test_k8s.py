"""Kubernetes manifests (deploy/k8s) proven without a cluster.

- every overlay renders with kustomize (`kubectl kustomize`, or the `kustomize` binary), and every
  rendered object validates strictly (unknown fields are errors) against the Kubernetes schemas of
  the oldest and newest versions kubernetes-validate ships; KEDA's ScaledObject, a custom resource
  those schemas lack, against the CRD schema bundled in tests/schemas (KEDA v2.20.2);
- every `stride serve` command, environment variable, port and probe path in them is one the CLI,
  the settings and the API accept, and the grace periods cover the drain and the request deadline;
- the ScaledObject reads the streams and the consumer group stride really uses, on the Redis the
  services use, with metadata keys KEDA's scalers know;
- Prometheus's pod discovery keeps exactly the API's and the workers' metrics ports; Grafana gets
  the compose stack's dashboard file itself.
"""
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import urllib.parse

import pytest
from deploy_helpers import ROOT, dockerfile_stages, image_env, load_yaml, need

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["gpu", "cpu", "gpu-scale-to-zero"]
GRAFANA = ROOT / "docker" / "grafana"
KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda-scaledobject.json"
# Trigger metadata KEDA v2.20.2 reads (pkg/scalers/redis_streams_scaler.go with redis_scaler.go's
# connection fields; prometheus_scaler.go); an unknown key is ignored by KEDA, so a typo would be silent.
KEDA_METADATA = {
    "redis-streams": {"stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
                      "activationLagCount", "databaseIndex", "enableTLS", "address", "addresses", "host", "hosts",
                      "port", "ports", "username", "sentinelUsername", "sentinelMaster", "unsafeSsl",
                      "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv", "passwordFromEnv"},
    "prometheus": {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
                   "customHeaders", "ignoreNullValues", "unsafeSsl"},
}


@functools.cache
def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(K8S / overlay)]
    else:
        cmd = [need("kustomize"), "build", str(K8S / overlay)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stderr}"
    import yaml

    return [d for d in yaml.safe_load_all(r.stdout) if d]


def find(objs, kind, name=None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))]


def one(objs, kind, name) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}*: {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(deploy) -> dict:
    cs = deploy["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1
    return cs[0]


def container_env(objs, c) -> dict:
    """What the container's environment sets: envFrom ConfigMaps, then env (None: from a Secret)."""
    env = {}
    for src in c.get("envFrom", []):
        env.update(one(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def serve_settings(objs, deploy, monkeypatch):
    """The Settings the container's `stride serve` resolves: its flags over its environment over the
    image's ENV (stride:cpu / stride:cuda: the Dockerfile stage of that name)."""
    from stride_diffusion.service.cli import parser, settings_from
    from stride_diffusion.service.settings import Settings

    c = container(deploy)
    argv = c.get("command", []) + c.get("args", [])
    assert argv[:2] == ["stride", "serve"], argv
    fields = set(Settings.model_fields)
    env = container_env(objs, c)
    for key in env:
        assert key == "REDIS_URL" or (key.startswith("STRIDE_") and key[7:].lower() in fields), \
            f"{deploy['metadata']['name']}: {key} is no setting of `stride serve`"
    for key in [k for k in os.environ if k.startswith("STRIDE_") or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    stage = c["image"].rsplit(":", 1)[1]
    for key, value in {**image_env(stage), **env}.items():
        if (key.startswith("STRIDE_") or key == "REDIS_URL") and value is not None:
            monkeypatch.setenv(key, value)
    try:
        args = parser().parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` is rejected by the CLI")
    return settings_from(args)


def port(c, name) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def pod_labels(o) -> dict:
    return o["spec"]["template"]["metadata"]["labels"]


# -- rendering and schemas ----------------------------------------------------------------------------
def strict(schema):
    """A CRD schema as the API server prunes it, made strict: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [strict(s) for s in schema] if isinstance(schema, list) else schema


def validate(obj):
    import jsonschema
    import kubernetes_validate as kv

    if obj["kind"] == "ScaledObject":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(obj, strict(json.loads(KEDA_SCHEMA.read_text())))
        return
    for version in (kv.utils.all_versions()[0], kv.latest_version()):
        kv.validate(obj, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    objs = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"].split("-")[0]) for o in objs}
    for needed in [("Deployment", "stride"), ("StatefulSet", "stride"), ("HorizontalPodAutoscaler", "stride"),
                   ("PodDisruptionBudget", "stride"), ("Deployment", "prometheus"), ("Deployment", "grafana")]:
        assert needed in kinds, needed
    assert bool(find(objs, "ScaledObject")) == overlay.startswith("gpu")
    for o in objs:
        assert o["metadata"].get("namespace", "stride") == "stride" or o["kind"] == "Namespace"
        validate(o)


def test_validation_rejects_unknown_fields():
    """The schema checks above are strict: a misspelt field fails them (KEDA ignores, the API server prunes)."""
    import jsonschema
    import kubernetes_validate as kv

    objs = render("gpu")
    worker = copy.deepcopy(one(objs, "Deployment", "stride-worker"))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kv.ValidationError):
        validate(worker)
    so = copy.deepcopy(one(objs, "ScaledObject", "stride-worker"))
    so["spec"]["minReplicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate(so)


# -- stride serve --------------------------------------------------------------------------------------
@functools.cache
def api_paths() -> set:
    from stride_diffusion.service.app import create_app
    from stride_diffusion.service.settings import Settings

    return {r.path for r in create_app(Settings(test_model="gmm")).routes}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_environment_ports_and_probes_are_what_stride_serve_serves(overlay, monkeypatch):
    from stride_diffusion.service.transport import WAIT_GRACE_S

    objs = render(overlay)
    api_d, worker_d = one(objs, "Deployment", "stride-api"), one(objs, "Deployment", "stride-worker")
    api, worker = serve_settings(objs, api_d, monkeypatch), serve_settings(objs, worker_d, monkeypatch)
    assert api.role == "api" and worker.role == "worker"
    for k in ("artifacts", "steps", "redis_url", "key_prefix", "max_batch", "deadline_s"):
        assert getattr(worker, k) == getattr(api, k), f"worker and api disagree on {k}"

    # API: its port, the Service's, and probe paths the app serves
    c = container(api_d)
    assert port(c, "http") == api.port
    svc = one(objs, "Service", "stride-api")
    assert svc["spec"]["selector"].items() <= pod_labels(api_d).items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    probes = {k: c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    for name, p in probes.items():
        assert p["httpGet"]["port"] == "http" and p["httpGet"]["path"] in api_paths(), name
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ready = "/healthz" if overlay == "gpu-scale-to-zero" else "/readyz"  # no worker: still in the Service
    assert probes["readinessProbe"]["httpGet"]["path"] == ready
    # SIGTERM: a request the API holds ends by its deadline; the preStop pause comes first
    pause = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert api_d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pause + api.deadline_s + WAIT_GRACE_S

    # worker: metrics port, readiness from it through the image's health check, grace = drain + margin
    c = container(worker_d)
    assert port(c, "metrics") == worker.metrics_port
    cmd = c["readinessProbe"]["exec"]["command"]
    stage = c["image"].rsplit(":", 1)[1]
    copies = [a.split() for k, a in dockerfile_stages()[1][stage][1] if k == "COPY"]
    assert cmd[0] == "python" and ["docker/healthcheck.py", cmd[1]] in copies, cmd
    grace = worker_d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert worker.drain_timeout_s + 5 <= grace <= worker.drain_timeout_s + 15, (grace, worker.drain_timeout_s)

    # one GPU per worker pod in the gpu overlays, none on CPU; the image matches the device
    limits = c.get("resources", {}).get("limits", {})
    if overlay.startswith("gpu"):
        assert worker.device == "cuda" and stage == "cuda" and limits.get("nvidia.com/gpu") == 1
    else:
        assert worker.device == "cpu" and stage == "cpu" and "nvidia.com/gpu" not in limits
    assert container(api_d)["image"].endswith(":cpu"), "the API runs no model"

    # the queue the services are told about is the Redis Service of the base
    url = urllib.parse.urlsplit(api.redis_url)
    redis_svc = one(objs, "Service", "stride-redis")
    assert url.hostname == redis_svc["metadata"]["name"]
    assert url.port == redis_svc["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_api_and_workers(overlay):
    objs = render(overlay)
    pdbs = find(objs, "PodDisruptionBudget")
    for name in ("stride-api", "stride-worker"):
        labels = pod_labels(one(objs, "Deployment", name))
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), name
    hpa = one(objs, "HorizontalPodAutoscaler", "stride-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "stride-api"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container(one(objs, "Deployment", "stride-api"))["resources"]["requests"]


def test_redis_keeps_the_queue_on_a_volume():
    objs = render("cpu")
    sts = one(objs, "StatefulSet", "stride-redis")
    c = container(sts)
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data = args[args.index("--dir") + 1]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == data)
    assert mount["name"] in [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert sts["spec"]["serviceName"] == one(objs, "Service", "stride-redis")["metadata"]["name"]
    assert int(re.match(r"redis:(\d+)", c["image"]).group(1)) >= 7, "KEDA's lagCount needs Redis 7"


# -- KEDA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ["gpu", "gpu-scale-to-zero"])
def test_scaledobject_reads_the_streams_and_group_stride_uses(overlay, monkeypatch):
    from stride_diffusion.service.metrics import REASONS
    from stride_diffusion.service.models import load_registry
    from stride_diffusion.service.redis_queue import GROUP, Keys

    objs = render(overlay)
    worker_d = one(objs, "Deployment", "stride-worker")
    worker = serve_settings(objs, worker_d, monkeypatch)
    monkeypatch.chdir(ROOT)  # the artifacts the image bakes in, at the paths the settings name
    models = load_registry(worker, "cpu").names()
    so = one(objs, "ScaledObject", "stride-worker")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == worker_d["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert "replicas" not in worker_d["spec"], "KEDA owns the worker count"

    url = urllib.parse.urlsplit(worker.redis_url)
    ns = one(objs, "Service", "stride-redis")["metadata"]["namespace"]
    streams = {}
    for t in spec["triggers"]:
        assert set(t["metadata"]) <= KEDA_METADATA[t["type"]], t
        if t["type"] != "redis-streams":
            continue
        m = t["metadata"]
        assert m["consumerGroup"] == GROUP
        assert m["address"] == f"{url.hostname}.{ns}.svc.cluster.local:{url.port}"  # KEDA runs in its own namespace
        assert m["databaseIndex"] == url.path.strip("/")
        streams.setdefault(m["stream"], set()).update({"pendingEntriesCount", "lagCount"} & set(m))
    assert streams == {Keys(worker.key_prefix).stream(name): {"pendingEntriesCount", "lagCount"} for name in models}

    if overlay == "gpu-scale-to-zero":
        assert spec["minReplicaCount"] == 0
        wake = [t for t in spec["triggers"] if t["type"] == "prometheus"]
        assert len(wake) == 1
        m = wake[0]["metadata"]
        prom = one(objs, "Service", "prometheus")
        assert m["serverAddress"] == (f"http://{prom['metadata']['name']}.{prom['metadata']['namespace']}"
                                      f".svc.cluster.local:{prom['spec']['ports'][0]['port']}")
        reason = re.search(r'stride_rejected_total\{reason="(\w+)"\}', m["query"]).group(1)
        assert reason == "no_worker" and reason in REASONS


# -- monitoring --------------------------------------------------------------------------------------------
def relabel_keep(config_job, labels: dict) -> bool:
    """Prometheus's `keep` relabelling: source label values joined by ';' must fully match the regex."""
    for rule in config_job.get("relabel_configs", []):
        if rule.get("action") == "keep":
            value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
            if not re.fullmatch(rule["regex"], value):
                return False
    return True


def sd_targets(objs):
    """What Kubernetes pod discovery offers: one target per container port of every pod template."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            meta = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                    for k, v in pod_labels(o).items()}
            for c in o["spec"]["template"]["spec"]["containers"]:
                for p in c.get("ports", []):
                    out.append(({**meta, "__meta_kubernetes_pod_container_port_name": p["name"]},
                                (o["metadata"]["name"], p["containerPort"])))
    return out


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_prometheus_discovers_the_api_and_worker_metrics_ports(overlay, monkeypatch, tmp_path):
    import yaml

    objs = render(overlay)
    cfg = yaml.safe_load(one(objs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {j["job_name"] for j in load_yaml(ROOT / "docker" / "prometheus.yml")["scrape_configs"]}
    api = serve_settings(objs, one(objs, "Deployment", "stride-api"), monkeypatch)
    worker = serve_settings(objs, one(objs, "Deployment", "stride-worker"), monkeypatch)
    kept = {name: {t for labels, t in sd_targets(objs) if relabel_keep(job, labels)} for name, job in jobs.items()}
    assert kept == {"stride-api": {("stride-api", api.port)}, "stride-worker": {("stride-worker", worker.metrics_port)}}
    for job in jobs.values():
        assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert cfg["global"]["scrape_interval"] == ds["jsonData"]["timeInterval"]
    # promtool checks the rest; Debian's Prometheus is built without Kubernetes discovery, so the
    # discovery block is swapped for a static target first
    promtool = need("promtool")
    for job in cfg["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    (tmp_path / "prometheus.yml").write_text(json.dumps(cfg))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_grafana_gets_the_compose_dashboard_itself(overlay):
    objs = render(overlay)
    dash = one(objs, "ConfigMap", "grafana-dashboards")
    assert dash["data"] == {"stride.json": (GRAFANA / "dashboards" / "stride.json").read_text()}
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    provider_file = GRAFANA / "provisioning" / "dashboards" / "stride.yml"
    ds_file = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
    assert one(objs, "ConfigMap", "grafana-dashboard-provider")["data"] == {"stride.yml": provider_file.read_text()}
    assert one(objs, "ConfigMap", "grafana-datasources")["data"] == {"prometheus.yml": ds_file.read_text()}
    g = one(objs, "Deployment", "grafana")
    c = container(g)
    volumes = {v["name"]: v["configMap"]["name"] for v in g["spec"]["template"]["spec"]["volumes"]}
    mounts = {volumes[m["name"]].rsplit("-", 1)[0]: m["mountPath"] for m in c["volumeMounts"]}
    provider = load_yaml(provider_file)["providers"][0]
    assert mounts["grafana-dashboards"] == provider["options"]["path"]
    assert mounts["grafana-datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["grafana-dashboard-provider"] == "/etc/grafana/provisioning/dashboards"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == provider["options"]["path"] + "/stride.json"
    # the datasource's URL is the Prometheus Service of this namespace
    url = urllib.parse.urlsplit(load_yaml(ds_file)["datasources"][0]["url"])
    prom = one(objs, "Service", "prometheus")
    assert (url.hostname, url.port) == (prom["metadata"]["name"], prom["spec"]["ports"][0]["port"])
    assert not list(K8S.rglob("*.json")), "no second copy of a dashboard under deploy/k8s"


def test_keda_reads_running_and_waiting_requests_from_strides_stream():
    """What KEDA's redis-streams scaler reads (XPENDING's count; XINFO GROUPS' lag, Redis >= 7) is, on
    stride's stream as the worker transport uses it (acknowledged entries are also deleted): the
    requests running and the requests no worker has read yet."""
    import asyncio
    import time

    from service_fixtures import RedisServer

    from stride_diffusion.service.jobs import Job, Outcome, Result
    from stride_diffusion.service.metrics import Metrics
    from stride_diffusion.service.redis_queue import GROUP, RedisWorkerTransport
    from stride_diffusion.service.settings import Settings

    rs = RedisServer()
    try:
        r = rs.client()
        if int(r.info()["redis_version"].split(".")[0]) < 7:
            pytest.skip("XINFO GROUPS lag needs Redis >= 7")
        s = Settings(role="worker", redis_url=rs.url, test_model="gmm", worker_id="w1")

        async def scenario():
            t = RedisWorkerTransport(s, ["gmm"], Metrics(process=False))
            await t.start()  # creates the group, as a worker does
            stream = t.streams[0]
            now = time.time()
            for i in range(10):
                await t.r.xadd(stream, {"job": Job(f"j{i}", "gmm", 4, "euler", 0, 1, i, 1.0, "png", now + 30,
                                                   now).dumps()})
            jobs = await t.fetch(4, 0)  # a worker takes 4 ...
            for j in jobs[:3]:  # ... and finishes 3
                await t.complete(j, Result(j.id, Outcome.OK, ""))
            await t.close()
            return stream

        stream = asyncio.run(scenario())
        group = next(g for g in r.xinfo_groups(stream) if g["name"].decode() == GROUP)
        assert r.xpending(stream, GROUP)["pending"] == 1  # pendingEntriesCount: running
        assert group["lag"] == 6  # lagCount: waiting, never read
        assert r.xlen(stream) == 7
    finally:
        rs.stop()
