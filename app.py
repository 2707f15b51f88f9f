"""Public API (WSGI module): regions, assign, mandelbox lookups."""

from fractal.blueprints import PUBLIC_BLUEPRINTS
from fractal.factory import create_app

app = create_app(blueprints=PUBLIC_BLUEPRINTS, title="Fractal public API")
