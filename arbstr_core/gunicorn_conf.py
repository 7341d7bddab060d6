"""gunicorn settings, importable from the installed package so one command works from any directory:

    gunicorn -c python:arbstr_core.gunicorn_conf arbstr:app

Without ``-c``, gunicorn only reads ./gunicorn.conf.py, and elsewhere falls back to its ``sync`` worker
(one request at a time). The bind address comes from the arbstr config (``[server] listen``);
``--bind`` on the command line still wins. See arbstr_core/server.py for why each setting is what it
is. A bad config stops the master here, with the message that names the file, the key and the fix.
"""

from __future__ import annotations

import sys

from .app.factory import load_config
from .app.server import settings
from .errors import ConfigError

try:
    _settings = settings(load_config())
except ConfigError as e:
    sys.exit(f"arbstr: config error: {e}")

# gunicorn reads every module-level name that is a setting; __all__ lets gunicorn.conf.py re-export them.
globals().update(_settings)
__all__ = list(_settings)
