"""The operator's tools: `python -m planbus …`, the embedded server, migrate, /metrics's server.

Commands and their argument parsing, console rendering, the client side of a request (insert,
wait, show), the demo, the embedded PostgreSQL, the metrics HTTP server and the operators' SQL
(`admin_queries`). Modules here may import anything in planbus; nothing outside `ops` (but the
entry point and `planbus.runtime`, which builds a worker) imports them.
"""
