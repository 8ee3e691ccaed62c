"""Hostile programs for the sandbox tests, and the driver that runs them as a given user.

Each case is a short program that tries one route out of the sandbox. It gets
its targets from a prelude (``CASE``, its own canary directory ``D`` with
``F = D/keep.txt`` and a fake home ``HOME`` with a ``.bashrc``, the driver's
pid, a canary process, listeners on 127.0.0.1, an AF_UNIX path and an abstract
socket, a token for leftover files). Cases marked ``unguard`` first undo the
runner's in-process guards the way generated code could (re-importing the
modules the guard replaced or removed), so that only the OS layers stand in
their way. The test checks every effect from outside (``test_tasks_sandbox``).

Run as a script (``python sandbox_hostile.py SPEC.json RESULTS.jsonl``) this is
the *driver*: the process that calls ``run_program`` for every case, started by
the test as root or as an unprivileged user, with a secret in its environment.
Results are appended one JSON line per case as they finish, so a driver killed
half-way still leaves the finished ones.
"""
from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Undo the in-process guards: the runner sets blocked modules to None in
# sys.modules and replaces functions in os/posix/shutil/io. Popping the entries
# and importing again brings the originals back: posix (built in) is rebuilt
# from the interpreter's saved copy of its module dict, the real open() is
# _io.open, and the other modules are read again from their files — where this
# uid cannot read them (an interpreter under /root after a uid drop), the
# guarded module stays and os gets the fresh posix functions.
UNGUARD = """
import sys
for _name in [n for n, m in list(sys.modules.items()) if m is None]:
    del sys.modules[_name]
del sys.modules["posix"]
import posix, _io, builtins
builtins.open = _io.open
for _name in ("os", "shutil", "subprocess", "io", "socket", "ctypes"):
    _old = sys.modules.pop(_name, None)
    try:
        globals()[_name] = __import__(_name)
    except ImportError:
        if _old is not None:
            sys.modules[_name] = globals()[_name] = _old
import os
for _f in dir(posix):
    if not _f.startswith("__"):
        setattr(os, _f, getattr(posix, _f))
"""


# Writing until the medium refuses, with a bound so a broken sandbox cannot fill the host.
FLOOD = """
import os
n = 0
try:
    while n < {cap_mb}:
        with open(os.path.join({where}, f"flood-{{TOKEN}}-{{CASE_ID}}-{{n}}"), "wb") as f:
            f.write(b"x" * 2**20)
        n += 1
finally:
    print("WROTE", n, flush=True)
"""


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    unguard: bool = False
    expect: str = "not passed"  # or "timeout"


