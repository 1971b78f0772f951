"""``python -m idlm.cli``."""

import sys

from . import main

sys.exit(main())
