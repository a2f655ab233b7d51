"""`python -u train.py ARGS` (and the repository's other programs) for the tests, without paying
the imports each time.

A run of the tiny model takes a few seconds; starting Python and importing torch, transformers and
train.py's modules takes about as long again, and the tests start a few hundred runs. So each test
worker keeps one warm process (a "zygote": the imports done, nothing run) and every run is a fork
of it: a child process with its own memory, working directory, environment, stdout and stderr
files and exit code, which then does what `python -u train.py ARGS` does: train.command_line().

Forking is safe here because the zygote has only imported: no math threads, no tokenizer threads
and no process group exist yet. A run whose environment differs from the zygote's (some variables
are read once, at import) gets a fresh interpreter instead, as does any run where the platform has
no fork.
"""
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(request: dict):
    """In the forked child: become `python -u SCRIPT ARGS` and never return."""
    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills whatever it started
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        sys.stdout.reconfigure(write_through=True)  # -u
        sys.stderr.reconfigure(write_through=True)
        script = request.get("script", "train.py")
        sys.argv = [script, *request["args"]]
        import train
        try:
            if script == "train.py":
                train.command_line()
            else:  # another program of the repository (export_hf.py, evaluate.py, benchmarks/...)
                sys.path.insert(0, str((ROOT / script).parent))  # as `python SCRIPT` puts it first
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if isinstance(e.code, str):
                sys.stderr.write(e.code + "\n")
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as the interpreter would: the traceback on stderr, exit code 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def rank_environment(env: dict, rank: int, nproc: int, port: int) -> dict:
    """What `torchrun --standalone --nproc_per_node=NPROC` sets for a worker (its own rendezvous
    aside: the ranks meet at MASTER_ADDR:MASTER_PORT, as init_process_group's env:// does)."""
    if nproc == 1:
        return env
    return dict(env, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), ROLE_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT="0")


def wait_ranks(pids, grace: float = 5.0) -> int:
    """Wait for every rank; once one has failed, the others get `grace` seconds to end on their
    own (a refusal reaches every rank) and are then stopped (SIGTERM), as torchrun's agent does.
    0 when all succeeded, else the first failure's code."""
    codes = {}

    def reap(pid_status):
        codes[pid_status[0]] = os.waitstatus_to_exitcode(pid_status[1])

    while len(codes) < len(pids) and not any(codes.values()):
        reap(os.wait())
    deadline = time.time() + grace
    while len(codes) < len(pids) and time.time() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            reap((pid, status))
        else:
            time.sleep(0.05)
    for other in set(pids) - set(codes):
        try:
            os.killpg(other, signal.SIGTERM)
        except ProcessLookupError:
            pass
    while len(codes) < len(pids):
        reap(os.wait())
    return next((codes[p] for p in pids if codes[p] != 0), 0)


