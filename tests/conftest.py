"""Shared fixtures: the repository root, the real data folder and a notebook runner."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tools.nbdefs import load_definitions  # noqa: E402
from tools.run_notebooks import execute_notebook  # noqa: E402

# No test may reach a real data server. Every download that a test does not point at its own server on
# 127.0.0.1 goes to this proxy on the discard port (9), where no service normally listens, so it fails at once. Notebook
# kernels and the runner's subprocesses inherit it. Tests that simulate a proxy set their own port.
OFFLINE_PROXY = "http://127.0.0.1:9"
for _name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ[_name] = OFFLINE_PROXY
for _name in ("no_proxy", "NO_PROXY"):
    os.environ[_name] = "127.0.0.1,localhost"


def real_data_dir() -> Path | None:
    """Return the folder with the real data sets, from REAL_DATA_DIR or ../shared/data, if it exists.

    A relative REAL_DATA_DIR is taken from the repository root, as the default is. A REAL_DATA_DIR that
    is set but not a folder fails the tests that need it, where the default folder's absence skips them.
    """
    value = os.environ.get("REAL_DATA_DIR")
    if not value:
        default = REPO_ROOT.parent / "shared" / "data"
        return default if default.is_dir() else None
    path = REPO_ROOT / Path(value).expanduser()
    if not path.is_dir():
        pytest.fail(f"REAL_DATA_DIR={value!r} is not a folder (read as {path}): point it at a folder with ptb/ and "
                    f"mnist/, or unset it to use ../shared/data where that exists", pytrace=False)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real data folder; tests that need it are skipped where it is absent."""
    path = real_data_dir()
    if path is None:
        pytest.skip("real data not found: set REAL_DATA_DIR to a folder with ptb/ and mnist/")
    return path


@pytest.fixture
def smoke_definitions(repo_root, tmp_path, monkeypatch):
    """Return a function that loads a notebook's definitions in the smoke profile with the synthetic target domain,
    its folders, FIGURE_DIR and RESULTS_PATH below tmp_path, and its file name as `notebook`."""
    def load(notebook):
        folders = {name: str(tmp_path / name.split("_")[0].lower())
                   for name in ("DATA_DIR", "REPORT_DIR", "CHECKPOINT_DIR")}
        definitions = load_definitions(repo_root / notebook, env={**folders, "PROFILE": "smoke",
                                                                  "TARGET_DOMAIN": "synthetic"})
        monkeypatch.setattr(definitions, "FIGURE_DIR", tmp_path / "figures")
        monkeypatch.setattr(definitions, "RESULTS_PATH", tmp_path / "results" / "run.json")
        definitions.notebook = notebook
        return definitions

    return load


@pytest.fixture
def set_setting(monkeypatch):
    """Set a notebook setting as a run from the settings cell would: its global variable and its entry in
    SETTINGS, which check_settings_unchanged compares. Both are restored after the test."""
    def set_value(definitions, name, value):
        monkeypatch.setattr(definitions, name, value)
        monkeypatch.setitem(definitions.SETTINGS, name, value)
    return set_value


