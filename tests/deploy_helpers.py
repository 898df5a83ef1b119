"""Helpers shared by the tests of the deployment files (test_deploy.py: compose and Docker;
test_k8s.py: Kubernetes): a YAML loader, tools that may be missing, the Dockerfile's stages."""
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def load_yaml(path: Path):
    try:
        import yaml
    except ImportError:
        sys_py = "/usr/bin/python3"
        code = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"
        has_yaml = os.path.exists(sys_py) and subprocess.run([sys_py, "-c", "import yaml"], check=False,
                                                             capture_output=True).returncode == 0
        if not has_yaml:
            pytest.skip("no YAML parser: install pyyaml (or python3-yaml for /usr/bin/python3)")
        return json.loads(subprocess.run([sys_py, "-c", code, str(path)], check=True, capture_output=True,
                                         text=True).stdout)
    return yaml.safe_load(path.read_text())


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return path


def dockerfile_stages():
    """Stage name -> (FROM image, its instructions as (KEYWORD, args)); ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args, stages, cur = {}, {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kw, _, rest = line.partition(" ")
        kw = kw.upper()
        if kw == "ARG" and cur is None and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        elif kw == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            image = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), g.group(0)), m.group(1))
            cur = m.group(2)
            stages[cur] = (image, [])
        elif cur is not None:
            stages[cur][1].append((kw, rest.strip()))
    return args, stages


def image_env(stage: str) -> dict:
    """ENV of a Dockerfile stage (KEY=VALUE pairs), as the container would see it."""
    env = {}
    for k, a in dockerfile_stages()[1][stage][1]:
        if k == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(a))
    return env
