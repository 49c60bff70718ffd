"""A local Triton Inference Server for a bundle's repository: what `d2build serve` runs.

The server: PyPI's `nvidia-pytriton` wheel ships a real `tritonserver` (2.51 in 0.7.0) with the
Python backend (no tensorrt or onnxruntime backend: bundles deployed with deploy.triton.model=python
load there). The wheel pins numpy<2, which d2build does not take, so it is installed without its
dependencies (`pip install --no-deps nvidia-pytriton==0.7.0`; `d2build serve --prepare` does it);
only its server binary, libraries, Python backend and backend stubs are used, never its Python
package. A `tritonserver` on PATH (NVIDIA's container) or given with --tritonserver works too.

The Python-backend models' own Python: Triton's Python backend runs each model in a stub process
whose interpreter is not d2build's (the stub links the system's libpython and ignores PYTHONPATH).
Their dependencies come the way Triton documents: an *execution environment* (config parameter
EXECUTION_ENV_PATH, a folder with bin/activate and lib/), here a virtual environment that
`prepare_env` makes once, with numpy<2 (numpy 2 inside Triton 2.51's stub garbles tensors: UINT8
inputs read as their first byte, BYTES outputs refused), and the Pillow and onnxruntime versions
d2build itself runs with (so the server computes what the runtime computes). The server's backend
folder holds the stub built for that environment's Python.

The bundle is served in place: `serving_repository` writes a small repository of config files (the
bundle's, plus EXECUTION_ENV_PATH for the Python models) whose version folders are links to the
bundle's, so the files that run are the digest-checked files of the bundle. The server starts in
explicit model-control mode on 127.0.0.1, and the models are loaded one by one through the
repository API, so a model that fails is named with Triton's own reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from d2build.deploy import triton

PYTRITON = "nvidia-pytriton==0.7.0"
ENV_MARKER = "d2build-triton-env.json"


class ServeError(RuntimeError):
    """Serving cannot go on; one line naming what (the binary, a port, a model) and the fix."""


# ----------------------------------------------------------------------------- the server binary


@dataclass
class ServerInstall:
    """Where a tritonserver and what it needs are."""

    binary: Path
    backends: Path  # the backend folder (python/ inside)
    libs: tuple[Path, ...] = ()  # for LD_LIBRARY_PATH
    stubs: Path | None = None  # pytriton: python_backend_stubs/<X.Y>/triton_python_backend_stub

    def stub(self, version: str) -> Path:
        """The Python backend stub for Python `version` ("3.11")."""
        if self.stubs is None:
            found = self.backends / "python" / "triton_python_backend_stub"
            if found.is_file():
                return found
            raise ServeError(f"{self.backends / 'python'}: no triton_python_backend_stub in this server's Python "
                             "backend folder")
        found = self.stubs / version / "triton_python_backend_stub"
        if not found.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / "triton_python_backend_stub").is_file())
            raise ServeError(f"{self.stubs}: no Python backend stub for Python {version} (there are stubs for "
                             f"{', '.join(have)}); make the Python-backend environment with one of those")
        return found


def _pytriton_dir() -> Path | None:
    """The installed nvidia-pytriton package folder, found without importing it (its import needs numpy<2)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_at(binary: Path) -> ServerInstall:
    root = binary.resolve().parent.parent  # <root>/bin/tritonserver
    libs = tuple(p for p in (root.parent.parent / "nvidia_pytriton.libs", root / "lib") if p.is_dir())
    stubs = root / "python_backend_stubs"
    return ServerInstall(binary, root / "backends", libs, stubs if stubs.is_dir() else None)


