"""Serve the public and admin APIs in this process on 127.0.0.1 (a free port, printed first) for replica tests.

Configured from the environment like any deployment; the test that starts it stops it by pid.
"""

from __future__ import annotations

from werkzeug.serving import make_server

from fractal.blueprints import ADMIN_BLUEPRINTS, PUBLIC_BLUEPRINTS
from fractal.factory import create_app


def main() -> None:
    app = create_app(blueprints=[*PUBLIC_BLUEPRINTS, *ADMIN_BLUEPRINTS])
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
