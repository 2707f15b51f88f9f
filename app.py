"""Public API (WSGI module): regions, assign, mandelbox lookups."""

from fractal.blueprints import API_TITLES, PUBLIC_BLUEPRINTS
from fractal.factory import create_app

app = create_app(blueprints=PUBLIC_BLUEPRINTS, title=API_TITLES["public"])
