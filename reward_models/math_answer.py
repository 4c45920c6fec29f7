"""Is a response's final answer mathematically equal to a reference? A thin, hang-proof layer over math-verify
(HuggingFace's checker, as used by open-r1 and lighteval): it extracts the answer (\\boxed{...}, "the answer is ...",
a LaTeX or plain expression) and compares with sympy, so "\\boxed{\\frac{1}{2}}" equals "0.5" and "1,000" equals "1000".

math-verify bounds each parse and comparison with signal.alarm, which works only in a process's main thread, and
sympy on a junk answer such as 9^{9^{9^9}} runs until stopped. So in the main thread the check runs here with
math-verify's timeouts; in any other thread it runs in a worker process (whose main thread has the timeouts) under a
wall-clock limit, and a worker that overruns is killed. Either way a response that cannot be read or checked in time
is simply not equal (0.0): junk text never stops a run. Kept free of torch so that the worker starts light.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import subprocess
import sys
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

# Only the end of a response is searched: the final answer is there, and it bounds the regex work on a runaway
# generation. Generous: a MATH solution's last lines fit many times over.
MAX_RESPONSE_CHARS = 4000

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # where the worker imports reward_models from


@functools.lru_cache(maxsize=1)
def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # \boxed{} first (MATH's convention, and what a model trained on it writes), then "the answer is ...", then the
    # last LaTeX or plain expression in the text.
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


@functools.lru_cache(maxsize=100_000)
def parse_reference(text: str, timeout: int) -> list:
    """The parsed reference: a solution with \\boxed{}, or a bare answer ("72", "\\frac{1}{2}", "(1, 2)") read as
    LaTeX first ("$...$", so "\\sqrt{2}/2" parses), then as text. A ValueError when nothing in it parses: a data bug
    that must not silently score every response 0.0."""
    from math_verify import parse

    candidates = [text] if "\\boxed" in text else [f"${text}$", text]
    for candidate in candidates:
        parsed = parse(candidate, _configs(), parsing_timeout=timeout)
        if parsed:
            return parsed
    raise ValueError(f"math-verify finds no answer in the reference {text[:60]!r}")


def check(reference: str, response: str, timeout: int) -> bool:
    """Whether `response`'s final answer equals `reference`'s (see parse_reference); False for anything unreadable.
    Runs math-verify with signal timeouts, so only in a main thread."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    gold = parse_reference(reference, timeout)  # outside the try: a bad reference is an error, not a 0.0
    try:
        answer = parse(response[-MAX_RESPONSE_CHARS:], _configs(), parsing_timeout=timeout)
        return bool(answer) and bool(verify(gold, answer, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException; math-verify mostly catches its own
        log.debug("math_answer: could not check a response", exc_info=True)
        return False


class Checker:
    """check() from any thread: directly in the main thread, else in a worker process (started on first need)."""

    def __init__(self, timeout: int = 5):
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"timeout must be a positive whole number of seconds, got {timeout!r}")
        self.timeout = timeout
        self._worker: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one worker, one check at a time, whichever thread asks

    def __call__(self, reference: str, response: str) -> bool:
        if threading.current_thread() is threading.main_thread():
            return check(reference, response, self.timeout)
        with self._lock:
            return self._in_worker(reference, response)

    def _in_worker(self, reference: str, response: str) -> bool:
        # A plain `python -m reward_models.math_answer` child speaking JSON lines, not multiprocessing: spawn would
        # re-import the launching script (running a script without a __main__ guard again), and fork can deadlock a
        # process that holds torch's threads.
        starting = self._worker is None
        if starting:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
            self._worker = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=env)
            weakref.finalize(self, self._worker.kill)
        worker = self._worker
        assert worker.stdin is not None and worker.stdout is not None
        # Parsing both texts and comparing, each bounded by the worker's own alarm; the slack covers the worker's
        # start (importing math-verify and sympy) and the round trip.
        limit = 3 * self.timeout + (60 if starting else 5)
        try:
            worker.stdin.write(json.dumps([reference, response, self.timeout]) + "\n")
            worker.stdin.flush()
            ready, _, _ = select.select([worker.stdout], [], [], limit)
            line = worker.stdout.readline() if ready else ""
        except OSError:  # the worker died (killed, out of memory): restart it next time
            line = ""
        if not line:
            log.warning("math_answer: the worker process gave no answer within %ss; it is restarted and the "
                        "response scores 0", limit)
            self.close()
            return False
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:  # something in the worker wrote to stdout: out of step, so start afresh
            log.warning("math_answer: the worker process answered %r; it is restarted and the response scores 0",
                        line[:80])
            self.close()
            return False
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["equal"]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker = None

    def __getstate__(self):  # a rule may be copied into other processes; the worker stays with its owner
        return {"timeout": self.timeout}

    def __setstate__(self, state):
        self.__init__(state["timeout"])


def _serve() -> None:
    """The worker: one JSON line [reference, response, timeout] in, one {"equal": bool} or {"error": message} out."""
    for line in sys.stdin:
        reference, response, timeout = json.loads(line)
        try:
            reply: dict = {"equal": check(reference, response, timeout)}
        except ValueError as err:
            reply = {"error": str(err)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _serve()
