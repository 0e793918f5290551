"""``python -m arlm``: the ``arlm`` command."""

import sys

from arlm.cli import main

sys.exit(main())
