"""The ``routes.yaml`` contract: its types (the schema), validation with YAML paths and lines,
``${VAR}`` substitution, the JSON Schema export, and ``load_config``.

Owns: what a valid config is. May import: the standard library, PyYAML and its own modules;
no other room of the gateway (everything else reads configs; configs read nothing).
"""

from .load import ConfigError, config_json_schema, digest, load_config, parse_config
from .types import (
    DEFAULT_EJECTION,
    DEFAULT_HEALTH,
    DEFAULT_LIMITS,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUTS,
    NONE,
    Config,
    RateLimit,
    RedisSettings,
    Service,
    service_settings,
)

__all__ = [
    "DEFAULT_EJECTION",
    "DEFAULT_HEALTH",
    "DEFAULT_LIMITS",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUTS",
    "NONE",
    "Config",
    "ConfigError",
    "RateLimit",
    "RedisSettings",
    "Service",
    "config_json_schema",
    "digest",
    "load_config",
    "parse_config",
    "service_settings",
]
