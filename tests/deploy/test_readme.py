"""Every command in the README runs as written, or is checked against what it names.

Each fenced block of README.md is read and every command in it is classified; a command with no
check here fails the test, so a new command in the README needs one. Checks by kind:

- `scripts/demo.sh` is run for real (with the repository's `.venv`, which it reuses, on a free
  port): it must print how to get `stride` on PATH and serve the demo model; the curl commands and
  the OpenAI example of the "HTTP API" section then run against it, as written but for the port;
- `stride serve|offline ...` (also `.venv/bin/stride`) must parse with the real argument parsers;
- curl elsewhere: the route exists with that method, and every query or JSON field is a request field;
- pip extras exist in pyproject.toml; files, Dockerfile targets, compose services and profiles,
  kustomize directories and Kubernetes objects that a command names exist;
- every Python block compiles.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LIVE_SECTIONS = ("HTTP API",)  # `## ` sections whose curl commands and Python run against the demo server
DEMO_PORT = "127.0.0.1:8000"


# -- reading the README -------------------------------------------------------------------------------
def blocks(text: str) -> list[tuple[str, str, str]]:
    """(the `## ` section it is under, language, body) of every fenced block."""
    out, section, lang, body = [], "", None, []
    for line in text.splitlines():
        if lang is None:
            if line.startswith("## "):
                section = line[3:].strip()
            m = re.match(r"^```(\w*)\s*$", line)
            if m:
                lang, body = m.group(1), []
        elif line.startswith("```"):
            out.append((section, lang, "\n".join(body)))
            lang = None
        else:
            body.append(line)
    assert lang is None, "an unclosed code fence in README.md"
    return out


def commands(body: str) -> list[list[str]]:
    """The shell commands of a bash block: continuation lines joined, comments dropped, split on
    `&&` and `;`, leading VAR=value assignments kept as a first element ('env', {...})."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cur: list[str] = []
        for w in [*words, "&&"]:
            if w in ("&&", ";"):
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(w)
    return out


def readme_blocks():
    return blocks(README.read_text())


def bash_commands(live: bool | None = None):
    for section, lang, body in readme_blocks():
        if lang in ("bash", "sh") and (live is None or (section in LIVE_SECTIONS) == live):
            yield from ((section, c) for c in commands(body))


def split_env(cmd: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):
        k, v = cmd[0].split("=", 1)
        env[k], cmd = v, cmd[1:]
    return env, cmd


# -- what the commands name -------------------------------------------------------------------------------
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def extras_of(spec: str) -> list[str]:
    m = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
    assert m, f"pip install -e takes '.[extra,...]' here, got {spec!r}"
    return m.group(1).split(",")


def check_pip(args: list[str]):
    assert args[:1] == ["install"], args
    extras = pyproject()["project"]["optional-dependencies"]
    rest = args[1:]
    if rest[:1] == ["-e"]:
        for e in extras_of(rest[1]):
            assert e in extras, f"pip install -e '.[{e}]': no such extra in pyproject.toml ({sorted(extras)})"
        return
    # a plain requirement (outside a clone): it must be what an extra pins, so the two stay one
    for req in rest:
        assert any(req in deps for deps in extras.values()), f"pip install {req}: not the pin of any extra"


def check_stride(argv: list[str]):
    if argv[:1] == ["serve"]:
        from stride_diffusion.service.cli import parser
    elif argv[:1] == ["offline"]:
        from stride_diffusion.offline.cli import parser
    else:
        pytest.fail(f"stride {' '.join(argv)}: neither `stride serve` nor `stride offline`")
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            parser().parse_args(argv[1:])
        assert e.value.code == 0
        return
    try:
        parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`stride {' '.join(argv)}` does not parse (see the usage message above)")


def routes() -> dict[str, set[str]]:
    from stride_diffusion.service.app import create_app
    from stride_diffusion.service.settings import Settings

    app = create_app(Settings(artifacts=[str(ROOT / "artifacts" / "digits")]))
    out: dict[str, set[str]] = {}
    for r in app.routes:
        if hasattr(r, "methods"):
            out.setdefault(r.path, set()).update(r.methods or ())
    return out


def curl_request(args: list[str]) -> tuple[str, str, dict, dict | None]:
    """(method, path, query, JSON body) of a curl command line."""
    method, url, body, i = "GET", None, None, 0
    takes_value = {"-X", "-o", "-H", "-d", "--retry", "--retry-delay", "-w", "--data", "--max-time"}
    while i < len(args):
        a = args[i]
        if a in takes_value:
            v = args[i + 1]
            if a == "-X":
                method = v
            elif a in ("-d", "--data"):
                body, method = json.loads(v), method if method != "GET" else "POST"
            i += 2
            continue
        if not a.startswith("-"):
            url = a
        i += 1
    assert url, f"curl {args}: no URL"
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    return method, u.path, dict(urllib.parse.parse_qsl(u.query)), body


