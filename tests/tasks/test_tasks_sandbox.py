"""The sandbox: canonical HumanEval solutions pass, wrong ones fail, hostile programs are contained.

The hostile programs (``sandbox_hostile.py``) run in one batch per user — as
root and as an unprivileged user (uid 65534, started with ``setpriv``) — from a
driver process that holds a secret in its environment; every effect is then
checked from outside: canary files and a fake ``~/.bashrc`` unchanged, the
driver and a canary process of the same user alive, no connection reached the
listeners on 127.0.0.1, an AF_UNIX path and an abstract socket, the secret not
in any output, no leftover files or processes, floods bounded and failed.
"""
from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import site
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import hybridpeft
from hybridpeft.tasks import sandbox
from hybridpeft.tasks.humaneval import HumanEval, execute, load_problems
from hybridpeft.tasks.sandbox import Isolation, SandboxLimits, SandboxUnavailable, run_program, run_programs

import sandbox_hostile as hostile

FAST = SandboxLimits(timeout_s=4.0, cpu_s=3, memory_mb=512)
HOSTILE_LIMITS = {"timeout_s": 3.0, "cpu_s": 2, "memory_mb": 512, "file_size_mb": 8, "disk_mb": 16}
SUBSET = [0, 2, 10, 17, 25, 32, 38, 50, 53, 64, 76, 91, 100, 108, 119, 129, 140, 151, 160, 163]  # fixed, spread out
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
HOST_TMP_DIRS = ("/tmp", "/dev/shm", "/var/tmp")


def _require_isolation() -> None:
    iso = sandbox.isolation()
    if iso.kind != "bwrap":
        pytest.skip(f"no OS sandbox on this machine: {iso.reason}")


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_canonical_solutions_pass_subset(problems):
    _require_isolation()
    chosen = [problems[i] for i in SUBSET]
    results = execute(chosen, [p["canonical_solution"] for p in chosen], limits=FAST, workers=2)
    failed = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(chosen, results) if not r.passed]
    assert not failed


@pytest.mark.slow
def test_canonical_solutions_pass_all_164(problems):
    _require_isolation()
    assert len(problems) == 164
    results = execute(problems, [p["canonical_solution"] for p in problems], workers=2)
    assert [p["task_id"] for p, r in zip(problems, results) if not r.passed] == []


def test_wrong_solutions_fail(problems):
    _require_isolation()
    chosen = [problems[i] for i in SUBSET[:6]]
    results = execute(chosen, ["    return None\n"] * len(chosen), limits=FAST, workers=2)
    assert [r.status for r in results] == ["failed"] * len(chosen)


def test_leaving_early_is_not_passing():
    _require_isolation()
    for source in ["import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)"]:
        result = run_program(source + "\nassert False", FAST)
        assert not result.passed, source


def test_no_new_threads_or_processes():
    """RLIMIT_NPROC = 0 stops clone() in the kernel (threads too)."""
    _require_isolation()
    result = run_program("import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()", FAST)
    assert not result.passed and "can't start new thread" in result.stderr


def test_program_sees_only_its_own_directory_and_no_parent_state():
    _require_isolation()
    os.environ["HYBRIDPEFT_SECRET_FOR_TEST"] = "leak"
    try:
        source = (
            "import os, sys, tempfile\n"
            "assert 'HYBRIDPEFT_SECRET_FOR_TEST' not in os.environ, os.environ\n"
            "assert os.getcwd() == '/tmp' and os.path.expanduser('~') == '/tmp' and tempfile.gettempdir() == '/tmp'\n"
            "assert os.getuid() == 65534 and os.getpid() < 10, (os.getuid(), os.getpid())\n"  # its own pid namespace
            f"assert not os.path.exists({__file__!r}) and not os.path.exists('/etc/passwd')\n"  # host files unseen
            "open('scratch.txt', 'w').write('ok')\n"           # its own directory is writable
            "assert sys.stdin is None or sys.stdin.read() == ''\n"
        )
        result = run_program(source, FAST)
    finally:
        del os.environ["HYBRIDPEFT_SECRET_FOR_TEST"]
    assert result.passed, result.stderr


