"""gunicorn settings for `gunicorn arbstr:app` (picked up from the working directory).

The bind address comes from the arbstr config (`[server] listen`); `--bind` on the command line
still wins. See arbstr_core/server.py for why each setting is what it is. A bad config stops the
master here, with the message that names the file, the key and the fix.
"""

import sys

from arbstr_core.errors import ConfigError
from arbstr_core.server import settings
from arbstr_core.web import load_config

try:
    globals().update(settings(load_config()))
except ConfigError as e:
    sys.exit(f"arbstr: config error: {e}")
