"""Long-running logic that needs no Prefect: what :mod:`flows` schedules and the dashboard shows.

- :mod:`pipeline.service.incoming`: the exactly-once incoming-folder watcher (discovery of
  complete scans, ``O_EXCL`` claims, one look and the processing of what it claimed), with its
  record in :mod:`pipeline.service.watchstate`;
- :mod:`pipeline.service.process`: the decisions of a ``process_scan`` run (parameters, paths,
  what is reused, which model source) as plain stage functions;
- :mod:`pipeline.service.runstate`: the per-scan ``studios-run.json`` and the reporter that
  mirrors progress into it;
- :mod:`pipeline.service.scans`: what the dashboard shows, read from the files runs leave;
- :mod:`pipeline.service.summary`: the markdown text of run and watcher summaries.
"""