def test_isolation_says_which_layers_are_active():
    _require_isolation()
    iso = sandbox.isolation()
    text = iso.describe()
    for layer in ("mount namespace", "pid namespace", "network namespace", "seccomp", "rlimits"):
        assert layer in text, text
    assert ("no user namespace" in text) == (os.geteuid() == 0)


LAYERS_PROBE = """
import json, os
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
mounts = {line.split()[4]: line.split(' - ')[1] + ' ' + line.split()[5] for line in open('/proc/self/mountinfo')}
print(json.dumps({
    'uid': os.getuid(), 'cap_eff': status['CapEff'].strip(), 'no_new_privs': status['NoNewPrivs'].strip(),
    'seccomp': status['Seccomp'].strip(), 'ns': {n: os.readlink(f'/proc/self/ns/{n}') for n in NAMESPACES},
    'mounts': mounts, 'interfaces': [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]],
    'nproc': [l.split()[2] for l in open('/proc/self/limits') if l.startswith('Max processes')][0], 'processes': sorted(p for p in os.listdir('/proc') if p.isdigit()),
}))
"""
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts")


def test_layers_are_in_force():
    """Read back from inside what the kernel applied: identity, namespaces, mounts, network, seccomp, rlimits."""
    _require_isolation()
    limits = SandboxLimits(timeout_s=10.0, cpu_s=5, memory_mb=512, disk_mb=16, output_chars=50_000)
    result = run_program(f"NAMESPACES = {NAMESPACES!r}\n" + LAYERS_PROBE, limits)
    assert result.passed, result.stderr
    inside = json.loads(result.stdout)
    assert inside["uid"] == NOBODY and int(inside["cap_eff"], 16) == 0 and inside["no_new_privs"] == "1"
    for name in NAMESPACES:
        assert inside["ns"][name] != os.readlink(f"/proc/self/ns/{name}"), name
    assert inside["mounts"]["/"].split()[-1].startswith("ro"), inside["mounts"]["/"]
    for path, size in (("/tmp", "size=16384k"), ("/dev/shm", "size=1024k")):
        assert inside["mounts"][path].startswith("tmpfs") and size in inside["mounts"][path], inside["mounts"][path]
    assert all(inside["mounts"][m].split()[-1].startswith("ro") for m in inside["mounts"]
               if m not in ("/tmp", "/dev/shm", "/proc") and not m.startswith(("/dev", "/proc/"))), inside["mounts"]
    assert inside["interfaces"] == ["lo"]
    assert inside["nproc"] == "0" and len(inside["processes"]) <= 2  # bwrap's init and the program
    if "syscalls denied" in sandbox.isolation().describe():
        assert inside["seccomp"] == "2"  # filter mode


# ---------------------------------------------------------------- no OS sandbox: refuse unless opted in

NO_SANDBOX = Isolation("none", reason="forced for this test")


def test_refuses_without_os_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: NO_SANDBOX)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    ran = []
    monkeypatch.setattr(sandbox, "_run_unsafe", lambda *a: ran.append(a))
    for call in (lambda: run_program("print(1)", FAST), lambda: run_programs(["print(1)"] * 3, FAST)):
        with pytest.raises(SandboxUnavailable) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "forced for this test" in message and "--allow-unsafe-exec" in message
    assert ran == []


