from .chain import VerifyResult as VerifyResult
from .extension import SideLog as SideLog
from .spool import ReplayResult as ReplayResult
from .writer import SideLogWriteError as SideLogWriteError
