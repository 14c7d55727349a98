"""Studies: many recordings and analyses as Dask tasks, results as a Parquet dataset.

A study (``trace-study STUDY.toml``, or the built-in ``trace-study thesis``) names workloads,
their parameters and repeats, and the analyses to run on every trace. Each run is two tasks on
a ``dask.distributed`` cluster (a ``LocalCluster`` sized to the machine by default, any
existing cluster with ``--scheduler``): the recording (``trace-record`` in a subprocess of the
worker) and the analysis of its trace (one ``trace-analyze --format json``, all the study's
analyses in one replay). The client gathers every analysis and writes one Parquet dataset.

One module per job:

- ``studyfile``: the study file (TOML), checked against trace-record's and trace-analyze's own
  options, expanded into runs;
- ``runkeys``: what identifies a run (its inputs), so that a finished one is recognised and
  skipped when the study is run again;
- ``guard``: a supervisor between a worker and its command, so that a dying worker, a
  cancelled study or Ctrl-C leaves no QEMU behind;
- ``tasks``: what runs on the workers (prepare, record, analyze, stop);
- ``cluster``: the embedded ``LocalCluster`` (one guest per core, memory-aware) or a
  connection to an existing scheduler;
- ``runner``: the study's tasks, resumption, failures, progress and interruption;
- ``dataset``: trace-analyze's JSON reports as Parquet tables (runs, long series, tables);
- ``thesis`` and ``report``: the thesis's evaluation (Tables 5.1-5.3) as a built-in study and
  its Markdown report with figures;
- ``cli``: the ``trace-study`` command.
"""
