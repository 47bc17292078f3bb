"""edgecl: on-device continual learning for edge fleets."""

__version__ = "0.1.0"
