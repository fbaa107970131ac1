"""Execute the notebooks headless, cell by cell, with progress and a summary.

    python -m tools.run_notebooks --profile cpu --data-dir ../shared/data

Each notebook runs in a fresh kernel started in the repository root, with
the settings passed as environment variables (see docs/NOTEBOOKS.md). The
executed copy is written to REPORT_DIR/executed/<notebook>.<profile>.ipynb,
with "auto" replaced by the profile it resolves to, and for part 2 to
<notebook>.<profile>.<target domain>.ipynb. When a cell fails, the copy
goes to the same name with .failed before .ipynb instead, so that the
failing output can be inspected and the last good run's copy is kept.

Before any notebook starts, the report folder and the checkpoint folder are
checked: a folder that cannot be written stops the run there, not after hours
of training. So does an invalid setting for any notebook after the first,
which the notebook's own settings code finds, and a data file that such a
notebook needs and that is missing or unreadable and cannot be downloaded:
its fetch_data() runs before the first notebook starts. The first notebook
checks its settings and its data in its first cells anyway.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from traitlets.config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))      # so that `python tools/run_notebooks.py` finds tools.nbdefs from any folder

from tools.nbdefs import PARAMETERS_TAG, tagged_cells  # noqa: E402

NOTEBOOKS = ("part1_lstm.ipynb", "part2_cyclegan.ipynb")
PROFILES = ("auto", "smoke", "cpu", "full")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
TRUE_WORDS = ("1", "true", "yes", "on")          # what the notebooks read as True in a setting
# sun_path in struct sockaddr_un is 108 bytes on Linux and 104 on macOS, including the NUL byte, so 103 fits both.
SOCKET_PATH_MAX_BYTES = 103
PORT_SUFFIX_BYTES = len("-65535")                # jupyter_client names each socket "<ip>-<port>"
INTERRUPT_GRACE_S = 20            # for the kernel to stop a cell after a Ctrl-C passed on to it


class NotebookFailed(RuntimeError):
    """A cell raised; the message names the notebook and the cell."""


def kernel_config(socket_dir: str | None) -> Config:
    """Return the kernel manager's config: on POSIX systems, Unix domain sockets in `socket_dir`.

    With ZeroMQ's ipc transport no TCP port carries code and outputs in plain text, which ipykernel
    warns about at every start. The socket path must be absolute, because with a relative one the
    kernel creates the sockets in its working directory and the client looks in its own. A folder
    per run keeps simultaneous runs apart. Windows keeps TCP, Jupyter's default, because ipc was not
    tried there. A `socket_dir` of None also selects TCP.
    """
    if os.name != "posix" or socket_dir is None:
        return Config()
    return Config({"KernelManager": {"transport": "ipc", "ip": socket_ip(socket_dir)}})


def socket_ip(socket_dir: str) -> str:
    """Return the kernel manager's `ip` for the ipc transport, to which jupyter_client appends "-<port>"."""
    return os.path.join(socket_dir, "kernel")


def make_socket_dir() -> str | None:
    """Create a folder for the kernel's Unix domain sockets and return its path, or None where TCP must be used.

    The folder goes in the temporary folder (TMPDIR), or in /tmp when a socket path there would be too long
    for a Unix domain socket, because ZeroMQ then fails with "File name too long". Windows gets None.
    """
    if os.name != "posix":
        return None
    for parent in (None, "/tmp"):                     # None is tempfile's choice, which follows TMPDIR
        try:
            socket_dir = tempfile.mkdtemp(prefix="nbkernel-", dir=parent)
        except OSError:
            continue
        if len(os.fsencode(socket_ip(socket_dir))) + PORT_SUFFIX_BYTES <= SOCKET_PATH_MAX_BYTES:
            return socket_dir
        os.rmdir(socket_dir)
    return None


class EchoingClient(NotebookClient):
    """A NotebookClient that also passes each line a cell prints to `echo`, as it arrives."""

    def __init__(self, notebook, echo=None, **kwargs):
        super().__init__(notebook, **kwargs)
        self.echo = echo

    def output(self, outs, msg, display_id, cell_index):
        if self.echo is not None and msg["msg_type"] == "stream":
            for line in msg["content"]["text"].splitlines():
                if line.strip():
                    self.echo(line)
        return super().output(outs, msg, display_id, cell_index)


