"""``python -m maskrcnn`` is the ``maskrcnn`` command (torchrun needs the module form)."""

from maskrcnn.cli.main import run

run()
