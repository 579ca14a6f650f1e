"""``python -m maskrcnn`` is the ``maskrcnn`` command (torchrun needs the module form)."""

from maskrcnn.cli import run

run()
