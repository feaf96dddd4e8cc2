"""Servers that pop-load measures, each a real process on 127.0.0.1 with its own port and log:
pop-serve over exported artifacts, and llama.cpp's server (llama-cpp-python's, from its own virtualenv)
over the GGUF file the artifacts were converted from."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pop.runtime.errors import PopError

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `argv` (which must listen on self.port), waits until `ready_path` answers 200, and stops it
    with SIGTERM (then SIGKILL) on stop() or when the with-block ends.  Its output goes to a log file,
    whose tail is in the error when it does not come up."""

    def __init__(self, name, argv, ready_path="/health", start_timeout=300.0, env=None, port=None):
        self.name, self.port, self.host = name, port or free_port(), "127.0.0.1"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"pop-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(a).replace("{port}", str(self.port)) for a in argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise PopError(f"{name} exited with {self.proc.returncode} before it served: {tail}")
            try:
                if self.get(ready_path)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise PopError(f"{name} did not answer {ready_path} within {start_timeout:.0f} s: {tail}")

    def connection(self, timeout=120):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path):
        c = self.connection(5)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def post(self, path, body):
        """(status, JSON body, headers); body: a dict, or raw text sent as is."""
        c = self.connection()
        try:
            c.request("POST", path, body if isinstance(body, str) else json.dumps(body),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read()), dict(r.getheaders())
        finally:
            c.close()

    def log_tail(self, lines=8):
        if self.log.closed:
            return "(log removed)"
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def stop(self, timeout=60):
        """SIGTERM, then SIGKILL after `timeout`; removes the log; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def pop_serve(artifacts, mode="pop", max_batch=4, max_queue=64, threads=None, backend=None):
    argv = [Path(sys.executable).with_name("pop-serve"), artifacts, "--port", "{port}", "--mode", mode,
            "--max-batch", max_batch, "--max-queue", max_queue]
    argv += ["--threads", threads] if threads else []
    argv += ["--backend", backend] if backend else []
    return ServerProcess(f"pop-{mode}-b{max_batch}", argv)


def pop_serve_ray(artifacts, mode="pop", replicas=1, max_batch=4, max_queue=64, threads=1, address=None):
    """pop-serve --ray: a local Ray instance (or the cluster at `address`) with `replicas` replicas of
    `threads` threads each, behind Ray Serve's proxy."""
    argv = [Path(sys.executable).with_name("pop-serve"), artifacts, "--ray", "--replicas", replicas, "--port",
            "{port}", "--mode", mode, "--max-batch", max_batch, "--max-queue", max_queue, "--threads", threads]
    argv += ["--address", address] if address else []
    return ServerProcess(f"pop-{mode}-ray{replicas}", argv)


def llamacpp_python():
    """The llama.cpp peer's python, made by scripts/llamacpp_venv.sh (which builds it on first use)."""
    script = ROOT / "scripts" / "llamacpp_venv.sh"
    try:
        out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError as e:
        raise PopError(f"could not make llama.cpp's virtualenv ({script} exited {e.returncode})") from None
    return out.stdout.strip().splitlines()[-1]


def llamacpp_server(gguf, threads, context, python=None):
    """llama-cpp-python's OpenAI-compatible server on `gguf`, `threads` threads for prompt and decode alike,
    a context of `context` tokens.  It serves one request at a time (its model sits behind a lock), and by
    default a new request interrupts the one streaming: --interrupt_requests False makes them wait instead."""
    argv = [python or llamacpp_python(), "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", "{port}", "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", context,
            "--n_batch", 512, "--interrupt_requests", "False", "--verbose", "False"]
    return ServerProcess("llama.cpp", argv, ready_path="/v1/models")
