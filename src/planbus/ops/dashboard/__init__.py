"""The operator's dashboard, `python -m planbus dashboard`: one live page over the database.

`server.py` checks where it may listen and runs uvicorn; `web.py` is the Starlette app (the
page, its event stream, the Retry and Cancel actions) behind `guard.py` (loopback names, the
token, cross-site refusals); `feed.py` reads the database once per refresh for every open page
(`queries.py`) and renders the sections once (`templates/`, autoescaped). Only this folder
imports Starlette, uvicorn and Jinja2 (the optional `dashboard` extra), and only
`ops.dashboard_command` imports this folder, when the command runs: the worker never loads any
of them.
"""