def write_from_handler(text: str) -> None:
    """Write to stderr from a signal handler: os.write, because print there can interrupt a print of the main code."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):
        pass                      # a stderr without a file descriptor, as under pytest's capture


class InterruptForwarder:
    """Context manager that passes the first Ctrl-C (SIGINT) on to the kernel, so that the running cell stops with
    KeyboardInterrupt and the kernel can shut down cleanly. A second Ctrl-C raises KeyboardInterrupt here at once,
    and so does a kernel that has not stopped the cell INTERRUPT_GRACE_S seconds after the first.

    The kernel runs in a session of its own (jupyter_client starts it so), so the terminal's Ctrl-C reaches only
    this process. Raising KeyboardInterrupt here instead would shut the kernel down in the middle of a cell, and
    ipykernel and nbclient then print tracebacks about closed sockets and a dead kernel. The grace period is
    there because a Ctrl-C that reached the kernel as a cell started was seen to be caught by ipykernel
    itself ("KeyboardInterrupt caught in kernel"), after which the kernel never replied to that cell.
    """

    def __init__(self, kernel_manager):
        self.kernel_manager = kernel_manager
        self.requested = False
        self.previous_handlers = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # only the main thread may set handlers
            self.previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self.forward)
            if hasattr(signal, "setitimer"):
                self.previous_handlers[signal.SIGALRM] = signal.signal(signal.SIGALRM, self.give_up)
        return self

    def __exit__(self, *exc_info):
        if signal.SIGALRM in self.previous_handlers:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def forward(self, signum, frame):
        group = getattr(getattr(self.kernel_manager, "provisioner", None), "pgid", None)
        if self.requested or not group or not hasattr(os, "killpg"):
            raise KeyboardInterrupt
        self.requested = True
        write_from_handler("\nCtrl-C: stopping the running cell. Press Ctrl-C again to stop at once.\n")
        os.killpg(group, signal.SIGINT)
        if signal.SIGALRM in self.previous_handlers:
            signal.setitimer(signal.ITIMER_REAL, INTERRUPT_GRACE_S)

    def give_up(self, signum, frame):
        write_from_handler(f"The kernel did not stop the cell within {INTERRUPT_GRACE_S:g} s; stopping it at once.\n")
        raise KeyboardInterrupt


def _cell_title(cell) -> str:
    """Return the first line of a code cell that describes it, skipping NOTE: and TODO: comments."""
    for line in cell.source.splitlines():
        line = line.strip().lstrip("#").strip()
        if line and not line.startswith(("NOTE:", "TODO:")):
            return line[:70]
    return "(empty cell)"


def failed_copy_path(output_path: str | os.PathLike) -> Path:
    """Return where the executed copy of a failed run goes: <name>.failed.ipynb beside `output_path`."""
    output_path = Path(output_path)
    return output_path.with_name(f"{output_path.stem}.failed{output_path.suffix}")


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock(2) on `folder` while the block runs, so that runners that write the same file
    there at once take turns. Where fcntl is missing (Windows) or the lock fails, the block runs without it."""
    descriptor = None
    try:
        import fcntl  # POSIX only

        descriptor = os.open(folder, os.O_RDONLY)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    except BaseException:                  # Ctrl-C while waiting
        if descriptor is not None:
            os.close(descriptor)
        raise
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)           # releases the lock