def find_server(explicit: str | None = None) -> ServerInstall:
    """--tritonserver PATH, else $D2BUILD_TRITONSERVER, else nvidia-pytriton's wheel, else `tritonserver`
    on PATH (NVIDIA's container: /opt/tritonserver)."""
    given = explicit or os.environ.get("D2BUILD_TRITONSERVER")
    if given:
        p = Path(given).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ServeError(f"{p}: not an executable tritonserver (from {'--tritonserver' if explicit else '$D2BUILD_TRITONSERVER'})")
        return _install_at(p)
    pkg = _pytriton_dir()
    if pkg is not None and (pkg / "tritonserver" / "bin" / "tritonserver").is_file():
        return _install_at(pkg / "tritonserver" / "bin" / "tritonserver")
    on_path = shutil.which("tritonserver")
    if on_path:
        return _install_at(Path(on_path))
    raise ServeError(f"no tritonserver found: install one with `pip install --no-deps {PYTRITON}` (its server binary; "
                     "--no-deps because it pins numpy<2), or `d2build serve --prepare`; or pass --tritonserver PATH, "
                     "or run in NVIDIA's Triton container")


# ----------------------------------------------------------------------------- the Python backend's environment


def default_env_path() -> Path:
    """$D2BUILD_TRITON_PYTHON_ENV, else beside this virtual environment (share/d2build/), else ~/.cache/d2build/."""
    if os.environ.get("D2BUILD_TRITON_PYTHON_ENV"):
        return Path(os.environ["D2BUILD_TRITON_PYTHON_ENV"]).expanduser()
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "share" / "d2build" / f"triton-python{ver}"
    return Path.home() / ".cache" / "d2build" / f"triton-python{ver}"


def env_requirements() -> list[str]:
    """numpy<2 (Triton 2.51's stub), and the Pillow and onnxruntime versions this d2build runs with."""
    from importlib import metadata

    def same(dist: str, floor: str) -> str:
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return f"{dist}>={floor}"

    return ["numpy>=1.26,<2", same("Pillow", "10"), same("onnxruntime", "1.18")]


@dataclass
class PythonEnv:
    path: Path
    python: str  # "3.11"
    packages: dict[str, str]


_PROBE = ("import json, sys, numpy, PIL, onnxruntime; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
          "'numpy': numpy.__version__, 'Pillow': PIL.__version__, 'onnxruntime': onnxruntime.__version__}))")


