from .extension import SideLog as SideLog
from .writer import SideLogWriteError as SideLogWriteError
