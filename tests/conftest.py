import os
import sys
from pathlib import Path

# tests/ helpers (multirank, oracle) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
