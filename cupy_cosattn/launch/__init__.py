"""The launch layer (DESIGN.md section 3), one concern per module."""
from .arrays import *  # noqa: F401,F403
from .arrays import _bits_dtype, _dtype_name  # noqa: F401
from .backend import *  # noqa: F401,F403
from .limits import *  # noqa: F401,F403
from .params import *  # noqa: F401,F403
from .registry import *  # noqa: F401,F403
from .registry import _name, _names  # noqa: F401
from .sources import *  # noqa: F401,F403
from .tiles import *  # noqa: F401,F403