def test_humaneval_refuses_before_generating(monkeypatch, problems):
    monkeypatch.setattr(sandbox, "isolation", lambda: NO_SANDBOX)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    import hybridpeft.tasks.humaneval as humaneval

    monkeypatch.setattr(humaneval, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    task = HumanEval()
    examples = task.load("dev", limit=1)
    with pytest.raises(SandboxUnavailable):
        task.evaluate(model=None, tokenizer=None, examples=examples)


@pytest.mark.parametrize("opt_in", ["argument", "environment"])
def test_unsafe_opt_in_warns_and_runs(monkeypatch, opt_in):
    monkeypatch.setattr(sandbox, "isolation", lambda: NO_SANDBOX)
    monkeypatch.setattr(sandbox, "_warned_unsafe", False)
    limits = SandboxLimits(timeout_s=4.0, cpu_s=3, memory_mb=512, allow_unsafe_exec=opt_in == "argument")
    if opt_in == "environment":
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT an OS sandbox"):
        results = run_programs(["print(6 * 7)", "raise ValueError"], limits, workers=1)
    assert [(r.status, r.stdout.strip()) for r in results] == [("passed", "42"), ("failed", "")]


def test_cli_flag_opts_in(monkeypatch):
    from hybridpeft import cli

    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")  # recorded, so the flag's "1" is undone after the test
    for argv in (["train", "--allow-unsafe-exec"], ["eval", "--base", "--allow-unsafe-exec"],
                 ["bench", "x.yaml", "--allow-unsafe-exec"]):
        args = cli.build_parser().parse_args(argv)
        assert args.allow_unsafe_exec is True, argv
    assert cli.build_parser().parse_args(["eval", "--base"]).allow_unsafe_exec is False
    cli.apply_unsafe_exec(cli.build_parser().parse_args(["eval", "--base", "--allow-unsafe-exec"]))
    assert os.environ[sandbox.UNSAFE_ENV] == "1"


# ---------------------------------------------------------------- hostile programs, as root and as nobody

class Listeners:
    """TCP on 127.0.0.1, AF_UNIX on a path and on an abstract name; records what any client sends."""

    def __init__(self, directory: Path, token: str):
        self.received: list[bytes] = []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.unix_path = str(directory / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)  # connectable by any uid: the mount namespace must hide it
        self.abstract_name = f"\0hybridpeft-test-{token}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.servers = [self.tcp, self.unix, self.abstract]
        for s in self.servers:
            s.listen(16)
            s.settimeout(0.2)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.servers]
        for t in self.threads:
            t.start()

    def _serve(self, server: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.received.append(conn.recv(200) or b"<connected>")
                except OSError:
                    self.received.append(b"<connected>")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        for s in self.servers:
            s.close()


def _site_paths() -> list[str]:
    src = str(Path(hybridpeft.__file__).resolve().parents[1])
    return [src, *site.getsitepackages()]


def _driver_env(home: Path, tmp: Path, secret: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp), "HYBRIDPEFT_TEST_SECRET": secret,
            "PYTHONPATH": os.pathsep.join(_site_paths()), "LANG": "C.UTF-8"}


PROBE = ("import json, os\nfrom hybridpeft.tasks import sandbox\niso = sandbox.isolation()\n"
         "print(json.dumps({'kind': iso.kind, 'reason': iso.reason, 'uid': os.geteuid()}))")


