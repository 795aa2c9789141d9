from .chain import VerifyResult as VerifyResult
from .extension import SideLog as SideLog
from .writer import SideLogWriteError as SideLogWriteError