def serve(requests, replies):
    """The zygote's loop: one JSON request per line in; out, the children's pids (one per rank)
    and then the exit code, until stdin closes."""
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import train  # noqa: F401  (and through it torch, transformers, hydra, datasets)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the tiny test model)
    replies.write("ready\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        nproc, port = request.get("nproc", 1), train.free_port()
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                _child(dict(request, env=rank_environment(request["env"], rank, nproc, port)))
            pids.append(pid)
        replies.write(" ".join(map(str, pids)) + "\n")
        replies.flush()
        replies.write(f"{wait_ranks(pids)}\n")
        replies.flush()


class Zygote:
    """The test worker's side: starts the warm process with environment `env` and runs requests
    through it; the runs' stdout and stderr go through files in a directory of its own."""

    def __init__(self, env: dict):
        self.env = env
        self.files = Path(tempfile.mkdtemp(prefix="warm-train-"))
        self.runs, self.active = 0, None
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == "ready\n", "the warm test launcher did not start"

    def run(self, args, env: dict, timeout: float, script: str = "train.py") -> subprocess.CompletedProcess:
        self.runs += 1
        out, err = self.files / f"{self.runs}.out", self.files / f"{self.runs}.err"
        run = self.start(args, env, out, err, script=script)
        run.finish(timeout)
        stdout, stderr = run.communicate()
        out.unlink()
        err.unlink()
        return subprocess.CompletedProcess([script, *args], run.returncode, stdout, stderr)

    def start(self, args, env: dict, out: Path, err: Path, nproc: int = 1,
              script: str = "train.py") -> "WarmRun":
        """Start SCRIPT ARGS (train.py, or another program of the repository) in `nproc` ranks,
        appending their stdout to `out` and stderr to `err` (the same file for one log). The warm
        process serves nothing else until it ends."""
        request = {"args": [str(a) for a in args], "env": env, "cwd": str(ROOT), "script": script,
                   "stdout": str(out), "stderr": str(err), "nproc": nproc}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pids = [int(p) for p in self.proc.stdout.readline().split()]
        self.active = WarmRun(self.proc.stdout, pids, out, err)
        return self.active

    def busy(self) -> bool:
        """Whether a run it started is still going (a second run then starts cold)."""
        return self.active is not None and self.active.poll() is None


class WarmRun:
    """A run forked from the warm process, used as a subprocess.Popen is: `pid` is its first
    rank, `returncode` is 0 once every rank succeeded (else the first failure's code)."""

    def __init__(self, replies, pids, out: Path, err: Path):
        self.replies, self.pids, self.out, self.err = replies, pids, out, err
        self.pid, self.returncode = pids[0], None

    def poll(self):
        return self.wait(0) if self.returncode is None and self._ended(0) else self.returncode

    def _ended(self, timeout) -> bool:
        return bool(select.select([self.replies], [], [], timeout)[0])

    def wait(self, timeout=None) -> int:
        if self.returncode is None:
            if not self._ended(timeout):
                raise subprocess.TimeoutExpired(["train.py"], timeout)
            self.returncode = int(self.replies.readline())
        return self.returncode

    def finish(self, timeout: float) -> int:
        """wait(timeout), killing every rank (and re-raising) when it runs past it."""
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.out.read_text(), self.err.read_text()

    def send_signal(self, signum: int):
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:  # it has ended already (as Popen.send_signal, no error)
            pass

    def kill(self):
        """SIGKILL every rank and whatever it started, and wait for the end."""
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait()


_zygote = None


def zygote_for(env: dict):
    """This worker's warm process for environment `env`, or None where a run must start a fresh
    interpreter (no fork on this platform, DPO_TEST_COLD_LAUNCH set, another environment, or a run of
    its own still going)."""
    global _zygote
    if not hasattr(os, "fork") or env.get("DPO_TEST_COLD_LAUNCH"):
        return None
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote(env)
    if _zygote.busy() or _import_time(env) != _import_time(_zygote.env):
        return None
    return _zygote


def run_train(args, env: dict, timeout: float, script: str = "train.py") -> subprocess.CompletedProcess:
    """`python -u SCRIPT ARGS` (train.py or another program of the repository) in the repository
    root with environment `env`."""
    zygote = zygote_for(env)
    if zygote is None:
        return subprocess.run([sys.executable, "-u", script, *map(str, args)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return zygote.run(args, env, timeout, script)


def run_ranks(args, env: dict, nproc: int, log: Path, timeout: float, script: str = "train.py"):
    """The workers of `torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGS` (NPROC=1: plain
    `python SCRIPT ARGS`), forked warm, their stdout and stderr in `log`: the exit code (0 when
    every rank succeeded), or None where no warm process fits `env` (the caller starts it cold)."""
    zygote = zygote_for(env)
    if zygote is None:
        return None
    return zygote.start(args, env, log, log, nproc, script).finish(timeout)


def popen_train(args, env: dict, out: Path, err: Path):
    """`python -u train.py ARGS` started in the background, its stdout and stderr in those files:
    a WarmRun, or a subprocess.Popen where no warm process fits `env`."""
    zygote = zygote_for(env)
    if zygote is None:
        with open(out, "a") as stdout, open(err, "a") as stderr:
            return ColdRun([sys.executable, "-u", "train.py", *args], out, err, cwd=ROOT, env=env,
                           stdout=stdout, stderr=stderr)
    return zygote.start(args, env, out, err)


class ColdRun(subprocess.Popen):
    """A fresh interpreter's run, whose communicate() reads its output files as WarmRun's does."""

    def __init__(self, cmd, out: Path, err: Path, **kwargs):
        super().__init__(cmd, **kwargs)
        self.out, self.err = out, err

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.out.read_text(), self.err.read_text()


# Variables read when they are used, not at import (pytest's, and those torch's compiler sets in
# the test process once a test has compiled something): a run gets its own values of these.
READ_AT_USE = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_", "_TORCHINDUCTOR_")


def _import_time(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(READ_AT_USE)}


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
