"""What every spawned test worker of a gloo process group does around its work.

    def _worker(rank, ...):            # the function mp.spawn runs
        with gloo_group(rank, world_size, rendezvous):
            ...                        # the work; results written to files

On success the worker waits for its peers (so no rank tears gloo down while another is still in a
collective), destroys the group and then leaves with os._exit(0), skipping the interpreter's
finalisation. A TP worker has died there, rarely, with "terminate called without an active
exception" (SIGABRT; twice in CI in about a dozen full runs, never in 22 runs of that test alone),
after its results were written: at finalisation a gloo thread that releases a tensor needs a GIL
that is gone (pretrain collects such cycles before and after destroying its group for the same
reason; pytorch/pytorch PR 179291 describes the crash). A test worker's locals still hold models
and DTensors when the group is destroyed, so it skips finalisation instead. faulthandler prints
every thread's Python stack if a worker still dies of a signal. On an error, the group is destroyed
and the exception propagates, so mp.spawn reports the worker's traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, rendezvous: str, timeout_s: float = 300) -> Iterator[None]:
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)  # a failing peer ends the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