CASES = [
    # -- deleting or writing files outside the work dir: os, posix, io, pathlib, shutil, ctypes, subprocess, exec
    Case("os.remove", "import os\nos.remove(F)"),
    Case("os.remove unguarded", "os.remove(F)", unguard=True),
    Case("posix.unlink unguarded", "posix.unlink(F)", unguard=True),
    Case("os.rename unguarded", "os.rename(F, F + '.moved')", unguard=True),
    Case("os.replace from work dir", "open('x', 'w').write('evil')\nos.replace('x', F)", unguard=True),
    Case("os.open O_TRUNC", "import os\nos.open(F, os.O_WRONLY | os.O_TRUNC)", unguard=True),
    Case("os.truncate", "os.truncate(F, 0)", unguard=True),
    Case("os.chmod dir", "os.chmod(D, 0)", unguard=True),
    Case("unlink with dir_fd", "fd = os.open(D, os.O_RDONLY)\nos.unlink('keep.txt', dir_fd=fd)", unguard=True),
    Case("symlink from work dir", "os.symlink(F, 'link')\nopen('link', 'w').write('gone')", unguard=True),
    Case("open write", "open(F, 'w').write('gone')"),
    Case("io.open append bashrc", "import io\nio.open(BASHRC, 'a').write('evil\\n')"),
    Case("_io.open append bashrc", "import _io\n_io.open(BASHRC, 'a').write('evil\\n')"),
    Case("io.open unguarded", "io.open(BASHRC, 'a').write('evil\\n')", unguard=True),
    Case("pathlib unlink", "import pathlib\npathlib.Path(F).unlink()", unguard=True),
    Case("pathlib write bashrc", "import pathlib\npathlib.Path(BASHRC).write_text('evil')", unguard=True),
    Case("shutil.rmtree", "import shutil\nshutil.rmtree(D)"),
    Case("shutil.rmtree unguarded", "shutil.rmtree(D)", unguard=True),
    Case("ctypes unlink", "ctypes.CDLL(None).unlink(F.encode())", unguard=True),
    Case("ctypes open for append", "libc = ctypes.CDLL(None)\nfd = libc.open(BASHRC.encode(), 0o2001)\n"
         "assert fd >= 0\nlibc.write(fd, b'evil', 4)", unguard=True),
    Case("subprocess rm", "import subprocess\nsubprocess.run(['rm', '-rf', D], check=True)"),
    Case("subprocess rm unguarded", "subprocess.run(['rm', '-rf', D], check=True)", unguard=True),
    Case("os.system rm home", "assert os.system('rm -rf ' + HOME) == 0", unguard=True),
    Case("exec compile", "exec(compile('import os\\nos.remove(F)', 'x', 'exec'))", unguard=True),
    Case("importlib re-import", "import sys, importlib\nsys.modules.pop('shutil', None)\n"
         "importlib.import_module('shutil').rmtree(D)"),
    Case("posix re-import", "import sys\ndel sys.modules['posix']\nimport posix\nposix.unlink(F)"),
    # -- network: TCP to 127.0.0.1, AF_UNIX by path and abstract name
    Case("tcp 127.0.0.1", "socket.create_connection(('127.0.0.1', PORT), timeout=2).sendall(CASE.encode())",
         unguard=True),
    Case("unix socket path", "s = socket.socket(socket.AF_UNIX)\ns.settimeout(2)\ns.connect(UNIX)\n"
         "s.sendall(CASE.encode())", unguard=True),
    Case("unix socket abstract", "s = socket.socket(socket.AF_UNIX)\ns.settimeout(2)\ns.connect(ABSTRACT)\n"
         "s.sendall(CASE.encode())", unguard=True),
    # -- the parent's environment
    Case("environ of getppid", "print(open(f'/proc/{os.getppid()}/environ', 'rb').read())", unguard=True),
    Case("environ of driver", "print(open(f'/proc/{DRIVER}/environ', 'rb').read())", unguard=True),
    Case("environ scan", "for p in os.listdir('/proc'):\n    try:\n        print(open(f'/proc/{p}/environ', 'rb').read())\n"
         "    except Exception:\n        pass\nprint(dict(os.environ))", unguard=True),
    # -- processes: a bounded fork bomb; leftovers are looked for in the program's pid namespace
    Case("fork bomb", "import time\nkids = []\ntry:\n    for _ in range(32):\n        pid = os.fork()\n"
         "        if pid == 0:\n            time.sleep(60)\n            os._exit(0)\n        kids.append(pid)\n"
         "finally:\n    print('NS', os.readlink('/proc/self/ns/pid'), 'KIDS', kids)", unguard=True),
    Case("subprocess spawn", "kids = []\ntry:\n    for _ in range(8):\n"
         "        kids.append(subprocess.Popen(['sleep', '60']).pid)\n"
         "finally:\n    print('NS', os.readlink('/proc/self/ns/pid'), 'KIDS', kids)", unguard=True),
    Case("threads", "import threading, time\nfor _ in range(32):\n    threading.Thread(target=time.sleep, args=(60,)).start()"),
    # -- memory, disk and output floods
    Case("huge allocation", "x = bytearray(16 * 2**30)"),
    Case("growing list", "x = []\nwhile True:\n    x.append(' ' * 10**7)"),
    Case("disk flood work dir", FLOOD.format(cap_mb=256, where="'.'"), unguard=True),
    Case("disk flood /dev/shm", FLOOD.format(cap_mb=64, where="'/dev/shm'"), unguard=True),
    Case("stdout flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)"),
    Case("stderr flood", "import sys\nwhile True:\n    sys.stderr.write('x' * 10**6)"),
    # -- only the capped tmpfs mounts may be writable (an uncapped one would let a program fill the RAM)
    Case("writable directories", "dirs = {'/', '/dev', '/sandbox', '/etc', '/var/tmp', '/run', sys.prefix, D, HOME}\n"
         "dirs |= {os.path.join('/', d) for d in os.listdir('/')}\nwritable = []\nfor d in sorted(dirs):\n"
         "    probe = os.path.join(d, f'hybridpeft-probe-{TOKEN}-{CASE_ID}')\n    try:\n"
         "        with open(probe, 'x') as f:\n            f.write('x')\n    except OSError:\n        continue\n"
         "    writable.append(d)\n    os.unlink(probe)\nprint('WRITABLE', writable)", unguard=True),
    # -- files that could outlive the run
    Case("leftovers", "for d in ('/tmp', '/dev/shm', '/var/tmp', HOME, '.'):\n    try:\n"
         "        open(os.path.join(d, f'hybridpeft-leak-{TOKEN}-{CASE_ID}'), 'w').write('left')\n"
         "    except OSError as e:\n        print(d, e)", unguard=True),
    # -- time
    Case("infinite loop", "while True:\n    pass", expect="timeout"),
    Case("sleep forever", "import time\ntime.sleep(10**6)", expect="timeout"),
    # -- signals to the evaluating process and to other processes of the same user (last: if one gets
    #    through, the driver dies and the cases after it have no result)
    Case("kill getppid", "os.kill(os.getppid(), 9)", unguard=True),
    Case("kill driver pid", "os.kill(DRIVER, 9)", unguard=True),
    Case("killpg driver", "os.killpg(os.getpgid(DRIVER), 9)", unguard=True),
    Case("kill canary process", "os.kill(CANARY, 9)", unguard=True),
    Case("ctypes kill", "libc = ctypes.CDLL(None)\nassert libc.kill(DRIVER, 9) == 0 or libc.kill(CANARY, 9) == 0",
         unguard=True),
    Case("kill -1", "os.kill(-1, 9)", unguard=True),
    Case("os.system kill", "os.system(f'kill -9 {DRIVER} {CANARY}')", unguard=True),
]


