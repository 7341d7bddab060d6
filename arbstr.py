"""`gunicorn arbstr:app` entry point. The app is built when gunicorn loads it in each worker
(``preload_app`` stays off), reading ``ARBSTR_CONFIG`` or ``ARBSTR_MOCK``."""

from arbstr_core.app.factory import create_app

app = create_app()