def write_notebook(notebook: nbformat.NotebookNode, path: Path) -> None:
    """Write `notebook` to `path` through a temporary file, so that a failed write (a full disk) leaves the
    copy of an earlier run at `path` as it was. Two runners that write the same copy at once take turns, as
    they would otherwise write the same temporary file."""
    partial = path.with_name(f"{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_folder(path.parent):
        try:
            nbformat.write(notebook, partial)
            os.replace(partial, path)
        except BaseException:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
            raise


def resume_advice(env: dict[str, str]) -> str:
    """Return the advice for resuming an interrupted run, which must drop FORCE_RETRAIN if it was set."""
    force = env.get("FORCE_RETRAIN", os.environ.get("FORCE_RETRAIN", ""))
    if force.strip().lower() in TRUE_WORDS:
        return "run the same command without FORCE_RETRAIN to resume from the checkpoints"
    return "run the same command again to resume"


def interrupted_message(notebook_name: str, checkpoint_dir: Path, started: float, env: dict[str, str]) -> str:
    """Return the message for a run that a Ctrl-C stopped in `notebook_name`, with its count of checkpoint files.

    Files in `checkpoint_dir` changed since `started` (time.time()) count as written by this run.
    """
    try:
        written = sum(1 for path in checkpoint_dir.rglob("*") if path.is_file() and path.stat().st_mtime >= started)
    except OSError:                    # a folder removed or unreadable meanwhile
        written = 0
    if written == 0:
        return (f"Interrupted in {notebook_name} before it wrote a checkpoint in this run. A rerun continues from "
                f"the checkpoints of earlier runs where there are any, and otherwise trains from the beginning.")
    if written == 1:
        kept_files = "The checkpoint file it wrote is kept"
    else:
        kept_files = f"The {written} checkpoint files it wrote are kept"
    return f"Interrupted in {notebook_name}. {kept_files}, so {resume_advice(env)}."


OPTION_OF_SETTING = {"PROFILE": "--profile", "DATA_DIR": "--data-dir", "REPORT_DIR": "--report-dir"}


def option_hint(message: str) -> str:
    """Return a line naming this runner's options for the settings that a notebook's error names, or "".

    The notebooks' messages name settings as the settings cell writes them. Only the error is read: not
    the traceback after its first paragraph, which quotes code, nor the cell's title before " failed with ".
    """
    first_paragraph = message.split("\n\n")[0]
    error = first_paragraph.partition(" failed with ")[2] or first_paragraph
    named = [name for name in OPTION_OF_SETTING if re.search(rf"\b{name}\b", error)]
    if not named:
        return ""
    options = ", ".join(f"{name} is {OPTION_OF_SETTING[name]}" for name in named)
    return f"\nWith this runner, {options}, and other settings are --set NAME=VALUE."


def out_of_memory_advice(notebook_name: str) -> str:
    """Return the advice for a kernel that the system killed for lack of memory.

    Only the notebook that died is to be run again, because --set reaches every notebook that a command names,
    so FORCE_RETRAIN would retrain notebooks that had finished.
    """
    return (f"If it ran out of memory, which Linux answers by killing the process, run only {notebook_name} again, "
            f"by naming it on the command line, because --set reaches every notebook in the command. "
            f"For less memory in evaluation, lower EVAL_BATCH_SIZE with --set, which needs no FORCE_RETRAIN, "
            f"because checkpoints are reused whatever its value. For less memory in training, lower BATCH_SIZE "
            f"or the model's sizes with --set and add --set FORCE_RETRAIN=1, because checkpoints record the sizes.")


def kernel_environment(env: dict[str, str] | None) -> dict[str, str]:
    """Return the environment a notebook runs in: this process's, with `env` added."""
    kernel_env = dict(os.environ)
    kernel_env.update({name: str(value) for name, value in (env or {}).items()})
    # The kernel must not inherit a non-interactive backend choice from a parent Jupyter.
    kernel_env.pop("MPLBACKEND", None)
    return kernel_env


def execute_notebook(notebook_path: str | os.PathLike, output_path: str | os.PathLike,
                     env: dict[str, str] | None = None, timeout_per_cell: int = 3600,
                     log=print, echo_output: bool = True) -> nbformat.NotebookNode:
    """Execute one notebook in a fresh kernel and write the executed copy.

    ``env`` is added to this process's environment for the kernel. What the
    cells print goes to ``log`` as it arrives when ``echo_output`` is true.
    Raises ``NotebookFailed`` naming the notebook and the cell when a cell raises.
    The executed copy then goes to ``failed_copy_path(output_path)``, and a copy
    already at ``output_path`` is left as it is.
    """
    notebook_path = Path(notebook_path)
    output_path = Path(output_path)
    notebook = nbformat.read(notebook_path, as_version=4)
    kernel_env = kernel_environment(env)
    start = time.monotonic()

    def echo(line):
        log(f"[{notebook_path.name} {time.monotonic() - start:7.1f}s]   {line}", flush=True)

    socket_dir = make_socket_dir()          # removed below, but a killed run leaves it in place
    if socket_dir is None and os.name == "posix":
        log(f"[{notebook_path.name}] the kernel uses TCP, because no folder for Unix domain sockets with paths of "
            f"at most {SOCKET_PATH_MAX_BYTES} bytes could be created in {tempfile.gettempdir()} or /tmp. "
            f"Set TMPDIR to a shorter writable folder to avoid TCP.", flush=True)
    client = EchoingClient(notebook, echo=echo if echo_output else None, timeout=timeout_per_cell,
                           kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}},
                           config=kernel_config(socket_dir))
    code_cells = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    failure, finished, kernel_started = None, False, False
    try:
        with client.setup_kernel(env=kernel_env), InterruptForwarder(client.km) as interrupt:
            kernel_started = True
            for number, index in enumerate(code_cells, start=1):
                if interrupt.requested:
                    break
                cell = notebook.cells[index]
                log(f"[{notebook_path.name} {time.monotonic() - start:7.1f}s] "
                    f"cell {number}/{len(code_cells)}: {_cell_title(cell)}", flush=True)
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    if interrupt.requested:
                        break                      # the cell stopped at the Ctrl-C passed on to the kernel
                    traceback = ANSI_ESCAPE.sub("", str(error))
                    failure = NotebookFailed(
                        f"{notebook_path.name}: code cell {number} of {len(code_cells)} "
                        f"(cell {index + 1} of {len(notebook.cells)} counting markdown, "
                        f"'{_cell_title(cell)}') failed with {error.ename}: {error.evalue}\n\n{traceback}")
                    break
                except DeadKernelError as error:
                    failure = NotebookFailed(
                        f"{notebook_path.name}: the kernel died in code cell {number} of {len(code_cells)} "
                        f"('{_cell_title(cell)}'): {error}. Checkpoints written so far are kept. "
                        f"{out_of_memory_advice(notebook_path.name)} Otherwise {resume_advice(env or {})}.")
                    break
                except CellTimeoutError:
                    failure = NotebookFailed(
                        f"{notebook_path.name}: code cell {number} of {len(code_cells)} ('{_cell_title(cell)}') "
                        f"ran longer than the {timeout_per_cell:,d} s allowed per cell, so the run stopped. "
                        f"Checkpoints written so far are kept: raise --cell-timeout, and {resume_advice(env or {})}.")
                    break
            finished = failure is None and not interrupt.requested
    except RuntimeError as error:
        if kernel_started:
            raise
        failure = NotebookFailed(f"{notebook_path.name}: the kernel did not start ({error}). Check that "
                                 f"ipykernel is installed in this environment (scripts/setup.sh installs it), "
                                 f"and run again.")
    finally:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        # An interrupted or failed run must not replace the copy of the last run that finished.
        written = output_path if finished else failed_copy_path(output_path)
        try:
            write_notebook(notebook, Path(written))
        except OSError as error:
            log(f"[{notebook_path.name}] could not write the executed copy to {written}: {error}. A copy "
                f"already there is unchanged")
            written = None
        if not finished and failure is None and written is not None:   # interrupted, e.g. by Ctrl-C
            log(f"[{notebook_path.name}] interrupted; executed copy so far: {written}")
    if failure is not None:
        if written is not None:
            log(f"[{notebook_path.name}] executed copy of the failed run kept for inspection: {written}")
        raise failure
    if not finished:
        raise KeyboardInterrupt            # a Ctrl-C that the kernel received; main() gives the advice
    failed_copy_path(output_path).unlink(missing_ok=True)      # stale once a run has finished
    log(f"[{notebook_path.name}] done in {time.monotonic() - start:.1f}s including the kernel start; "
        f"executed copy: {written or 'not written'}", flush=True)
    return notebook


