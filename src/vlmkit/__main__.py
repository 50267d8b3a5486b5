"""``python -m vlmkit`` runs the command line."""

import sys

from vlmkit.cli import main

sys.exit(main())
