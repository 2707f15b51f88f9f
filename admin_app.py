"""Admin API (WSGI module): images, instances, capacity, scaling, events."""

from fractal.blueprints import ADMIN_BLUEPRINTS, API_TITLES
from fractal.factory import create_app

app = create_app(blueprints=ADMIN_BLUEPRINTS, title=API_TITLES["admin"])
