"""Named moments at which a test can stop the run as a crash or a full disk would.

``NEXTLONG_FAILPOINT=<moment>`` kills the process with SIGKILL at that moment;
``NEXTLONG_FAILPOINT=<moment>=enospc`` raises "No space left on device" there instead, and
``<moment>=stall`` makes the process wait there (a unit that runs for ever). Unset (always, outside tests),
:func:`failpoint` does nothing. Moments: ``<stage>:start`` (a unit is about to run),
``<stage>:before_marker`` (a unit's outputs are in place, its marker is not), ``merge:between_files``,
``publish:before_switch``, ``publish:after_switch``.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "NEXTLONG_FAILPOINT"


def failpoint(moment: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, action = spec.partition("=")
    if name != moment:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"({moment})")
    if action == "stall":
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)
