"""Configuration: `load_config()` returns the one validated, frozen `Config`."""

from appliance.config.load import config_path, load_config
from appliance.config.model import PROGRAMS, Config, Program
from appliance.config.redact import redacted, scrub

__all__ = ["PROGRAMS", "Config", "Program", "config_path", "load_config", "redacted", "scrub"]