def check_curl(args: list[str], known: dict[str, set[str]]):
    from stride_diffusion.service.params import FIELDS

    method, path, query, body = curl_request(args)
    assert path in known and method in known[path], f"curl {method} {path}: no such route ({sorted(known)})"
    if path in ("/generate", "/generate/stream"):
        for k in [*query, *(body or {})]:
            assert k in FIELDS, f"curl {path}: {k!r} is not a request field ({FIELDS})"


def compose_file() -> dict:
    from deploy_helpers import load_yaml

    return load_yaml(ROOT / "compose.yaml")


def check_docker(args: list[str], env: dict):
    if args[:1] == ["compose"]:
        services = compose_file()["services"]
        profiles = {p for s in services.values() for p in s.get("profiles", ())}
        for p in env.get("COMPOSE_PROFILES", "").split(","):
            assert not p or p in profiles, f"COMPOSE_PROFILES={p}: no such profile ({sorted(profiles)})"
        if "--scale" in args:
            name = args[args.index("--scale") + 1].split("=")[0]
            assert name in services, f"--scale {name}: no such compose service"
        assert {"up", "-d"} <= set(args), args
        return
    if args[:1] == ["build"]:
        from deploy_helpers import dockerfile_stages

        assert args[args.index("-f") + 1] == "docker/Dockerfile" and (ROOT / "docker" / "Dockerfile").exists()
        if "--target" in args:
            assert args[args.index("--target") + 1] in dockerfile_stages()[1]
        assert args[-1] == "."
        return
    assert args[:1] in (["push"], ["run"]), f"docker {args}: no check for this"


def check_kube(tool: str, args: list[str], cwd: Path):
    if tool == "kustomize":
        assert args[:3] == ["edit", "set", "image"] and (cwd / "kustomization.yaml").exists(), (args, cwd)
        name = args[3].split("=")[0]
        assert re.search(rf"^\s*- name: {re.escape(name)}\s*$", (cwd / "kustomization.yaml").read_text(), re.MULTILINE)
        return
    if "-k" in args:
        d = ROOT / args[args.index("-k") + 1]
        assert (d / "kustomization.yaml").exists(), f"kubectl -k {d}: no kustomization.yaml"
        return
    if "rollout" in args:
        kind, name = args[-1].split("/")
        assert kind == "deploy"
        assert any(re.search(rf"kind: Deployment\s*\nmetadata:\s*\n\s*name: {re.escape(name)}\b", p.read_text())
                   for p in (ROOT / "deploy" / "k8s").rglob("*.yaml")), f"no Deployment {name} in deploy/k8s"
        return
    pytest.fail(f"{tool} {args}: no check for this")


def check_command(cmd: list[str], known: dict, cwd: Path) -> Path:
    """Check one command; returns the working directory after it (`cd`)."""
    env, cmd = split_env(cmd)
    tool, args = cmd[0], cmd[1:]
    if tool == "cd":
        if args == ["-"]:
            return ROOT
        d = cwd / args[0]
        assert d.is_dir(), f"cd {args[0]}: no such directory"
        return d
    if tool in ("source", ".") and args == [".venv/bin/activate"]:
        for script in ("scripts/demo.sh", ".ci/run"):
            assert "python3 -m venv .venv" in (ROOT / script).read_text(), f"{script} does not make .venv"
        return cwd
    if tool == "scripts/demo.sh":
        assert os.access(ROOT / tool, os.X_OK)
        return cwd
    if tool == "bash" and args == [".ci/run"]:
        run = (ROOT / ".ci" / "run").read_text().strip().splitlines()
        assert run[-1] == "python -m pytest", ".ci/run must end in the suite's command"
        return cwd
    if tool in ("stride", ".venv/bin/stride"):
        check_stride(args)
        return cwd
    if tool in ("pip", ".venv/bin/pip"):
        check_pip(args)
        return cwd
    if tool in ("python", ".venv/bin/python"):
        if args[:2] == ["-m", "pytest"]:
            files = [a for a in args[2:] if not a.startswith("-")]
            assert files and all((ROOT / f).exists() for f in files), f"pytest {files}: a file is missing"
        else:
            assert (ROOT / args[0]).exists() and args[0].endswith(".py"), f"python {args[0]}: no such script"
        return cwd
    if tool == "curl":
        check_curl(args, known)
        return cwd
    if tool == "docker":
        check_docker(args, env)
        return cwd
    if tool in ("kubectl", "kustomize"):
        check_kube(tool, args, cwd)
        return cwd
    pytest.fail(f"README command with no check in tests/deploy/test_readme.py: {shlex.join(cmd)}")


# -- tests ----------------------------------------------------------------------------------------------------
def test_readme_is_a_reference_not_a_report():
    text = README.read_text()
    assert len(text.splitlines()) <= 400, "the README is a reference: long material goes to docs/"
    toc = re.findall(r"^- \[([^\]]+)\]\(#([\w-]+)\)$", text, re.MULTILINE)
    sections = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert [t for t, _ in toc] == sections, "the table of contents lists every `## ` section, in order"
    for title, anchor in toc:
        assert anchor == re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"), (title, anchor)


