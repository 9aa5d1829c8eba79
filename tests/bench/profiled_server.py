"""uvicorn with the bench's usual flags, plus a cProfile that covers only the timed window.

``python -m tests.bench.profiled_server APP PORT OUT.prof``: SIGUSR1 starts profiling the main
thread (where uvicorn runs the event loop and every request), SIGUSR2 stops it and writes the
dump. The load generator sends both at the edges of its window, so start-up, imports and
warm-up are not in the profile.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from types import FrameType

import uvicorn


def main(argv: list[str]) -> int:
    app, port, out = argv[0], int(argv[1]), argv[2]
    profiler = cProfile.Profile()

    def start(_signum: int, _frame: FrameType | None) -> None:
        profiler.enable()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    uvicorn.run(app, factory=True, host="127.0.0.1", port=port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
