"""tomdistill: transfer strategic theory of mind from a large language model to a small one."""
from pathlib import Path

__version__ = "0.1.0"

# The repository root (holds conf/); the package is used from a source checkout.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
CATALOGUE_DIR = CONF_DIR / "scenarios" / "catalogue"
