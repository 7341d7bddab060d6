"""gunicorn settings for `gunicorn arbstr:app` run from this directory (gunicorn reads ./gunicorn.conf.py).

The same settings as `gunicorn -c python:arbstr_core.gunicorn_conf arbstr:app`, which works from any
directory; see arbstr_core/gunicorn_conf.py.
"""

from arbstr_core.gunicorn_conf import *
