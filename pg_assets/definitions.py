"""The code location: every asset, resource and schedule built from the config file.

The file comes from `$PG_ASSETS_CONFIG` (default: the demo config shipped with the package).
"""

from pg_assets.build import build_definitions
from pg_assets.config import load_config

defs = build_definitions(load_config())
