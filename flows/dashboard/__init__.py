"""The monitoring dashboard (``studios dashboard``): the FastAPI app :mod:`flows.dashboard.app` and
its Jinja2 ``templates/``. Importing it never imports Prefect."""
