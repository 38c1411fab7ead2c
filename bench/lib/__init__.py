"""What the benchmark harnesses share (see bench/README.md, "Layout"):

- ``process``: starting processes in their own session, pinning them to CPUs, their CPU time,
  memory and files from /proc, waiting for readiness, free ports, stopping, Ctrl-C;
- ``tools``: paths (the repo's .venv), finding and apt-get installing nginx and wrk, versions;
- ``servers``: nginx and gateway command lines, config checks, a work directory, the servers
  of one bench (``Stack``), asking them over HTTP and reading /metrics and their logs;
- ``load``: wrk, pyloadgen and wsclient command lines and the parsers of their output;
- ``report``: medians, paired ratios, formats, verdicts, tables, the JSON results file.

Modules import each other relatively, so the package works as ``lib`` (the scripts in bench/)
and as ``bench.lib`` (the tests).
"""
