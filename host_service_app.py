"""Host-service API (WSGI module): handshake, heartbeats, mandelbox reports."""

from fractal.blueprints import API_TITLES, HOST_BLUEPRINTS
from fractal.factory import create_app

app = create_app(blueprints=HOST_BLUEPRINTS, title=API_TITLES["host"])
