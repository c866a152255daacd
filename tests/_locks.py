"A run folder held by another live process, as the lock tests of erase, lora and multi need it."
import json
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from ant_nb.base.files import LOCK_FILE


@contextmanager
def held_by_another_process(folder: Path):
    "Write `folder`'s lock in the name of a live process of this host (a `sleep`); yield its pid; then end it (stale lock)."
    folder.mkdir(parents=True, exist_ok=True)
    other = subprocess.Popen(["sleep", "30"])
    try:
        (folder / LOCK_FILE).write_text(json.dumps(dict(pid=other.pid, host=socket.gethostname(), since="now")))
        yield other.pid
    finally:
        other.kill()
        other.wait()
