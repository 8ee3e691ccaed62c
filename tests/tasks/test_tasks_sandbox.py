"""The sandbox: canonical HumanEval solutions pass, wrong ones fail, hostile programs are contained."""
from __future__ import annotations

import dataclasses
import os
import time

import pytest

from hybridpeft.tasks.humaneval import execute, load_problems
from hybridpeft.tasks.sandbox import SandboxLimits, run_program, run_programs

FAST = SandboxLimits(timeout_s=4.0, cpu_s=3, memory_mb=512)
SUBSET = [0, 2, 10, 17, 25, 32, 38, 50, 53, 64, 76, 91, 100, 108, 119, 129, 140, 151, 160, 163]  # fixed, spread out


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_canonical_solutions_pass_subset(problems):
    chosen = [problems[i] for i in SUBSET]
    results = execute(chosen, [p["canonical_solution"] for p in chosen], limits=FAST, workers=2)
    failed = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(chosen, results) if not r.passed]
    assert not failed


@pytest.mark.slow
def test_canonical_solutions_pass_all_164(problems):
    assert len(problems) == 164
    results = execute(problems, [p["canonical_solution"] for p in problems], workers=2)
    assert [p["task_id"] for p, r in zip(problems, results) if not r.passed] == []


def test_wrong_solutions_fail(problems):
    chosen = [problems[i] for i in SUBSET[:6]]
    results = execute(chosen, ["    return None\n"] * len(chosen), limits=FAST, workers=2)
    assert [r.status for r in results] == ["failed"] * len(chosen)


def test_leaving_early_is_not_passing():
    for source in ["import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)"]:
        result = run_program(source + "\nassert False", FAST)
        assert not result.passed, source


@pytest.fixture()
def sentinel(tmp_path):
    """A directory and file outside the sandbox that hostile code will try to destroy."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("intact")
    return target


def _hostile(sentinel) -> dict[str, str]:
    d, f = str(sentinel), str(sentinel / "keep.txt")
    return {
        "infinite loop": "while True:\n    pass",
        "sleep forever": "import time\ntime.sleep(10**6)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "posix fork": "import posix\nwhile True:\n    posix.fork()",
        "huge allocation": "x = bytearray(64 * 2**30)",
        "growing list": "x = []\nwhile True:\n    x.append(' ' * 10**7)",
        "rm -rf home": "import os\nos.system('rm -rf ~ " + d + "')",
        "os.remove": f"import os\nos.remove({f!r})",
        "pathlib unlink": f"import pathlib\npathlib.Path({f!r}).unlink()",
        "shutil.rmtree": f"import shutil\nshutil.rmtree({d!r})",
        "subprocess": f"import subprocess\nsubprocess.run(['rm', '-rf', {d!r}])",
        "re-import subprocess": f"import sys\nsys.modules.pop('subprocess', None)\nimport subprocess\nsubprocess.run(['rm', '-rf', {d!r}])",
        "truncate": f"open({f!r}, 'w').write('gone')",
        "os.open": f"import os\nos.open({f!r}, os.O_WRONLY | os.O_TRUNC)",
        "rename": f"import os\nos.rename({f!r}, {f + '.moved'!r})",
        "kill parent": "import os\nos.kill(os.getppid(), 9)",
        "socket": "import socket\nsocket.create_connection(('example.com', 80))",
        "endless output": "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)",
    }


@pytest.mark.parametrize("drop", [True, False], ids=["all-layers", "in-process-guard-only"])
def test_hostile_programs_fail_and_are_contained(sentinel, drop):
    """Without the uid drop (a non-root user, as in CI) the in-process guard alone must hold."""
    cases = _hostile(sentinel)
    limits = dataclasses.replace(FAST, drop_privileges=drop)
    start = time.monotonic()
    results = dict(zip(cases, run_programs(list(cases.values()), limits, workers=2)))
    elapsed = time.monotonic() - start
    passed = [name for name, r in results.items() if r.passed]
    assert not passed
    assert results["infinite loop"].status == "timeout" and results["sleep forever"].status == "timeout"
    assert (sentinel / "keep.txt").read_text() == "intact"
    assert sorted(os.listdir(sentinel)) == ["keep.txt"]
    assert elapsed < 60  # nothing outlived its timeout


def test_no_new_threads_or_processes():
    """RLIMIT_NPROC = 0 stops clone() in the kernel (for root only once privileges are dropped)."""
    result = run_program("import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()", FAST)
    assert not result.passed and "can't start new thread" in result.stderr


def test_program_sees_only_its_own_directory_and_no_parent_state(tmp_path):
    os.environ["HYBRIDPEFT_SECRET_FOR_TEST"] = "leak"
    try:
        source = (
            "import os, sys, tempfile\n"
            "assert 'HYBRIDPEFT_SECRET_FOR_TEST' not in os.environ, os.environ\n"
            "cwd = os.getcwd()\n"
            "assert os.path.basename(cwd).startswith('hybridpeft-sandbox-'), cwd\n"
            "assert os.path.expanduser('~') == cwd and tempfile.gettempdir() == cwd\n"
            "open('scratch.txt', 'w').write('ok')\n"           # its own directory is writable
            "assert sys.stdin is None or sys.stdin.read() == ''\n"
        )
        result = run_program(source, FAST)
    finally:
        del os.environ["HYBRIDPEFT_SECRET_FOR_TEST"]
    assert result.passed, result.stderr


def test_workdir_is_removed_after_the_run():
    result = run_program("import os\nprint(os.getcwd())", FAST)
    assert result.passed
    assert not os.path.exists(result.stdout.strip())