def _summary_lines(report_dir: Path, started_by_notebook: dict[str, float]) -> list[str]:
    """Build one summary line per notebook from the newest results file it wrote during this run."""
    lines = []
    for name, started in started_by_notebook.items():
        part = name.split("_")[0]
        fresh = [path for path in (report_dir / "results").glob(f"{part}_*.json") if path.stat().st_mtime >= started]
        if not fresh:
            lines.append(f"{name}: no results file written")
            continue
        newest = max(fresh, key=lambda path: path.stat().st_mtime)
        results = json.loads(newest.read_text())
        headline = ", ".join(f"{key} {value}" for key, value in results.get("headline", {}).items())
        target = f", target domain {results['target_domain']}" if "target_domain" in results else ""
        lines.append(f"{name}: profile {results.get('profile')}{target}, device {results.get('device')}, "
                     f"{results.get('wall_time_s', float('nan')):.0f} s from the end of setup to the results; "
                     f"{headline} ({newest})")
    return lines


CHECK_SETTINGS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tools.nbdefs import load_definitions
try:
    load_definitions(sys.argv[2], env=json.loads(sys.argv[3]))
except ValueError as error:
    print(error)
    sys.exit(3)
"""
SETTINGS_ERROR_EXIT = 3
SETTINGS_CHECK_TIMEOUT_S = 120      # loading a notebook's definitions took about 3.5 s on a 2-core CPU


def settings_error(notebook_path: Path, env: dict[str, str]) -> str | None:
    """Return the notebook's message for an invalid setting in `env`, or None where its settings are valid.

    The notebook's definitions cells (settings, imports and functions, which train and download
    nothing) run in a separate process in the kernel's environment. Any failure other
    than the settings code's ValueError is left for the run itself to report. A check that takes
    longer than SETTINGS_CHECK_TIMEOUT_S is skipped with a note.
    """
    command = [sys.executable, "-c", CHECK_SETTINGS_SCRIPT, str(REPO_ROOT), str(notebook_path), json.dumps(env)]
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=kernel_environment(env), capture_output=True,
                                   text=True, timeout=SETTINGS_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"note: the settings of {notebook_path.name} could not be checked within {SETTINGS_CHECK_TIMEOUT_S} s; "
              f"the notebook checks them itself when it starts", file=sys.stderr)
        return None
    if completed.returncode != SETTINGS_ERROR_EXIT:
        return None
    return completed.stdout.strip()


FETCH_DATA_SCRIPT = """
import json, os, signal, sys, threading, time, traceback

