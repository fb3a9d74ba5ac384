"""``python -m kdet``: the kdet command, also as torchrun starts it (``torchrun ... -m kdet train CONFIG``)."""
import sys

from .cli import main

sys.exit(main())