def case_id(case: Case) -> str:
    return "".join(c if c.isalnum() else "-" for c in case.name)


def program(case: Case, context: dict) -> str:
    """The case's source with its prelude: the targets as constants, then the guard bypass if any."""
    cid = case_id(case)
    home = f"{context['canaries']}/{cid}/home"
    values = {
        "CASE": case.name, "CASE_ID": cid, "D": f"{context['canaries']}/{cid}", "F": f"{context['canaries']}/{cid}/keep.txt",
        "HOME": home, "BASHRC": f"{home}/.bashrc", "DRIVER": context["driver_pid"], "CANARY": context["canary_pid"],
        "PORT": context["port"], "UNIX": context["unix"], "ABSTRACT": context["abstract"], "TOKEN": context["token"],
    }
    prelude = "".join(f"{key} = {value!r}\n" for key, value in values.items())
    return prelude + (UNGUARD if case.unguard else "") + case.source + "\n"


def main(spec_file: str, results_file: str) -> None:
    """The driver: run every case through ``run_program`` as this process's user."""
    import dataclasses
    import os

    from hybridpeft.tasks.sandbox import SandboxLimits, run_program

    with open(spec_file) as f:
        spec = json.load(f)
    known = {f.name for f in dataclasses.fields(SandboxLimits)}
    limits = SandboxLimits(**{k: v for k, v in spec["limits"].items() if k in known})
    context = dict(spec["context"], driver_pid=os.getpid())
    lock = threading.Lock()
    out = open(results_file, "a")

    def run(case: Case) -> None:
        try:
            r = run_program(program(case, context), limits)
            record = {"case": case.name, "status": r.status, "passed": r.passed, "returncode": r.returncode,
                      "seconds": r.seconds, "stdout": r.stdout, "stderr": r.stderr}
        except Exception as err:  # an error of the sandbox itself: the test reports it
            record = {"case": case.name, "error": f"{type(err).__name__}: {err}"}
        with lock:
            out.write(json.dumps(record) + "\n")
            out.flush()

    chosen = [c for c in CASES if c.name in set(spec["cases"])]
    with ThreadPoolExecutor(max_workers=spec["workers"]) as pool:
        list(pool.map(run, chosen))
    out.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
