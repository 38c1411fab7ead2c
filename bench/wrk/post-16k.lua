-- bench/run.py's `post16k` shape: every request is a POST with a 16 KiB body (wrk adds its
-- Content-Length). Below the gateway's REPLAY_LIMIT (64 KiB): it reads the body whole, then
-- sends it upstream.
wrk.method = "POST"
wrk.body = string.rep("x", 16 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