def check_env(path: Path) -> PythonEnv:
    """The execution environment at `path`, checked: made by prepare_env, numpy<2, Pillow and onnxruntime
    import, its libpython findable."""
    fix = f"make it with `d2build serve --prepare{'' if path == default_env_path() else f' --python-env {path}'}`"
    if not (path / ENV_MARKER).is_file() or not (path / "bin" / "activate").is_file():
        raise ServeError(f"{path}: no Python environment for Triton's Python backend there; {fix}")
    proc = subprocess.run([str(path / "bin" / "python"), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ServeError(f"{path}: its Python cannot import numpy, Pillow and onnxruntime ({last}); {fix}")
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(facts["numpy"].split(".")[0]) >= 2:
        raise ServeError(f"{path}: has numpy {facts['numpy']}; Triton 2.51's Python backend stub garbles tensors under "
                         "numpy 2 (UINT8 inputs read as their first byte). Use numpy<2 there; " + fix)
    python = facts.pop("python")
    return PythonEnv(path, python, facts)


def _libpython() -> Path | None:
    """This interpreter's shared libpython, when it is a shared build."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    lib = Path(sysconfig.get_config_var("LIBDIR") or "") / str(name)
    return lib if lib.is_file() else None


def prepare_env(path: Path | None = None, say: Callable[[str], None] = print) -> PythonEnv:
    """Make (or re-make) the execution environment: a virtual environment of this Python with
    env_requirements(), and this Python's libpython in its lib/ (the stub is started with
    LD_LIBRARY_PATH=<env>/lib, so it embeds the interpreter whose standard library the env uses)."""
    path = (path or default_env_path()).expanduser().resolve()
    reqs = env_requirements()
    if (path / ENV_MARKER).is_file():
        try:
            if json.loads((path / ENV_MARKER).read_text()).get("requirements") == reqs:
                env = check_env(path)
                say(f"d2build serve: the Python backend's environment {path} is up to date ({_describe(env)})")
                return env
        except (ServeError, ValueError):
            pass
    if path.exists():
        shutil.rmtree(path)
    say(f"d2build serve: making the Python backend's environment {path}: {' '.join(reqs)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, text=True)
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        *reqs], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(path, ignore_errors=True)
        last = ((e.stderr or e.stdout or "").strip().splitlines() or ["?"])[-1]
        raise ServeError(f"{path}: could not make the environment ({' '.join(map(str, e.cmd[:4]))} ...: {last})") from None
    lib = _libpython()
    if lib is not None:
        (path / "lib" / lib.name).symlink_to(lib)
    (path / ENV_MARKER).write_text(json.dumps({"requirements": reqs, "libpython": str(lib) if lib else None}) + "\n")
    env = check_env(path)
    say(f"d2build serve: ready: {_describe(env)}")
    return env


def _describe(env: PythonEnv) -> str:
    return f"Python {env.python}, " + ", ".join(f"{k} {v}" for k, v in env.packages.items())


def install_server(say: Callable[[str], None] = print) -> ServerInstall:
    """pip install --no-deps nvidia-pytriton (its server binary) into this Python, unless a server is found."""
    try:
        return find_server()
    except ServeError:
        pass
    say(f"d2build serve: pip install --no-deps {PYTRITON} (the tritonserver binary; its numpy<2 pin is not taken)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                           PYTRITON], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ServeError(f"pip install --no-deps {PYTRITON} failed: {last}")
    importlib.invalidate_caches()
    return find_server()


# ----------------------------------------------------------------------------- what the server reads


def serving_repository(source: Path, dest: Path, env: PythonEnv | None) -> list[str]:
    """A repository under `dest` serving the models of `source` (a bundle's triton/) in place: each
    model's config.pbtxt (with EXECUTION_ENV_PATH added to the Python-backend models' when `env`),
    its version folders linked to the bundle's. Returns the model names, steps before ensembles."""
    if not source.is_dir() or not any(source.glob("*/config.pbtxt")):
        raise ServeError(f"{source}: no Triton model repository there (a bundle written by `d2build deploy` has one)")
    dest.mkdir(parents=True, exist_ok=True)
    python = set(triton.python_models(source))
    names = []
    for name, text in triton.config_files(source).items():
        (dest / name).mkdir()
        if env is not None and name in python:
            text += ("# added by d2build serve: the Python this model runs in (Triton's execution environment)\n"
                     + triton._parameter("EXECUTION_ENV_PATH", str(env.path)))
        (dest / name / "config.pbtxt").write_text(text)
        for version in sorted(p for p in (source / name).iterdir() if p.is_dir() and p.name.isdigit()):
            (dest / name / version.name).symlink_to(version.resolve(), target_is_directory=True)
        names.append(name)
    ensembles = [n for n in names if 'platform: "ensemble"' in (dest / n / "config.pbtxt").read_text()]
    return [n for n in names if n not in ensembles] + ensembles


def backend_folder(install: ServerInstall, dest: Path, env: PythonEnv | None) -> Path:
    """A backend folder for the server: the install's backends, with the Python backend's stub for the
    environment's Python beside its library (links, so the install itself is left as it is)."""
    dest.mkdir(parents=True, exist_ok=True)
    for backend in sorted(p for p in install.backends.iterdir() if p.is_dir()):
        if backend.name != "python" or env is None:
            (dest / backend.name).symlink_to(backend.resolve(), target_is_directory=True)
            continue
        (dest / "python").mkdir()
        for f in backend.iterdir():
            if f.name != "triton_python_backend_stub":
                (dest / "python" / f.name).symlink_to(f.resolve())
        (dest / "python" / "triton_python_backend_stub").symlink_to(install.stub(env.python).resolve())
    return dest


# ----------------------------------------------------------------------------- the server process


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """One tritonserver process on 127.0.0.1, in its own process group (its Python stubs included)."""

    def __init__(self, install: ServerInstall, repository: Path, backends: Path, log: Path, *,
                 http_port: int = 8000, grpc_port: int = 8001, host: str = "127.0.0.1"):
        self.install, self.repository, self.backends, self.log = install, repository, backends, log
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={self.backends}", "--model-control-mode=explicit", "--strict-readiness=true",
                f"--http-address={self.host}", f"--http-port={self.http_port}", f"--grpc-address={self.host}",
                f"--grpc-port={self.grpc_port}", "--allow-metrics=false", "--allow-gpu-metrics=false",
                "--exit-timeout-secs=10", "--log-verbose=0"]

    def start(self) -> None:
        for what, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port)):
            if not port_free(port, self.host):
                raise ServeError(f"port {port} on {self.host} is in use (another server?); pass {what} with a free port")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.install.libs), env.get("LD_LIBRARY_PATH", "")]).strip(
            os.pathsep)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the stubs import from the bundle: leave no __pycache__ in it
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"error": raw.decode(errors="replace")}

    def _exited(self, doing: str) -> ServeError:
        code = self.proc.poll() if self.proc else None
        return ServeError(f"tritonserver exited (code {code}) while {doing}: {self.log_reason()}; log: {self.log}")

    def log_reason(self) -> str:
        """The server log's last error line (Triton's own words), or its last line."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
        errors = [ln for ln in errors if "NVML" not in ln and "DCGM" not in ln] or lines[-1:]
        return errors[-1] if errors else "no log"

    def wait_live(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise self._exited("starting")
            try:
                if self._request("GET", "/v2/health/live", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise ServeError(f"tritonserver did not answer on {self.url} within {timeout:.0f} s; log: {self.log}")

    def load(self, model: str, timeout: float = 300) -> None:
        """Load one model (explicit mode); ServeError naming it with Triton's reason when it does not load."""
        try:
            status, body = self._request("POST", f"/v2/repository/models/{model}/load", {}, timeout=timeout)
        except OSError as e:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._exited(f"loading {model}") from None
            raise ServeError(f"model {model}: no answer from tritonserver while loading ({e}); log: {self.log}") from None
        if status != 200:
            reason = " ".join(str(body.get("error", body)).split()).rstrip(";")
            if "unable to find backend library" in reason:
                have = ", ".join(sorted(p.name for p in self.backends.iterdir())) or "none"
                reason += (f" (this server's backends: {have}; a standard-op bundle deployed with "
                           "deploy.triton.model=python loads here, tensorrt/onnxruntime models need NVIDIA's container)")
            raise ServeError(f"model {model} did not load: {reason}")

    def ready(self) -> bool:
        try:
            return self._request("GET", "/v2/health/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def model_ready(self, model: str) -> bool:
        try:
            return self._request("GET", f"/v2/models/{model}/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def metadata(self) -> dict[str, Any]:
        return self._request("GET", "/v2", timeout=5)[1]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL to the whole group after `timeout`; the
        exit code (None when it was not started)."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the group is the server's pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # stubs left behind, or a server that did not stop in time
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()


def serve_setup(bundle: Path, run_dir: Path, *, tritonserver: str | None = None, python_env: str | None = None,
                http_port: int = 8000, grpc_port: int = 8001) -> tuple[Server, list[str]]:
    """Everything before the start: the bundle checked (BundleError), the server found, the environment checked, the
    serving repository and backend folder written under `run_dir`. (server, models in load order)."""
    from d2build.deploy.bundle import open_bundle

    opened = open_bundle(bundle)  # BundleError: files checked against manifest.json first
    install = find_server(tritonserver)
    source = opened.path / opened.doc.get("triton", {}).get("repository", "triton")
    env = None
    if python_env != "none" and triton.python_models(source):
        env = check_env(Path(python_env).expanduser().resolve() if python_env else default_env_path())
    run_dir.mkdir(parents=True, exist_ok=True)
    models = serving_repository(source, run_dir / "models", env)
    backends = backend_folder(install, run_dir / "backends", env)
    server = Server(install, run_dir / "models", backends, run_dir / "tritonserver.log", http_port=http_port,
                    grpc_port=grpc_port)
    return server, models
