"""Registry of the working-state backends the acceptance suite runs against.

``BACKENDS`` maps a backend name to a factory ``f(tmp_path) -> StateBackend``.
A backend is registered only when it exists in this build of ``statecore``:
the LMDB tier is left out when ``statecore.LMDBStateBackend`` is missing or its
constructor raises ``NotImplementedError``. Any other constructor failure keeps
it registered, so the lmdb tests fail loudly instead of silently disappearing.
"""

import os
import shutil
import tempfile

import statecore

BACKENDS = {"hashmap": lambda tmp_path: statecore.HashMapStateBackend()}


def _lmdb_backend(tmp_path):
    # write_buffer_size=4 KiB keeps the C write buffer tiny so tests spill constantly.
    return statecore.LMDBStateBackend(db_path=str(tmp_path / "db"), write_buffer_size=4096)


def _lmdb_exists():
    cls = getattr(statecore, "LMDBStateBackend", None)
    if cls is None:
        return False
    probe = tempfile.mkdtemp(prefix="statecore-probe-")
    try:
        cls(db_path=os.path.join(probe, "db"), write_buffer_size=4096)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - a broken backend must show up as failing tests
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return True


if _lmdb_exists():
    BACKENDS["lmdb"] = _lmdb_backend
