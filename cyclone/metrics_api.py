"""Former name of `cyclone.plugin_api`, kept so plugins written against it keep working."""

from cyclone.plugin_api import *  # noqa: F403
from cyclone.plugin_api import __all__ as __all__
