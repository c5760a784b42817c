"""api: the FastAPI shell (``create_app`` in ``api.app``) and the web page in ``api/web``. Imports medsearch only."""
