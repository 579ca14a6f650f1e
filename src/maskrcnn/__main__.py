"""``python -m maskrcnn`` is the ``maskrcnn`` command (torchrun needs the module form)."""

import sys

from maskrcnn.cli import main

sys.exit(main())
