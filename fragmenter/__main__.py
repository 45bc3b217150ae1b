import sys

from .cli import main_fragment

sys.exit(main_fragment())
