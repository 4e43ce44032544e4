"""A receiver in its own process, for crash tests: ``python -m tests.support.receiver_main SETTINGS_JSON PORT_FILE``.

Writes the bound port to PORT_FILE once listening, then serves until killed (SIGKILL in the tests).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from triaged.config import load_settings
from triaged.db.engine import make_engine, make_session_factory
from triaged.log import configure_logging
from triaged.receive.scp import Receiver
from triaged.receive.storage import InstanceStore


def main(argv: list[str]) -> int:
    overrides = json.loads(argv[0])
    port_file = Path(argv[1])
    settings = load_settings(None, **overrides)
    configure_logging("warning", "json")
    engine = make_engine(settings.database_url)
    store = InstanceStore(settings.storage_dir, settings.storage.min_free_bytes)
    receiver = Receiver(settings, make_session_factory(engine), store, port=0, receiver_id="crash-test")
    receiver.start()
    temp = port_file.with_suffix(".tmp")
    temp.write_text(str(receiver.port))
    temp.rename(port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
