"""Cloud providers behind one Protocol: ``aws`` (EC2 via boto3) and ``local`` (a simulated fleet)."""

from __future__ import annotations

from fractal.cloud.base import CloudProvider
from fractal.config import CloudKind, Settings


def build_cloud_provider(settings: Settings) -> CloudProvider:
    """The provider FRACTAL_CLOUD names. Nothing connects here: EC2 clients are built on first call."""
    if settings.cloud is CloudKind.AWS:
        from fractal.cloud.ec2 import Ec2Cloud

        return Ec2Cloud(settings)
    from fractal.cloud.local import LocalCloud

    return LocalCloud(settings)
