"""gunicorn settings for `gunicorn arbstr:app` (picked up from the working directory).

The bind address comes from the arbstr config (`[server] listen`); `--bind` on the command line
still wins. See arbstr_core/server.py for why each setting is what it is.
"""

from arbstr_core.server import settings
from arbstr_core.web import load_config

globals().update(settings(load_config()))
