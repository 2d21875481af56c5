"""Moving step messages and sampled tokens between ranks as tensors (``step_codec.py``).

Rank 0 broadcasts each step as one int64 tensor of a capacity every rank knows (one
collective per step; a message that outgrows it announces the new capacity first). A replica's
last stage sends its sampled tokens to rank 0 as one float64 tensor whose shape rank 0 knows
from the step. A world of one rank moves nothing. Both are host tensors on a gloo group
(``groups.host_group()``): on GPUs nothing is copied to the device and read back per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seesaw_mcore.contract import RunnerOutput, ScheduledSeq, StepMessage
from seesaw_mcore.runtime.step_codec import (
    decode_prompt_rows,
    decode_step,
    decode_tokens,
    encode_prompt_rows,
    encode_step,
    encode_tokens,
    prompt_shape,
    token_width,
)


class StepChannel:
    """Rank 0 -> every rank: one step message per ``send`` / ``recv``.

    Args:
        group: a gloo group of the world (``None``: the default group, gloo on CPU ranks).
        capacity: int64 slots broadcast per step; grows (on every rank) when a message needs it.
    """

    def __init__(self, group=None, capacity: int = 4096) -> None:
        self.group, self.capacity = group, capacity

    def send(self, msg: StepMessage) -> None:
        """Rank 0: broadcasts ``msg``."""
        arr = encode_step(msg)
        if dist.get_world_size() == 1:
            return
        n = len(arr)
        if n + 1 > self.capacity:  # announce the larger capacity, then send
            grown = 1 << n.bit_length()
            self._broadcast(torch.tensor([-grown], dtype=torch.int64))
            self.capacity = grown
        buf = torch.empty(self.capacity, dtype=torch.int64)
        buf[0] = n
        buf[1:n + 1] = torch.from_numpy(arr)
        self._broadcast(buf)

    def recv(self) -> StepMessage:
        """Other ranks: the next message rank 0 sent."""
        while True:
            buf = self._broadcast(torch.empty(self.capacity, dtype=torch.int64))
            n = int(buf[0])
            if n >= 0:
                return decode_step(buf[1:n + 1].numpy())
            self.capacity = -n

    def _broadcast(self, host: torch.Tensor) -> torch.Tensor:
        if host.numel() < self.capacity:
            host = torch.cat([host, host.new_zeros(self.capacity - host.numel())])
        dist.broadcast(host, src=0, group=self.group)
        return host


def send_tokens(out: RunnerOutput, seqs: list[ScheduledSeq], dst: int, group=None) -> None:
    """A replica's last stage: its step's sampled tokens to ``dst`` (host tensors over the
    gloo ``group``)."""
    arr = encode_tokens(out.tokens, token_width(seqs))
    dist.send(torch.from_numpy(arr), dst=dst, group=group)
    if prompt_shape(seqs)[0]:  # prompt logprobs: a second array, its shape known to both
        dist.send(torch.from_numpy(encode_prompt_rows(out.tokens, seqs)), dst=dst, group=group)


def recv_tokens(seqs: list[ScheduledSeq], src: int, group=None) -> RunnerOutput:
    """Rank 0: the tokens replica rank ``src`` sampled for ``seqs``."""
    buf = torch.empty(len(seqs), token_width(seqs), dtype=torch.float64)
    dist.recv(buf, src=src, group=group)
    tokens = decode_tokens(buf.numpy(), seqs)
    rows, width = prompt_shape(seqs)
    if rows:
        buf = torch.empty(rows, width, dtype=torch.float64)
        dist.recv(buf, src=src, group=group)
        decode_prompt_rows(buf.numpy(), seqs, tokens)
    return RunnerOutput(tokens)
