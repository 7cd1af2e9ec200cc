"""``python -m moverd``: the moverd command (the CLI layer, :mod:`moverd_cli`).

The one module of the engine package that reaches the layer above it: the program's entry, not
part of the engine (the import contracts name this exception).
"""

from moverd_cli import main

main()
