"""Imported by a test's Celery workers (`celery worker -I tests.worker_pause`): holds an attention_maps step just
before its first partition file would be swapped in, so that the test can kill the process mid-step.

Active only where $SSL_ATTENTION_TEST_PAUSE_DIR names a folder holding a file `armed`. The process executing
the step then writes `paused-<pid>` there (its new rows are all in temporary files; nothing is replaced yet)
and waits until a file `release` appears, then commits as usual. Nothing here runs in the library itself.
"""

import os
import time
from pathlib import Path

from ssl_attention.warehouse.atomic import PartitionWriter

PAUSE_DIR = os.environ.get("SSL_ATTENTION_TEST_PAUSE_DIR")
WAIT_S = 120.0

if PAUSE_DIR:
    control = Path(PAUSE_DIR)
    _commit = PartitionWriter.commit

    def _paused_commit(self: PartitionWriter) -> object:
        if "attention_maps" in self.directory.parts and (control / "armed").is_file():
            (control / f"paused-{os.getpid()}").write_text(str(self.directory))
            deadline = time.monotonic() + WAIT_S
            while not (control / "release").is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
        return _commit(self)

    PartitionWriter.commit = _paused_commit  # type: ignore[method-assign]
