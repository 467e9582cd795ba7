"""Serving J-Moshi to browsers and clients, whatever the backend (see `backends`).

- `serve`: `jmoshi serve`, from preflight to a running server child;
- `child` and `lifetime`: the one process supervisor, and children that die with jmoshi;
- `replicas` and `haproxy`: many conversations at once behind one HAProxy front with a fair queue;
  `front`: that front over servers on other machines (`jmoshi front`);
- `server_log`: what a person should see of a server's output;
- `chat` and `opus`: a client of the /api/chat websocket (selftest, benchmarks, tests);
- `tls`: the self-signed certificate for `--https`.

Kept light: `python -m jmoshi_cli.serving.lifetime` imports this package before each child.
"""
