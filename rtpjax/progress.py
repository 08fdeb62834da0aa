"""Progress of the long phases (fetching the default model, GGUF conversion, loading weights, compiling): a bar on a
terminal, log lines elsewhere (or with progress=False), so no entry point sits silent for minutes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("rtpjax")


def configure_logging(level: int = logging.INFO) -> None:
    """Show rtpjax's own log lines on stderr, as vLLM does, unless the application configured logging itself (a
    handler on the root or rtpjax logger) or RTPJAX_CONFIGURE_LOGGING=0. Other libraries' loggers are left alone
    (JAX's backend probe logs at INFO about TPUs a user does not have)."""
    if os.environ.get("RTPJAX_CONFIGURE_LOGGING", "1") == "0" or logging.getLogger().handlers or log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rtpjax: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to stderr (py-spy's view with nothing installed), for a
    server or engine process that seems stuck. Only our own processes install it: the CLI and the engine process."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def _amount(n: float, unit: str) -> str:
    return f"{n / 1e9:.2f} GB" if unit == "B" else f"{n:g} {unit}s"


class LogProgress:
    """The part of tqdm's interface the phases use, as log lines: at the start, at most every `every` seconds, and at
    the end (with the time taken)."""

    def __init__(self, total: float, desc: str, unit: str, every: float = 10.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.began = 0, time.monotonic()
        self._last = self.began
        log.info("%s: %s ...", desc, _amount(total, unit))

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            log.info("%s: %s of %s", self.desc, _amount(self.n, self.unit), _amount(self.total, self.unit))

    def close(self) -> None:
        log.info("%s: %s done in %.1f s", self.desc, _amount(self.n, self.unit), time.monotonic() - self.began)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def progress_bar(total: float, desc: str, unit: str, enabled: bool = True, **tqdm_options):
    """A tqdm bar where stderr is a terminal and `enabled`, else a LogProgress."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, **tqdm_options)
    return LogProgress(total, desc, unit)
