from .cli import main_fragment
from .quick_exit import quick_exit

quick_exit(main_fragment())
