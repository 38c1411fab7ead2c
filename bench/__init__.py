"""The gateway's benchmark harnesses (run.py, ws.py, failover.py) and their shared code, the
``bench.lib`` package: the scripts import it as ``lib`` (their own directory is on sys.path),
the tests as ``bench.lib`` (the repository root is)."""