@pytest.fixture
def run_notebook(tmp_path):
    """Execute a notebook of the repository with settings as environment variables.

    Outputs go below tmp_path (report/, checkpoints/), never into the repository.
    Returns the report folder.
    """
    def run(name: str, **settings) -> Path:
        report_dir = tmp_path / "report"
        env = {"REPORT_DIR": str(report_dir), "CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
        env.update({key: str(value) for key, value in settings.items()})
        output = report_dir / "executed" / name
        execute_notebook(REPO_ROOT / name, output, env=env, log=lambda *args, **kwargs: None, echo_output=False)
        return report_dir

    return run


@pytest.fixture
def run_cells_until(tmp_path):
    """Run a notebook's code cells in order in a real kernel, up to and including the first that contains `marker`,
    with the code `setup` run just before that cell.

    Unlike tools.nbdefs, which runs every definitions cell first, this finds a cell that uses a function
    defined only further down. Outputs go below tmp_path. A failing cell raises NotebookFailed.
    """
    def run(notebook_path: Path, marker: str, setup: str, settings: dict[str, str]) -> None:
        notebook = nbformat.read(notebook_path, as_version=4)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        last = next(index for index, cell in enumerate(code_cells) if marker in cell.source)
        notebook.cells = code_cells[:last] + [nbformat.v4.new_code_cell(setup), code_cells[last]]
        path = tmp_path / f"prefix_{notebook_path.name}"
        nbformat.write(notebook, path)
        env = {"REPORT_DIR": str(tmp_path / "report"), "CHECKPOINT_DIR": str(tmp_path / "checkpoints"), **settings}
        execute_notebook(path, tmp_path / "executed" / path.name, env=env, log=lambda *args, **kwargs: None,
                         echo_output=False)

    return run


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    stall_after = None     # bytes of each file to send before going silent; None sends whole files
    trickle_every = None   # seconds to wait after each byte; None sends files at full speed
    user_agents = None     # a list that collects the User-Agent header of each request

    def log_message(self, format, *args):
        pass

    def send_head(self):
        self.user_agents.append(self.headers.get("User-Agent"))
        return super().send_head()

    def copyfile(self, source, outputfile):
        if self.trickle_every is not None:
            with contextlib.suppress(OSError):     # the client gives up
                while byte := source.read(1):
                    outputfile.write(byte)
                    outputfile.flush()
                    time.sleep(self.trickle_every)
            return
        if self.stall_after is None:
            super().copyfile(source, outputfile)
            return
        outputfile.write(source.read(self.stall_after))
        outputfile.flush()
        time.sleep(10)     # a stalled server: the client has given up or been interrupted long before


@pytest.fixture(scope="session")
def localhost_certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "key.pem",
                    "-out", folder / "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def serve_folder(monkeypatch, request):
    """Serve a folder over HTTP on 127.0.0.1, as a stand-in for a data set's server; return its base URL.

    The server is this test's own, on a free port, and stops when the test ends. With `stall_after`,
    it sends that many bytes of each file and then nothing more, as a stalled server does. With
    `trickle_every`, it sends one byte at a time, that many seconds apart. The User-Agent header of
    each request goes into the list `serve.user_agents`. With `tls`, it serves https, with a certificate
    that this process then trusts through SSL_CERT_FILE, in place of the system's.
    """
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")
    servers = []

    def serve(folder: Path, stall_after: int | None = None, trickle_every: float | None = None,
              tls: bool = False) -> str:
        handler_class = type("FileHandler", (QuietFileHandler,), {"stall_after": stall_after,
                                                                  "trickle_every": trickle_every,
                                                                  "user_agents": serve.user_agents})
        handler = functools.partial(handler_class, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls:
            certificate, key = request.getfixturevalue("localhost_certificate")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate, key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
            monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}"

    serve.user_agents = []
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def serve_garbage(monkeypatch):
    """Start a server on 127.0.0.1 that replies to every request with a line that is not HTTP, and return its URL.

    http.client reports such a reply with an HTTPException, which is not an OSError.
    """
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def answer():
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                with contextlib.suppress(OSError):
                    connection.recv(65536)
                    connection.sendall(b"this is not HTTP\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stopping.set()
    thread.join()
    listener.close()


@pytest.fixture
def serve_raw(monkeypatch):
    """Start servers on 127.0.0.1 that respond to each request by calling `reply(connection, stopping)`. Each
    call of the fixture's function takes `reply` and returns the server's URL.

    For replies that http.server cannot send: headers or trailers without end, or a body cut short. `reply`
    should return once the threading.Event `stopping` is set, which happens when the test ends.
    """
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")
    stopping = threading.Event()
    listeners = []

    def serve(reply) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        listeners.append(listener)

        def answer():
            while not stopping.is_set():
                try:
                    connection, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                with connection, contextlib.suppress(OSError):     # the client gives up
                    connection.settimeout(5)
                    connection.recv(65536)
                    reply(connection, stopping)

        threading.Thread(target=answer, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield serve
    stopping.set()
    for listener in listeners:
        listener.close()


CPUINFO_TWO_PROCESSORS = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: Other CPU
"""


@pytest.fixture
def cpuinfo_sample(tmp_path) -> Path:
    """A /proc/cpuinfo in the kernel's format with two different processors, the first (AMD EPYC, 25, 17)."""
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO_TWO_PROCESSORS)
    return path


@pytest.fixture(scope="session")
def this_cpu() -> tuple[str, str | None, str | None] | None:
    """Model name, family and model of this machine's first processor, or None without /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    first = cpuinfo.read_text().split("\n\n", 1)[0]
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    return fields["model name"], fields.get("cpu family"), fields.get("model")
