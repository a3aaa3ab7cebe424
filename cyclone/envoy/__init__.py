"""Envoy in front of Cyclone: generated bootstrap and file-based xDS, driven by `EnvoyProxy`."""

from cyclone.envoy.config import EnvoySettings
from cyclone.envoy.files import EnvoyConfigError, envoy_binary
from cyclone.envoy.proxy import EnvoyProxy
from cyclone.wire import MODEL_HEADER

__all__ = ["MODEL_HEADER", "EnvoyConfigError", "EnvoyProxy", "EnvoySettings", "envoy_binary"]
