"""The ``maskrcnn`` command: ``main.py`` builds the parser and turns errors into exit codes;
one module per group of subcommands. Nothing here imports torch before the subcommand is
known, so that ``maskrcnn --help`` answers at once."""
