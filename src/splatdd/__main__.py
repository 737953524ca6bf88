"""``python -m splatdd`` (and ``torchrun ... -m splatdd``): the command line."""
import sys

from splatdd.cli import main

sys.exit(main())