def stop(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second SIGINT could cut the cleanup short
    raise KeyboardInterrupt

def watch_parent(parent):
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)             # the runner has gone (killed, or its terminal closed)

signal.signal(signal.SIGINT, stop)
try:
    # The runner's own pid, not os.getppid() here, which is already another's if the runner has just gone.
    threading.Thread(target=watch_parent, args=(int(sys.argv[5]),), daemon=True).start()
    message_pipe = os.fdopen(int(sys.argv[4]), "w", encoding="utf-8", errors="surrogateescape")
    sys.path.insert(0, sys.argv[1])
    from tools.nbdefs import load_definitions
    definitions = load_definitions(sys.argv[2], env=json.loads(sys.argv[3]))
    if hasattr(definitions, "fetch_data"):
        definitions.fetch_data()
except KeyboardInterrupt:
    sys.exit(130)
except Exception as error:
    if isinstance(error, (OSError, RuntimeError, ValueError)) and str(error):
        message_pipe.write(str(error))           # the notebook's own message
    else:
        traceback.print_exc()
        message_pipe.write(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    message_pipe.close()
    sys.exit(4)
"""
DATA_ERROR_EXIT = 4
FETCH_INTERRUPT_WAIT_S = 30         # for the notebook's code to remove a partial download after Ctrl-C


def data_error(notebook_path: Path, env: dict[str, str]) -> str | None:
    """Check that the data files the notebook needs with these settings are present and readable, downloading
    missing ones. Return the notebook's message where that fails, or None.

    The notebook's fetch_data() runs in a separate process in the kernel's environment, and a notebook
    without one is skipped. Its output appears as it comes, so a download shows its progress. The
    process has a session of its own, so that a Ctrl-C reaches it once, from here (see stop_data_check),
    and it stops by itself when this process ends in any other way. A process that fails without a
    message gets a note, and the run goes on.
    """
    open_closed_standard_streams()          # else the pipe could take a number the process prints to
    read_end, write_end = os.pipe()
    command = [sys.executable, "-c", FETCH_DATA_SCRIPT, str(REPO_ROOT), str(notebook_path), json.dumps(env),
               str(write_end), str(os.getpid())]
    try:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=kernel_environment(env), start_new_session=True,
                                   pass_fds=(write_end,))
    finally:
        os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8", errors="surrogateescape") as messages:
        try:
            message = messages.read().strip()       # ends when the process exits
            returncode = process.wait()
        except KeyboardInterrupt:
            stop_data_check(process)
            raise
    if returncode == DATA_ERROR_EXIT and message:
        return message
    if returncode != 0:
        print(f"\nnote: checking the data of {notebook_path.name} failed with exit code {returncode}; the notebook "
              f"fetches its data itself when it starts", file=sys.stderr)
    return None


def open_closed_standard_streams() -> None:
    """Open os.devnull on each of file descriptors 0, 1 and 2 that is closed.

    A file opened later would otherwise take that number, and a child process would print into it.
    """
    for number in (0, 1, 2):
        try:
            os.fstat(number)
        except OSError:
            os.open(os.devnull, os.O_RDWR)      # opens on the lowest free number, which is `number`


def printable(text: str) -> str:
    """Return `text` with control characters other than newline and tab escaped, so that a message quoting a
    server's reply cannot clear the terminal or move its cursor."""
    return "".join(char if char in "\n\t" or char.isprintable() else repr(char)[1:-1] for char in text)


def stop_data_check(process: subprocess.Popen) -> None:
    """Pass a Ctrl-C on to the data check's process and wait until it has removed a partial download.

    A second Ctrl-C, or FETCH_INTERRUPT_WAIT_S seconds without an exit, kills the process instead. A
    partial SVHN or Penn Treebank download then stays as a .part file, which the next download
    replaces. A partial MNIST archive stays under its own name, and the next run names it and the fix.
    """
    print("\nCtrl-C: stopping the data check. Press Ctrl-C again to stop at once.", file=sys.stderr, flush=True)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=FETCH_INTERRUPT_WAIT_S)
        return
    except subprocess.TimeoutExpired:
        print(f"The data check did not stop within {FETCH_INTERRUPT_WAIT_S} s, so it was killed.", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    process.kill()
    process.wait()


def setting_hint(name: str, known: set[str], skipped: dict[str, set[str]], options: dict[str, str]) -> str:
    """Return "did you mean ...? " for the setting or option closest to a misspelled `name`, or "" if none is close.

    `known` contains the settings of the notebooks in the run, `skipped` those of each notebook left out
    of it, and `options` the settings that have a command-line option of their own.
    """
    candidates = known | set().union(*skipped.values()) | set(options)
    close = difflib.get_close_matches(name.upper().replace("-", "_"), sorted(candidates), n=1)
    if not close:
        return ""
    match = close[0]
    if match in options:
        return f"did you mean {options[match]}? "
    if match in known:
        return f"did you mean {match}? "
    owners = ", ".join(notebook for notebook, names in skipped.items() if match in names)
    return f"did you mean {match}, a setting of {owners}, which this run does not include? "


def setting_names(notebook_path: Path) -> set[str]:
    """Return the names assigned in a notebook's parameters cell, the settings it accepts."""
    source = next(text for tag, text in tagged_cells(notebook_path) if tag == PARAMETERS_TAG)
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def setting_default(notebook_path: Path, name: str):
    """Return the literal value that a notebook's parameters cell assigns to `name`, or None if it assigns none."""
    source = next(text for tag, text in tagged_cells(notebook_path) if tag == PARAMETERS_TAG)
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == name
                                                for target in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def executed_copy_name(notebook_path: Path, profile: str, env: dict[str, str]) -> str:
    """Return the executed copy's file name: <notebook>.<profile>.ipynb, with the target domain where there is one.

    The target domain comes from --set, then the environment, then the parameters cell, and is read as the
    notebook reads it (stripped, lower case), so that runs with other targets do not overwrite each other's copy.
    """
    name = f"{notebook_path.stem}.{profile}"
    if "TARGET_DOMAIN" in setting_names(notebook_path):
        target = env.get("TARGET_DOMAIN", os.environ.get("TARGET_DOMAIN"))
        if target is None:
            target = setting_default(notebook_path, "TARGET_DOMAIN")
        name += "." + re.sub(r"[^a-z0-9_-]", "_", str(target).strip().lower())
    return name + ".ipynb"


def resolved_profile(profile: str) -> str:
    """Return the profile the notebooks run: "auto" is "full" where CUDA is available and "cpu" elsewhere.

    The notebooks resolve "auto" with the same rule in their settings code.
    """
    if profile != "auto":
        return profile
    import torch

    return "full" if torch.cuda.is_available() else "cpu"


def unwritable_folder(folder: Path) -> str | None:
    """Return why files cannot be written in `folder` (created if missing), or None if they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"
    return None


def repo_path(value: str) -> Path:
    """Return `value` as an absolute path, with "~" expanded and a relative path taken from REPO_ROOT.

    The kernels start in REPO_ROOT, so this is where the notebooks take a relative path from as well.
    Raises ValueError when a leading "~" or "~user" has no home folder to expand to.
    """
    try:
        expanded = Path(value).expanduser()
    except RuntimeError as error:              # pathlib: "Could not determine home directory."
        home = value.replace(os.sep, "/").split("/")[0]
        raise ValueError(f"{value!r} starts with {home}, but no home folder is known for it. Write the folder "
                         f"as a full path instead") from error
    return (REPO_ROOT / expanded).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS),
                        help="notebooks to run, in order (default: both)")
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "auto"), choices=PROFILES,
                        help="settings profile (default: auto, i.e. full on a GPU, cpu otherwise)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                        help="folder with ptb/, mnist/, svhn/, where downloads also go. A relative path is "
                             "taken from the repository root (default: data)")
    parser.add_argument("--report-dir", default=os.environ.get("REPORT_DIR", "report"),
                        help="figures/, results/ and executed/ are written below it. A relative path is taken "
                             "from the repository root (default: report)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override any other setting, e.g. --set TARGET_DOMAIN=synthetic")
    parser.add_argument("--cell-timeout", type=int, default=3600, metavar="SECONDS",
                        help="stop a notebook whose code cell runs longer than this (default 3600; in the kept "
                             "cpu profile runs, the longest cell trained for 16.3 minutes, part 2 on the AVX2 "
                             "host)")
    args = parser.parse_args(argv)
    if args.cell_timeout < 1:
        parser.error(f"--cell-timeout must be at least 1 second, got {args.cell_timeout}")
    # A PROFILE variable bypasses argparse's choices. The notebooks read " Smoke " as smoke, and so does this.
    profile = args.profile.strip().lower()
    if profile not in PROFILES:
        parser.error(f"the environment variable PROFILE is {args.profile!r}, not one of {', '.join(PROFILES)}; "
                     f"unset it or pass e.g. --profile cpu")
    args.profile = profile

    def folder_option(value, option, example):
        if not value.strip():     # e.g. an unset shell variable, which would otherwise mean the repository root
            parser.error(f"{option} is empty; give a folder, e.g. {example}")
        try:
            return repo_path(value)
        except ValueError as error:
            parser.error(f"{option}: {error}")

    report_dir = folder_option(args.report_dir, "--report-dir", "--report-dir report")
    env = {"PROFILE": args.profile, "DATA_DIR": str(folder_option(args.data_dir, "--data-dir", "--data-dir data")),
           "REPORT_DIR": str(report_dir)}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set {item!r} is not NAME=VALUE; write e.g. --set SEED=1")
        env[name] = value

    paths, settings_by_notebook = [], []      # a list, since a notebook may be named twice
    for name in args.notebooks:
        # Resolved here, because the checks below run from the repository root.
        path = Path(name).resolve() if Path(name).exists() else REPO_ROOT / name
        if not path.exists():
            parser.error(f"notebook {name!r} not found; choose from {', '.join(NOTEBOOKS)}")
        if not path.is_file() or path.suffix != ".ipynb":
            parser.error(f"{name!r} is not a notebook file (.ipynb); choose from {', '.join(NOTEBOOKS)}")
        try:
            settings_by_notebook.append(setting_names(path))
            paths.append(path)
        except Exception as error:       # nbformat and jsonschema raise many exception types for a malformed file
            parser.error(f"{name!r} cannot be run ({type(error).__name__}: {str(error)[:300]}); choose from "
                         f"{', '.join(NOTEBOOKS)}")
    known = set().union(*settings_by_notebook) - {"PROFILE_SETTINGS"}   # a table, not a setting
    # The README's commands set part 2's TARGET_DOMAIN for both notebooks, so a setting of a notebook
    # left out of this run is skipped with a note, while a name that no notebook has is an error.
    skipped = {name: setting_names(REPO_ROOT / name) - {"PROFILE_SETTINGS"} for name in NOTEBOOKS
               if (REPO_ROOT / name).resolve() not in {path.resolve() for path in paths}}
    for item in args.set:
        name = item.partition("=")[0]
        if name in OPTION_OF_SETTING:
            parser.error(f"--set {name}: use {OPTION_OF_SETTING[name]} for this setting")
        if name in known:
            continue
        owners = [notebook for notebook, names in skipped.items() if name in names]
        if not owners:
            parser.error(f"--set {name}: no such setting in {', '.join(path.name for path in paths)}; "
                         f"{setting_hint(name, known, skipped, OPTION_OF_SETTING)}settings are "
                         f"{', '.join(sorted(known - set(OPTION_OF_SETTING)))}")
        print(f"note: --set {name} is ignored, because it is a setting of {', '.join(owners)}, "
              f"which this run does not include", file=sys.stderr)
        env.pop(name, None)

    # The notebooks expand a leading "~" and take a relative CHECKPOINT_DIR from the repository root, where
    # the kernels start, so the check below must look at the same folder.
    checkpoint_dir = folder_option(env.get("CHECKPOINT_DIR", os.environ.get("CHECKPOINT_DIR", "checkpoints")),
                                   "CHECKPOINT_DIR", "--set CHECKPOINT_DIR=checkpoints")
    checks = [(report_dir / sub, "--report-dir", "--report-dir /tmp/report")
              for sub in ("results", "figures", "executed")]
    checks.append((checkpoint_dir, "CHECKPOINT_DIR", "--set CHECKPOINT_DIR=/tmp/checkpoints"))
    for folder, option, example in checks:
        reason = unwritable_folder(folder)
        if reason is not None:
            parser.error(f"cannot write to {folder} ({reason}); point {option} at a writable folder, e.g. {example}")
    try:
        for path in paths[1:]:          # checked now, so that a bad value wastes no earlier notebook's training
            print(f"checking the settings of {path.name}", flush=True)
            message = settings_error(path, env)
            if message is not None:
                parser.error(f"{path.name}: {message}")
    except KeyboardInterrupt:
        print("\nInterrupted while checking the settings; no notebook has run.", file=sys.stderr)
        return 130
    try:
        for path in paths[1:]:          # fetched now, so that a missing file wastes no earlier notebook's training
            print(f"checking the data of {path.name}", flush=True)
            message = data_error(path, env)
            if message is not None:
                print(f"\nerror: {path.name}: {printable(message)}{option_hint(message)}\nNo notebook has run.",
                      file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print(f"\nInterrupted while checking the data of {path.name}; no notebook has run.", file=sys.stderr)
        return 130

    started, status, started_count = {}, 0, 0
    for path in paths:
        started[path.name] = time.time()
        started_count += 1
        output = report_dir / "executed" / executed_copy_name(path, resolved_profile(args.profile), env)
        try:
            execute_notebook(path, output, env=env, timeout_per_cell=args.cell_timeout)
        except NotebookFailed as error:
            print(f"\nFAILED: {error}{option_hint(str(error))}", file=sys.stderr)
            status = 1
            break
        except KeyboardInterrupt:
            # execute_notebook has shut the kernel down and named the executed copy so far.
            print(f"\n{interrupted_message(path.name, checkpoint_dir, started[path.name], env)}", file=sys.stderr)
            status = 130                   # the shell's code for a process stopped by SIGINT
            break

    print("\nSummary")
    for line in _summary_lines(report_dir, started):
        print("  " + line)
    for path in paths[started_count:]:
        print(f"  {path.name}: not run, because the notebook before it did not finish")
    return status


if __name__ == "__main__":
    sys.exit(main())
