"""Recording conversations for research (`serve --record DIR`, `jmoshi recordings`).

- `format`: the folder and files on disk, shared by both sides;
- `tap`: inside the server child, the listener that follows each conversation (`Recorder`);
- `writer`: the thread per conversation that writes its files, off the event loop;
- `store`: what jmoshi does with the folders: check, list, settle those whose server died.

jmoshi itself uses the store through this module; the child imports `tap` directly.
"""

from __future__ import annotations

from .format import ALIGNMENT, FORMAT, Ended
from .store import Session, check_dir, list_sessions, read_session, settle

__all__ = ["ALIGNMENT", "FORMAT", "Ended", "Session", "check_dir", "list_sessions", "read_session", "settle"]
