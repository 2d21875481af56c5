"""Which LoRA adapter sits at which index (``1..max_loras``), decided the same way on every
rank: each rank reads the adapter folders itself (like the model's) and the same requests
in the same order give the same indices, so nothing but the index travels with a step."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.config.sections import LoRAConfig
from seesaw_mcore.contract import Control, ControlKind
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.lora import LoRAAdapter, LoRARequest, load_adapter, updated

LORA_CONTROLS = (ControlKind.LOAD_LORA, ControlKind.UNLOAD_LORA)


class AdaptersBusy(SeesawError):
    """Every adapter index holds an adapter that sequences in flight run under: a new one
    waits for one of them to finish."""


@dataclass(frozen=True)
class Resident:
    """A loaded adapter: its index, where it came from, and its prefix-cache key."""

    index: int
    request: LoRARequest
    key: str
    adapter: LoRAAdapter


class Adapters:
    """The adapters loaded on this rank, least recently used first.

    Args:
        cfg: the model (adapters are checked against it).
        lora: ``max_loras`` and ``max_lora_rank``.
        put: loads an adapter at an index on this rank (``None``: unloads it).
        broadcast: rank 0: sends a ``Control`` to every rank and runs it here too.
    """

    def __init__(self, cfg: ModelConfig, lora: LoRAConfig,
                 put: Callable[[int, LoRAAdapter | None], None],
                 broadcast: Callable[[Control], None] | None = None) -> None:
        self.cfg, self.max_loras, self.max_rank, self._put = cfg, lora.max_loras, \
            lora.max_lora_rank, put
        self._broadcast = broadcast
        self._checked: set[LoRARequest] = set()
        self.resident: OrderedDict[int, Resident] = OrderedDict()  # by lora_int_id
        self._loads = 0  # every load gets a new cache key (a reloaded id's KV differs)

    def use(self, request: LoRARequest, in_flight: Iterable[int]) -> Resident:
        """Rank 0, between steps: ``request``'s adapter, loaded on every rank first (a
        ``LOAD_LORA`` control) unless it is resident, evicting the least recently used one
        that no sequence in flight (their adapter ``in_flight`` indices) runs under."""
        res = self.resident.get(request.lora_int_id)
        if res is None or res.request != request:
            busy = self.busy(in_flight)
            if len(set(busy) | {request.lora_int_id}) > self.max_loras:
                raise AdaptersBusy(f"LoRA adapter {request.lora_name!r} waits: max_loras "
                                   f"{self.max_loras} adapters are in use")
            args = {**dataclasses.asdict(request), "busy": busy}
            self._broadcast(Control(ControlKind.LOAD_LORA, json.dumps(args)))
        else:
            self.resident.move_to_end(request.lora_int_id)
        return self.of(request)

    def on_control(self, msg: Control, is_driver: bool) -> None:
        """Every rank: a LoRA control. A bad adapter is rank 0's error to report (checked
        alike on every rank, nothing loaded): the other ranks go on."""
        args = json.loads(msg.args)
        try:
            if msg.kind == ControlKind.LOAD_LORA:
                busy = args.pop("busy")
                self.prepare([LoRARequest(**args)], busy)
            else:
                self.remove(args["lora_int_id"])
        except SeesawError:
            if is_driver:
                raise

    def busy(self, indices: Iterable[int]) -> list[int]:
        """The adapter ids at ``indices`` (those of sequences in flight)."""
        at = {r.index: i for i, r in self.resident.items()}
        return sorted({at[x] for x in indices if x in at})

    def check_remove(self, lora_id: int, busy: Iterable[int] = ()) -> None:
        """Raises unless ``lora_id`` is loaded and no sequence in flight uses it."""
        if lora_id not in self.resident:
            raise SeesawError(f"no LoRA adapter with lora_int_id {lora_id} is loaded")
        if lora_id in set(busy):
            raise SeesawError(f"LoRA adapter {self.resident[lora_id].request.lora_name!r} is "
                              "in use by requests in flight")

    def remove(self, lora_id: int) -> None:
        """Unloads adapter ``lora_id`` (``check_remove`` first)."""
        self.check_remove(lora_id)
        self._put(self.resident.pop(lora_id).index, None)

    def check(self, requests: Iterable[LoRARequest | None]) -> None:
        """Reads and checks every adapter of ``requests`` not resident (each once: a
        checked one is remembered by its request)."""
        for r in requests:
            if r is None or r in self._checked:
                continue
            if not isinstance(r, LoRARequest):
                raise SeesawError(f"lora_request must be a LoRARequest or None, got "
                                  f"{type(r).__name__}")
            res = self.resident.get(r.lora_int_id)
            if res is None or res.request != r:
                load_adapter(r, self.cfg, self.max_rank)
            self._checked.add(r)

    def prepare(self, requests: Iterable[LoRARequest | None],
                busy: Iterable[int] = ()) -> None:
        """Makes every adapter of ``requests`` resident, evicting the least recently used
        ones no request needs (nor any sequence in flight: ``busy`` adapter ids). Every
        new adapter is read and checked before anything is evicted or loaded.

        Raises:
            SeesawError: a bad adapter (one line naming it), or more adapters than
                ``max_loras`` needed at once.
        """
        wanted: dict[int, LoRARequest] = {}
        for r in requests:
            if r is None:
                continue
            if not isinstance(r, LoRARequest):
                raise SeesawError(f"lora_request must be a LoRARequest or None, got "
                                  f"{type(r).__name__}")
            other = wanted.setdefault(r.lora_int_id, r)
            if other != r:
                raise SeesawError(f"lora_int_id {r.lora_int_id} names two adapters "
                                  f"({other.lora_name!r} and {r.lora_name!r})")
        keep = set(wanted) | set(busy)
        if len(keep) > self.max_loras:
            raise SeesawError(f"{len(keep)} LoRA adapters are needed at once but max_loras is "
                              f"{self.max_loras}: raise max_loras")
        new = {i: r for i, r in wanted.items()
               if i not in self.resident or self.resident[i].request != r}
        loaded = {i: load_adapter(r, self.cfg, self.max_rank) for i, r in new.items()}
        for i in wanted:
            if i in self.resident and i not in new:
                self.resident.move_to_end(i)
        for i, adapter in loaded.items():
            self._install(i, adapter, keep)

    def _install(self, lora_id: int, adapter: LoRAAdapter, keep: set[int]) -> None:
        old = self.resident.pop(lora_id, None)
        if old is not None:
            index = old.index
        else:
            free = set(range(1, self.max_loras + 1)) - {r.index for r in self.resident.values()}
            if not free:
                victim = next(i for i in self.resident if i not in keep)
                free = {self.resident.pop(victim).index}
            index = min(free)
        self._loads += 1
        self._put(index, adapter)
        self.resident[lora_id] = Resident(index, adapter.request,
                                          f"{adapter.request.lora_name}#{lora_id}@{self._loads}",
                                          adapter)

    def update(self, pairs: list[tuple[str, torch.Tensor]], lora_name: str | None) -> None:
        """Takes new tensors (PEFT names) for the resident adapter ``lora_name`` (or the
        only one resident): checked first, then the adapter is re-cut and gets a new
        prefix-cache key (requests added after it never reuse the old tensors' KV)."""
        named = [r for r in self.resident.values()
                 if lora_name is None or r.request.lora_name == lora_name]
        if len(named) != 1:
            which = f"LoRA adapter {lora_name!r} is not loaded" if lora_name is not None \
                else f"{len(self.resident)} LoRA adapters are loaded: give lora_name="
            raise SeesawError(f"update_weights: {which}")
        res = named[0]
        self._install(res.request.lora_int_id, updated(res.adapter, pairs), set())

    def of(self, request: LoRARequest | None) -> Resident | None:
        """The resident adapter of ``request`` (``None``: the base model)."""
        if request is None:
            return None
        return self.resident[request.lora_int_id]
