"""Everything that differs between one process and many, by subject: `distributed` (the process group, its
collectives, shards, the stop agreement), `signals`, `threads`, `seeding`, `precision` (shared with inference)
and `parallel` (SyncBatchNorm, DDP, torch.compile, no_sync); `core` puts them into the one `Runtime` a run
holds. Its public names are re-exported here."""

from brain_trainer.runtime.core import Runtime
from brain_trainer.runtime.distributed import LOST_CONTACT_WORDS, LaunchError, ProcessGroup, process_group_env
from brain_trainer.runtime.signals import STOP_SIGNALS, StopFlag

__all__ = [
    "LOST_CONTACT_WORDS",
    "STOP_SIGNALS",
    "LaunchError",
    "ProcessGroup",
    "Runtime",
    "StopFlag",
    "process_group_env",
]
