"""Which region names Fractal accepts where they enter (an image's key): one rule, read from the settings.

A region name ends up in cloud calls (an EC2 endpoint per region), so a malformed one must be refused when an
operator types it, not discovered by the scaler later.
"""

from __future__ import annotations

import re

from fractal.config import CloudKind, Settings

# Any region name Fractal can store: what the images.region column holds, in a form safe in URLs and labels.
REGION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# AWS's region form: area, optional partition words, direction, number (us-east-1, ap-southeast-2, us-gov-west-1).
AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")


def region_problem(region: str, settings: Settings) -> str | None:
    """Why ``region`` may not hold an image under these settings, or None when it may."""
    if not REGION_NAME.fullmatch(region):
        return "must be 1-64 lowercase letters, digits or dashes, starting with a letter or digit"
    if settings.regions:
        if region not in settings.regions:
            return f"is not one of FRACTAL_REGIONS ({', '.join(settings.regions)})"
        return None
    if settings.cloud is CloudKind.AWS and not AWS_REGION.fullmatch(region):
        return "is not an AWS region name (such as us-east-1); set FRACTAL_REGIONS to allow others"
    return None