def test_every_command_is_checked():
    known = routes()
    cwd = ROOT
    seen = 0
    for _, cmd in bash_commands():
        cwd = check_command(cmd, known, cwd)
        seen += 1
    assert seen >= 30, f"only {seen} commands found: the README scan is broken"
    assert cwd == ROOT, "a `cd` in the README is not undone"


def test_every_python_block_compiles():
    py = [body for _, lang, body in readme_blocks() if lang == "python"]
    assert py
    for body in py:
        compile(body, "README.md", "exec")


def _demo_cmd(port: int) -> tuple[list[str], bool]:
    """scripts/demo.sh itself when the repository's .venv has stride (the script then reuses it, as on
    any second run); otherwise the command it ends in, with this interpreter."""
    if os.access(ROOT / ".venv" / "bin" / "stride", os.X_OK):
        return ["scripts/demo.sh", "--port", str(port), "--threads", "1"], True
    return [sys.executable, "-m", "stride_diffusion.cli", "serve", "--artifacts", "artifacts/digits",
            "--port", str(port), "--threads", "1"], False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from service_fixtures import free_port, wait_for

    port = free_port()
    cmd, is_script = _demo_cmd(port)
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "stride: ready on" in log.read_text(), 120, "scripts/demo.sh to serve", 0.2)
        yield port, log, is_script
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_demo_script_serves_and_says_how_to_get_stride_on_path(demo):
    _, log, is_script = demo
    text = log.read_text()
    assert "stride: ready on http://127.0.0.1:" in text
    if not is_script:
        pytest.skip("no .venv with stride here: the demo script was not run (its command was)")
    assert "source .venv/bin/activate" in text and ".venv/bin/stride" in text


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_http_api_commands_run_against_the_demo_server(demo, tmp_path):
    port = demo[0]
    ran = 0
    for section, lang, body in readme_blocks():
        if section not in LIVE_SECTIONS or lang != "bash":
            continue
        for cmd in commands(body):
            if cmd[0] != "curl":
                continue
            line = shlex.join(cmd + ["-f", "-sS"]).replace(DEMO_PORT, f"127.0.0.1:{port}")
            r = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, timeout=120, check=False)
            assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stderr.decode()}"
            if "-o" in cmd:
                from PIL import Image

                with Image.open(tmp_path / cmd[cmd.index("-o") + 1]) as im:
                    assert im.size[0] > 0
            elif "format=json" in line:
                body = json.loads(r.stdout)
                assert len(body["images"]) == 4 and body["seeds"] == [body["seed"] + i for i in range(4)]
            elif "/generate/stream" in line:  # Server-Sent Events
                events = re.findall(r"^event: (\w+)$", r.stdout.decode(), re.MULTILINE)
                assert events[0] == "queued" and events[-2:] == ["image", "done"] and "preview" in events, events
            else:
                json.loads(r.stdout)
            ran += 1
    assert ran >= 6


def run_python_example(marker: str, port: int, cwd) -> subprocess.CompletedProcess:
    """The README's one live Python block containing `marker`, run against the demo server on `port`."""
    (code,) = [body for section, lang, body in readme_blocks() if section in LIVE_SECTIONS and lang == "python"
               and marker in body]
    r = subprocess.run([sys.executable, "-c", code.replace(DEMO_PORT, f"127.0.0.1:{port}")], cwd=cwd,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r


def test_openai_example_runs_against_the_demo_server(demo, tmp_path):
    pytest.importorskip("openai")
    port = demo[0]
    run_python_example("import base64, openai", port, tmp_path)
    from PIL import Image

    for i in range(4):
        with Image.open(tmp_path / f"seven-{i}.png") as im:
            assert im.size == (128, 128)


def test_stream_client_example_prints_progress_and_saves_the_image(demo, tmp_path):
    port = demo[0]
    r = run_python_example("/generate/stream", port, tmp_path)
    printed = [line.split(" ", 1)[0] for line in r.stdout.splitlines()]
    assert printed[0] == "queued" and printed[-1] == "done" and {"step", "preview"} <= set(printed), r.stdout
    from PIL import Image

    with Image.open(tmp_path / "stream-0.png") as im:
        assert im.size == (128, 128)


def test_library_example_prints_what_docs_library_md_shows():
    """The solver library's example in docs/library.md runs and prints the output block under it."""
    text = (ROOT / "docs" / "library.md").read_text()
    found = blocks(text)
    i = next(i for i, (_, lang, _) in enumerate(found) if lang == "python")
    code, expected = found[i][2], found[i + 1][2]
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected.strip()


def test_demo_script_installs_what_the_readme_says():
    """demo.sh installs the extras `stride serve` and `stride offline` need, CPU torch pinned as .ci/run."""
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert re.search(r'pip install -q -e "\.\[serve,offline\]"', demo)
    pin = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert f"torch=={pin}" in demo
