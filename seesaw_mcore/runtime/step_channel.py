"""Moving step messages and sampled tokens between ranks as tensors (``step_codec.py``).

Rank 0 broadcasts each step as one uint8 tensor (an 8-byte length, then the msgpack message)
of a capacity every rank knows (one collective per step; a message that outgrows it
announces the new capacity first). A replica's
last stage sends its sampled tokens to rank 0 as one float64 tensor whose shape rank 0 knows
from the step. A world of one rank moves nothing. Both are host tensors on a gloo group
(``groups.host_group()``): on GPUs nothing is copied to the device and read back per step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seesaw_mcore.contract import RunnerOutput, ScheduledSeq, StepMessage
from seesaw_mcore.runtime.step_codec import (
    SeqMirror,
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
    """Rank 0 -> every rank: one step message per ``send`` / ``recv``, through this rank's
    ``SeqMirror`` (what every rank knows of the sequences in flight).

    Args:
        group: a gloo group of the world (``None``: the default group, gloo on CPU ranks).
        capacity: bytes broadcast per step; grows (on every rank) when a message needs it.
    """

    def __init__(self, group=None, capacity: int = 1 << 15) -> None:
        self.group, self.capacity = group, capacity
        self.mirror = SeqMirror()
        self.mirror.active = dist.get_world_size() > 1

    def send(self, msg: StepMessage) -> None:
        """Rank 0: broadcasts ``msg``."""
        if not self.mirror.active:
            return
        data = encode_step(msg, self.mirror)
        n = len(data)
        if n + 8 > self.capacity:  # announce the larger capacity, then send
            grown = 1 << (n + 8).bit_length()
            self._broadcast(_header(-grown))
            self.capacity = grown
        buf = torch.empty(self.capacity, dtype=torch.uint8)
        buf[:8] = _header(n)
        buf[8:n + 8] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._broadcast(buf)

    def recv(self) -> StepMessage:
        """Other ranks: the next message rank 0 sent."""
        while True:
            buf = self._broadcast(torch.empty(self.capacity, dtype=torch.uint8))
            n = int(buf[:8].view(torch.int64))
            if n >= 0:
                return decode_step(buf[8:n + 8].numpy().tobytes(), self.mirror)
            self.capacity = -n

    def _broadcast(self, host: torch.Tensor) -> torch.Tensor:
        if host.numel() < self.capacity:
            host = torch.cat([host, host.new_zeros(self.capacity - host.numel())])
        dist.broadcast(host, src=0, group=self.group)
        return host


def _header(n: int) -> torch.Tensor:
    """A message's length (or, negative, the next capacity) as 8 bytes."""
    return torch.tensor([n], dtype=torch.int64).view(torch.uint8)


def send_tokens(out: RunnerOutput, seqs: list[ScheduledSeq], dst: int, group=None,
                routes: bool = False) -> None:
    """A replica's last stage: its step's sampled tokens to ``dst`` (host tensors over the
    gloo ``group``), and (``routes``) the routed experts of the tokens it fed."""
    arr = encode_tokens(out.tokens, token_width(seqs))
    dist.send(torch.from_numpy(arr), dst=dst, group=group)
    if prompt_shape(seqs)[0]:  # prompt logprobs: a second array, its shape known to both
        dist.send(torch.from_numpy(encode_prompt_rows(out.tokens, seqs)), dst=dst, group=group)
    if routes:  # int16 [fed tokens, MoE layers, top_k] of every sequence, in order
        data = np.frombuffer(b"".join(t.routed for t in out.tokens), dtype=np.int16)
        dist.send(torch.from_numpy(data.copy()), dst=dst, group=group)


def recv_tokens(seqs: list[ScheduledSeq], src: int, group=None,
                routes: tuple[int, int] | None = None) -> RunnerOutput:
    """Rank 0: the tokens replica rank ``src`` sampled for ``seqs`` (and, with ``routes``
    ``(MoE layers, top_k)``, the routed experts of the tokens it fed)."""
    buf = torch.empty(len(seqs), token_width(seqs), dtype=torch.float64)
    dist.recv(buf, src=src, group=group)
    tokens = decode_tokens(buf.numpy(), seqs)
    rows, width = prompt_shape(seqs)
    if rows:
        buf = torch.empty(rows, width, dtype=torch.float64)
        dist.recv(buf, src=src, group=group)
        decode_prompt_rows(buf.numpy(), seqs, tokens)
    if routes is not None:
        per_token = routes[0] * routes[1] * 2  # bytes per fed token
        buf = torch.empty(sum(len(s.token_ids) for s in seqs) * per_token // 2,
                          dtype=torch.int16)
        dist.recv(buf, src=src, group=group)
        data, start = buf.numpy().tobytes(), 0
        for s, t in zip(seqs, tokens):
            t.routed = data[start:start + len(s.token_ids) * per_token]
            start += len(s.token_ids) * per_token
    return RunnerOutput(tokens)
