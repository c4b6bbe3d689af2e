"""``python -m icl_core.book``: see :mod:`icl_core.book.cli`."""
import sys

from .cli import main

sys.exit(main())
