"""One code path for a single process, torchrun on one node, and many nodes.

Rank, local rank and world size come from the environment torchrun (or SLURM through run.sh)
sets; with no RANK in the environment this is a single process. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from simmim.core.errors import ConfigError

_HOST_GROUP = None  # gloo group for host-side agreement when the default group is NCCL (None: the default)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerLost(RuntimeError):
    """A collective failed because another rank went away (killed, out of memory, a node lost):
    not a bug of this process; the message says where the run can resume."""


# how a collective fails when its peer is gone: gloo's TCP pairs, NCCL's abort / remote-error
# reports, the TCP store. Anything else that fails in a collective is a bug and keeps its traceback.
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote process exited|ncclRemoteError|"
                       r"NCCL communicator was aborted|failed to recv, got 0 bytes|Connection refused")


def peer_gone(message: str) -> str | None:
    """"the rank at HOST" (or "another rank" when the message names no address) if `message`, a
    collective's error, says that its peer went away; else None."""
    if not PEER_GONE.search(message):
        return None
    addr = re.search(r"\[([^\]\s]+)\]:\d+", message)
    return f"the rank at {addr.group(1)}" if addr else "another rank"


def peer_lost(e: BaseException) -> str | None:
    """`peer_gone` of a RuntimeError raised with a process group of several ranks; else None."""
    if not (isinstance(e, RuntimeError) and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return peer_gone(str(e))


DEVICES = ("auto", "cpu", "cuda")  # train.device


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device of `train.device` (auto: CUDA when visible); ConfigError for cuda without one."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(preference: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun may hand every restart the same store: keep each attempt's keys apart, or a
        # restarted group reads the dead ranks' addresses and fails to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"simmim/attempt{attempt}", store),
                                rank=rank, world_size=world_size, device_id=device if device.type == "cuda" else None)
        global _HOST_GROUP
        _HOST_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else None
    return DistInfo(rank, local_rank, world_size, device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest `value` over ranks (a host sync)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true if it is true on any rank (one all-reduce, a host sync; without a process
    group, no device work at all)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def host_any(flag: bool) -> bool:
    """True if `flag` is true on any rank: one all-reduce of a CPU tensor over gloo (a side group
    when the default is NCCL), so the device is not synchronised; 182 us a call measured with 2 gloo
    processes on a loaded 2-core CPU machine (not measured across nodes). Every rank must call it at
    the same point."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(t.item())


def first_reported(message: str | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank whose `message` is not None, seen by every rank (an
    all-gather of small objects over gloo; for the rare path after `host_any` said one failed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None if message is None else (0, message)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, message, group=_HOST_GROUP)
    return next(((r, m) for r, m in enumerate(every) if m is not None), None)


def all_gather(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, seen by every rank (gloo); [obj] in
    one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj, group=_HOST_GROUP)
    return every


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    global _HOST_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the host group too
    _HOST_GROUP = None