def _unprivileged_python() -> tuple[str | None, str]:
    """An interpreter with which uid 65534 can run hybridpeft and the sandbox here, or (None, why not).

    The test's own interpreter may live where that uid cannot read (e.g. under /root);
    then the system Python with the same site paths serves.
    """
    if os.geteuid() != 0:
        return sys.executable, ""  # already unprivileged
    if shutil.which("setpriv") is None:
        return None, "setpriv (util-linux) is not installed"
    reasons = []
    candidates = [sys.executable] + [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
    for python in candidates:
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONPATH": os.pathsep.join(_site_paths())}
        proc = subprocess.run([*SETPRIV, python, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, cwd="/")
        try:
            found = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reasons.append(f"{python}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            continue
        if found["kind"] == "bwrap" and found["uid"] == NOBODY:
            return python, ""
        reasons.append(f"{python}: {found['reason']}")
    return None, "; ".join(reasons)


def _host_files_with(token: str) -> list[str]:
    found = []
    for d in HOST_TMP_DIRS:
        try:
            found += [os.path.join(d, n) for n in os.listdir(d) if token in n]
        except OSError:
            pass
    return found


def _processes_in_pid_namespace(ns: str, settle_s: float = 30.0) -> list[int]:
    """Live (non-zombie) processes of pid namespace ``ns``.

    When a pid namespace's init exits the kernel kills the rest, but asynchronously: on a
    loaded machine they may still be listed for a moment. Poll until none is left or
    ``settle_s`` has passed; only a process that survives that long counts.
    """
    deadline = time.monotonic() + settle_s
    while True:
        pids = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.readlink(f"/proc/{p}/ns/pid") == ns and _state(p) != "Z":
                        pids.append(int(p))
                except OSError:
                    pass
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def _state(pid: str) -> str:
    with open(f"/proc/{pid}/stat") as f:  # "pid (comm) S ...": the state follows the last ')'
        return f.read().rpartition(")")[2].split()[0]


def _run_batch(user: str) -> dict:
    """Run every hostile case from a driver process of ``user``; gather what is needed to check effects."""
    if user == "root" and os.geteuid() != 0:
        pytest.skip("the tests do not run as root")
    if user == "root":
        python, reason = sys.executable, ""
        if sandbox.isolation().kind != "bwrap":
            reason = sandbox.isolation().reason
    else:
        python, reason = _unprivileged_python()
    if python is None or reason:
        pytest.skip(f"no OS sandbox for {user} here: {reason}")
    as_nobody = user == "nobody" and os.geteuid() == 0
    owner = NOBODY if as_nobody else os.geteuid()
    token, secret = secrets.token_hex(6), "secret-" + secrets.token_hex(8)
    base = Path(tempfile.mkdtemp(prefix="hybridpeft-sandbox-test-"))
    canaries, home, driver_tmp = base / "canaries", base / "home", base / "tmp"
    for d in (canaries, home, driver_tmp):
        d.mkdir()
    for case in hostile.CASES:  # each case its own canary dir and fake home, world-writable:
        d = canaries / hostile.case_id(case)  # only the sandbox may keep the program out
        (d / "home").mkdir(parents=True)
        (d / "keep.txt").write_text("intact")
        (d / "home" / ".bashrc").write_text("# fake bashrc\n")
        for path in (d, d / "home"):
            os.chmod(path, 0o777)
        for path in (d / "keep.txt", d / "home" / ".bashrc"):
            os.chmod(path, 0o666)
    for path in [base, *base.rglob("*")]:
        os.chown(path, owner, owner)
    os.chmod(base, 0o755)
    listeners = Listeners(base, token)
    prefix = SETPRIV if as_nobody else []
    canary = subprocess.Popen([*prefix, "sleep", "300"], start_new_session=True)
    spec = {"limits": HOSTILE_LIMITS, "workers": 2, "cases": [c.name for c in hostile.CASES],
            "context": {"canaries": str(canaries), "canary_pid": canary.pid, "port": listeners.tcp.getsockname()[1],
                        "unix": listeners.unix_path, "abstract": listeners.abstract_name, "token": token}}
    (base / "spec.json").write_text(json.dumps(spec))
    results_file = base / "results.jsonl"
    results_file.touch()
    os.chown(results_file, owner, owner)
    start = time.monotonic()
    try:
        driver = subprocess.run([*prefix, python, hostile.__file__, str(base / "spec.json"), str(results_file)],
                                env=_driver_env(home, driver_tmp, secret), capture_output=True, text=True,
                                timeout=300, cwd=str(base), start_new_session=True)
        seconds = time.monotonic() - start
        time.sleep(0.3)  # let the listeners take any last connection
        results = {}
        for line in results_file.read_text().splitlines():
            record = json.loads(line)
            results[record["case"]] = record
        canary_alive = canary.poll() is None
        state = {
            "user": user, "token": token, "secret": secret, "results": results, "seconds": seconds,
            "driver_rc": driver.returncode, "driver_stderr": driver.stderr[-2000:], "canary_alive": canary_alive,
            "received": list(listeners.received), "host_leftovers": _host_files_with(token),
            "driver_tmp_leftovers": os.listdir(driver_tmp), "host_pid_ns": os.readlink("/proc/self/ns/pid"),
            "canaries": {}, "ns_processes": {},
        }
        for case in hostile.CASES:
            d = canaries / hostile.case_id(case)
            state["canaries"][case.name] = _snapshot(d)
            record = results.get(case.name, {})
            m = re.search(r"NS (pid:\[\d+\]) KIDS \[([\d, ]*)\]", record.get("stdout", ""))
            if m:
                kids = [int(k) for k in m.group(2).split(",") if k.strip()]
                if m.group(1) != state["host_pid_ns"]:
                    state["ns_processes"][case.name] = _processes_in_pid_namespace(m.group(1))
                else:  # no pid namespace (the old sandbox): the pids are the host's
                    state["ns_processes"][case.name] = [k for k in kids if os.path.exists(f"/proc/{k}")]
                state["ns_processes"][case.name + " kids"] = kids
        return state
    finally:
        canary.kill()
        canary.wait()
        listeners.close()
        for path in _host_files_with(token):  # clean up after a sandbox that failed to contain
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        shutil.rmtree(base, ignore_errors=True)


def _snapshot(d: Path) -> dict:
    def read(p: Path):
        try:
            return p.read_text()
        except OSError as err:
            return f"<{err.strerror}>"

    def listing(p: Path):
        try:
            return sorted(os.listdir(p))
        except OSError as err:
            return f"<{err.strerror}>"

    try:
        mode = stat.S_IMODE(os.stat(d).st_mode)
    except OSError:
        mode = None
    return {"keep": read(d / "keep.txt"), "bashrc": read(d / "home" / ".bashrc"), "files": listing(d),
            "home": listing(d / "home"), "mode": mode}


INTACT = {"keep": "intact", "bashrc": "# fake bashrc\n", "files": ["home", "keep.txt"], "home": [".bashrc"], "mode": 0o777}
BATCHES: dict[str, dict] = {}


@pytest.fixture(scope="module", params=["root", "nobody"])
def batch(request):
    if request.param not in BATCHES:
        BATCHES[request.param] = _run_batch(request.param)
    return BATCHES[request.param]


def _violations(state: dict, case: hostile.Case) -> list[str]:
    """Every effect of ``case`` that escaped the sandbox, seen from outside."""
    record = state["results"].get(case.name)
    if record is None:
        return [f"no result: the driver died (exit status {state['driver_rc']}): {state['driver_stderr'][-300:]}"]
    if "error" in record:
        return [f"the sandbox raised {record['error']}"]
    bad = []
    snapshot = state["canaries"][case.name]
    if snapshot != INTACT:
        bad.append(f"canary files changed: {snapshot}")
    tag = case.name.encode()
    if any(tag in got for got in state["received"]):
        bad.append("reached a listener outside (127.0.0.1 or AF_UNIX)")
    output = record["stdout"] + record["stderr"]
    if state["secret"] in output:
        bad.append("read the driver's environment")
    cid = hostile.case_id(case)
    leftovers = [p for p in state["host_leftovers"] if cid in p]
    if leftovers:
        bad.append(f"left files on the host: {leftovers[:5]}")
    if state["driver_tmp_leftovers"]:
        bad.append(f"left files in the driver's TMPDIR: {state['driver_tmp_leftovers'][:5]}")
    if case.expect == "timeout" and record["status"] != "timeout":
        bad.append(f"status {record['status']}, expected timeout")
    if "flood" in case.name or case.name in ("huge allocation", "growing list"):
        if record["passed"]:
            bad.append("a flood passed")
        wrote = re.search(r"WROTE (\d+)", record["stdout"])
        cap = 1 if "shm" in case.name else HOSTILE_LIMITS["disk_mb"]
        if wrote and int(wrote.group(1)) > cap:
            bad.append(f"wrote {wrote.group(1)} MiB, more than the {cap} MiB cap")
    writable = re.search(r"WRITABLE (\[.*\])", record["stdout"])
    if writable and not set(ast.literal_eval(writable.group(1))) <= {"/tmp", "/dev/shm"}:
        bad.append(f"could write outside its capped tmpfs mounts: {writable.group(1)}")
    if case.name in state["ns_processes"]:
        if state["ns_processes"][case.name]:
            bad.append(f"processes outlived the run: {state['ns_processes'][case.name]}")
        if state["ns_processes"][case.name + " kids"]:
            bad.append(f"could start processes: {state['ns_processes'][case.name + ' kids']}")
    if "kill" in case.name and not state["canary_alive"]:
        bad.append("a process of the same user outside the sandbox was killed")
    return bad


@pytest.mark.parametrize("case", hostile.CASES, ids=hostile.case_id)
def test_hostile_program_is_contained(batch, case):
    """Checked from outside; see the module docstring. ``batch`` runs once per user for all cases."""
    assert _violations(batch, case) == []


def test_hostile_batch_completes_and_the_driver_survives(batch):
    assert batch["driver_rc"] == 0, batch["driver_stderr"]
    assert len(batch["results"]) == len(hostile.CASES)
