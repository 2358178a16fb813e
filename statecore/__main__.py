"""``python -m statecore``: the ``statecore`` command."""
import sys

from statecore.cli import main

sys.exit(main())
