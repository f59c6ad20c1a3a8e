"""Shared fixtures. TORA_HOME points at a temporary folder in every test so
nothing touches the user's data dir (the embedded model file is shared
through one session-wide cache so it is assembled once per test run)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tora.backends.base import Backend, Delta, Done, GenerationRequest, checked_stream

ROOT = Path(__file__).resolve().parent.parent
# The full-size data (all seven sets and ToRA's released outputs): ../shared/data beside the
# checkout, as CI has it, or $TORA_DATA_DIR. A fresh clone has neither: the tests that need it
# skip (`needs_full_data`), and the rest use the fixtures in tests/data/ or the sets shipped in
# tora/datasets/.
DATA = Path(os.environ.get("TORA_DATA_DIR") or ROOT.parent / "shared" / "data")
RELEASED_GSM8K = DATA / "released" / "tora-code-34b-v1.0" / "gsm8k" / "test_tora_-1_seed0_t0.0_s0_e1319.jsonl"
# The first 15 and 5 rows of that file (MIT, see tests/data/LICENSE).
HEAD = Path(__file__).parent / "data" / "released_gsm8k_head.jsonl"
HEAD5 = Path(__file__).parent / "data" / "released_gsm8k_head5.jsonl"
TORA = [sys.executable, "-m", "tora.cli.main"]


async def collect(backend: Backend, request: GenerationRequest) -> tuple[str, Done]:
    """The whole text of one backend call and its `Done`, through the stream contract's checks."""
    text, done = "", None
    async for event in checked_stream(backend, request):
        if isinstance(event, Delta):
            text += event.text
        else:
            done = event
    assert done is not None
    return text, done


def needs_full_data(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.exists(), reason=f"{path} is not here (full-size data: ../shared/data beside the checkout, or TORA_DATA_DIR)"
    )


def new_tora_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh TORA_HOME whose models and caches are the session's shared ones."""
    home = tmp_path_factory.mktemp("tora_home")
    shared_models = Path(os.environ.get("TORA_TEST_MODELS", tmp_path_factory.getbasetemp() / "models"))
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    shared_models.mkdir(parents=True, exist_ok=True)
    # Caches are keyed by what they hold (the CPU variant verdict, KV states):
    # shared, so that each test does not probe the engine again.
    shared_cache = tmp_path_factory.getbasetemp() / "cache"
    shared_cache.mkdir(exist_ok=True)
    (home / "cache").symlink_to(shared_cache, target_is_directory=True)
    return home


@pytest.fixture(autouse=True)
def tora_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = new_tora_home(tmp_path_factory)
    monkeypatch.setenv("TORA_HOME", str(home))
    return home


def write_released(path: Path, items: list[dict[str, Any]]) -> Path:
    """A file in ToRA's released format: the simplest way to script a replay."""
    with path.open("w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path


def tora_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the `tora` command in this process: (exit code, stdout, stderr)."""
    from tora.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 0), out, err


# --- protections a machine may lack -------------------------------------------------
# A test of a sandbox protection skips, with the reason, where the machine lacks it (a laptop
# without bubblewrap or a writable cgroup hierarchy). In CI that would hide a missing protection:
# `.ci/run` sets TORA_REQUIRE_TIER=bwrap, and then such a skip is reported as a failure.
REQUIRED_TIER = os.environ.get("TORA_REQUIRE_TIER") or None
_MISSING = "protection missing here: "


def needs_protection(missing: bool, what: str) -> pytest.MarkDecorator:
    """Skip when `missing` (a failure under TORA_REQUIRE_TIER; see `pytest_runtest_makereport`)."""
    return pytest.mark.skipif(missing, reason=_MISSING + what)


def skip_without_protection(what: str) -> None:
    """The same, decided inside a test."""
    pytest.skip(_MISSING + what)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if REQUIRED_TIER and report.skipped and _MISSING in str(report.longrepr):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"TORA_REQUIRE_TIER={REQUIRED_TIER}: this protection must be tested here, but {reason}"


# --- timing assertions -----------------------------------------------------------------
# A bound in seconds fails spuriously on a loaded 2-core machine. A test that bounds a duration
# measures a control in the same test (a fresh kernel's start: the same processes, sockets and
# scheduler the measured thing needs) and bounds the duration by a multiple of it, plus the
# design's own fixed waits. Speed targets proper live in benchmarks/.
async def kernel_start_s(policy: Any) -> float:
    """How long a fresh kernel takes to start here, now (started and shut down)."""
    import time

    from sandbox import start_kernel

    t = time.monotonic()
    k = await start_kernel(policy)
    took = time.monotonic() - t
    await k.shutdown()
    return took


def assert_within(took: float, control: float, factor: float, *, fixed: float = 0.0, what: str = "") -> None:
    """`took` <= `factor` x the control measured in the same test + `fixed` (the design's own waits)."""
    bound = factor * control + fixed
    assert took <= bound, f"{what}: {took:.2f} s > {factor:g} x control {control:.2f} s + {fixed:g} s"


def descendants(pid: int) -> list[Any]:
    """Every process below `pid` (psutil.Process), to check none outlives a server."""
    import psutil

    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[Any]) -> list[Any]:
    """Those of `procs` still running (zombies count as gone)."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


# A cell that sends, signed as its own, output holding a lone surrogate (a JSON "\ud800" escape):
# a trajectory used to be lost to it (tests of every output path use it).
SURROGATE_CELL = (
    "import json\n"
    "_k = get_ipython().kernel\n"
    "parts = [_k.session.pack(_k.session.msg_header('stream')), _k.session.pack(_k.get_parent()['header']),"
    " b'{}', json.dumps({'name': 'stdout', 'text': 'a\\ud800b\\n'}).encode()]\n"
    "_k.iopub_socket.send_multipart([b'stream', b'<IDS|MSG>', _k.session.sign(parts), *parts])\n"
    "print(6 * 7)\n"
)
