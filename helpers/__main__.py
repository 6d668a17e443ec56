"""``python -m helpers run config.toml``: the headless pipeline (see :mod:`helpers.runner`)."""
import sys

from .runner import main

sys.exit(main())
