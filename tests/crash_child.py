"""Helper process for tests/test_reliability.py (not a test module): trains a run and gets killed.

    python tests/crash_child.py zygote      imports torch and icl_core once, then reads one JSON job
                                            per line on stdin; each job runs in a forked child (a real
                                            process, SIGKILLed for real) and the zygote answers with
                                            one JSON line {"pid", "signal", "exit"} per job;
                                            {"parallel": [job, ...]} runs jobs at once.
    python tests/crash_child.py once JOB    runs one job in this fresh interpreter (JOB is JSON).

A job: {"root": runs folder, "cfg": RunConfig dict, "log": file for the child's stdout/stderr,
        "kill": {"write": n, "at": "before"|"mid"|"tmp"|"after"} | {"step": k} | null,
        "kill_after": seconds after "ready" (the zygote kills the child) | null,
        "slow": seconds of sleep per training step, "resume_every": n, "cache": ICL_CACHE_DIR,
        "ready": file created at the first training step, "trace": file listing every write,
        "barrier": [folder, n] (create a file there, wait at the first step until n exist),
        "marker": file that gets one line per snapshot or corpus build, "result": JSON written at the end}

Kill points: "before" = SIGKILL before the n-th atomic write; "mid" = half the bytes written to the
temporary file, then SIGKILL; "tmp" = the whole temporary file written and fsynced but not renamed;
"after" = SIGKILL right after the rename.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run_job(job: dict) -> None:
    import icl_core.data as D
    import icl_core.io as io
    import icl_core.train as T
    from icl_core.config import RunConfig
    from icl_core.runs import get_or_train, run_path

    if job.get("cache"):
        os.environ["ICL_CACHE_DIR"] = job["cache"]
    T.RESUME_MIN_SECONDS = float(job.get("resume_min_seconds", 0.0))  # resume at every save point
    if job.get("resume_every"):
        T.RESUME_EVERY = int(job["resume_every"])
    cfg = RunConfig.from_dict(job["cfg"])
    root = Path(job["root"])
    kill = job.get("kill") or {}
    count = [0]
    real_write = io.atomic_write_bytes

    def write(path, data):
        count[0] += 1
        if job.get("trace"):
            rel = os.path.relpath(path, run_path(cfg, root)) if str(path).startswith(str(root)) else f"cache:{Path(path).name}"
            with open(job["trace"], "a") as f:
                f.write(rel + "\n")
        if count[0] == kill.get("write"):
            at = kill["at"]
            if at == "before":
                _die()
            if at in ("mid", "tmp"):
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.write(fd, data if at == "tmp" else data[: len(data) // 2])
                os.fsync(fd)
                _die()
            real_write(path, data)
            _die()
        return real_write(path, data)

    io.atomic_write_bytes = write  # used by save_tensors / atomic_write_json
    D.atomic_write_bytes = write  # the corpus cache imported the name

    real_batch = D.train_batch
    first = [True]

    def train_batch(corpus, batch_size, n_ctx, seed, step, *rest):
        if first[0]:
            first[0] = False
            if job.get("barrier"):
                folder, n = job["barrier"]
                while len(os.listdir(folder)) < n:
                    time.sleep(0.01)
                time.sleep(0.3)  # the other process is now blocked on the run's lock
            if job.get("ready"):
                Path(job["ready"]).touch()
        if job.get("slow"):
            time.sleep(job["slow"])
        if step == kill.get("step"):
            _die()
        return real_batch(corpus, batch_size, n_ctx, seed, step, *rest)

    D.train_batch = train_batch

    if job.get("marker"):
        real_snapshot, real_build = T.Trainer._snapshot, D.Corpus._build

        def snapshot(self, step, *a, **k):
            with open(job["marker"], "a") as f:
                f.write(f"snapshot {os.getpid()} {step} {self.cfg.name}\n")
            return real_snapshot(self, step, *a, **k)

        def build(self):
            with open(job["marker"], "a") as f:
                f.write(f"corpus {os.getpid()}\n")
            return real_build(self)

        T.Trainer._snapshot = snapshot
        D.Corpus._build = build

    if job.get("barrier"):
        Path(job["barrier"][0], str(os.getpid())).touch()
    run = get_or_train(cfg, root=root, progress=False)
    if job.get("result"):
        last = run.steps[-1]
        Path(job["result"]).write_text(json.dumps(
            {"pid": os.getpid(), "steps": run.steps, "sha": run.manifest["snapshots"][str(last)]["sha256"]}))


def _redirect(log):
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def _fork(job: dict) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _redirect(job.get("log"))
            run_job(job)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def zygote() -> None:
    import torch

    torch.set_num_threads(1)
    import icl_core.runs  # noqa: F401  (the expensive imports happen once, here)
    import icl_core.train  # noqa: F401
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # imports torch._dynamo
    out = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if "parallel" in job:  # several jobs at once (e.g. two builds of one run): exit codes only
            pids = [_fork(j) for j in job["parallel"]]
            codes = []
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                codes.append(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
            print(json.dumps({"exit": codes}), file=out, flush=True)
            continue
        pid = _fork(job)
        status = None
        if job.get("kill_after") is not None:  # kill our own (unreaped) child: its pid cannot be reused
            ready = Path(job["ready"])
            deadline = None
            while status is None:
                r, st = os.waitpid(pid, os.WNOHANG)
                if r:
                    status = st
                    break
                if deadline is None and ready.exists():
                    deadline = time.time() + job["kill_after"]
                if deadline is not None and time.time() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
        if status is None:
            _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid,
                          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}),
              file=out, flush=True)
    out.flush()
    os._exit(0)  # skip the interpreter's slow teardown


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    else:
        job = json.loads(sys.argv[2])
        _redirect(job.get("log"))
        run_job(job)
