-- bench/run.py's `post1m` shape: every request is a POST with a 1 MiB body (wrk adds its
-- Content-Length). Above the gateway's REPLAY_LIMIT (64 KiB): it streams the body upstream as
-- it arrives.
wrk.method = "POST"
wrk.body = string.rep("x", 1024 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
