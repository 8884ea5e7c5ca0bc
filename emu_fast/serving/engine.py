"""emu_fast.Engine: one accelerated model serving many image requests at once.

A decode step reads every weight once whatever the batch, so rows that share a step cost little
more than one. The engine batches requests at the level of steps (in-flight batching, as LLM
servers do for tokens): a scheduler thread owns the model's EmuDecoder; each iteration it admits
waiting requests into free rows (a prefill of just those rows: the rows in progress keep their
cache), runs one decode step for every active row, each at its own step of its own loop, and
retires the rows that have their n outputs. A request's result is what its own generate_image
computes: its rows keep their own positions (its padding, as the tokenizer made it), whatever
shares the batch and whenever it arrived.

    engine = emu_fast.Engine(model)              # an accelerated model or the Emu2-Gen pipeline
    future = engine.submit("a photo of a cat")   # concurrent.futures.Future of [1, n, D]
    embeds = await engine.generate_async("a cat")  # asyncio
    engine.close()                               # or: with emu_fast.Engine(model) as engine: ...

While the engine is open the model's generate_image goes through it (from any thread: a
threaded service gains without code changes) and the decoder belongs to it.

A tensor-parallel model (accelerate(model, tensor_parallel=group)): every rank opens an engine on
its model; rank 0's takes the requests and schedules, the others follow it call for call
(emu_fast.serving.tensor_parallel), and their close() returns when rank 0's engine has closed.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Sequence

import torch

from ..decoder import EmuDecoder
from ..dropin.families import DEFAULT_PLACEHOLDER
from .tensor_parallel import GroupLost, Leader, follow


class EngineFull(RuntimeError):
    """The engine's queue is full: the request was refused, nothing else changed."""


class EngineClosed(RuntimeError):
    """The engine is closed (or closing): it takes no new requests."""


@dataclass
class _Request:
    future: Future
    embeds: torch.Tensor  # [b, T, H] on the decoder's input device
    mask: torch.Tensor    # [b, T]
    n: int
    deadline: Optional[float]
    submitted: float
    admitted: float = 0.0
    prefilled: float = 0.0
    outputs: List[torch.Tensor] = field(default_factory=list)  # one [b, D] per step so far

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]


def _use_decoder_device(decoder) -> None:
    """A new thread starts on GPU 0: the scheduler's and the follower's work (their collectives
    included) goes to the decoder's own GPU."""
    device = torch.device(decoder.input_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def through_engine(owner, embeds: torch.Tensor, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """A generate_image call on `owner` (an accelerated model or a from_pretrained generator):
    its result through the engine serving `owner`, or None when none is (or the one that was has
    closed meanwhile: waited for, so the decoder is free for the caller to run it)."""
    engine = getattr(owner, "_emu_fast_engine", None)
    if engine is None:
        return None
    try:
        return engine.submit_inputs(embeds, mask).result()
    except EngineClosed:
        engine.close()
        return None


class _Source:
    """What the engine serves: the object whose generate_image it takes over (`owner`), its
    decoder and n, and how a request's prompts become the decoder's inputs."""

    def __init__(self, obj):
        from ..loading.generator import EmuGenerator

        if isinstance(obj, EmuGenerator):
            self.owner, self.decoder, self.n = obj, obj.decoder, obj.n
            self._generator = obj
            return
        model = getattr(obj, "multimodal_encoder", None) if not hasattr(obj, "emu_fast_decoder") else obj
        if model is None or not isinstance(getattr(model, "emu_fast_decoder", None), EmuDecoder):
            raise TypeError(f"emu_fast.Engine: {type(obj).__name__} is not accelerated: call emu_fast.accelerate on "
                            "it first (an Emu model or the Emu2-Gen pipeline), or load it with "
                            "emu_fast.from_pretrained")
        self.owner, self.decoder, self.n = model, model.emu_fast_decoder, model._emu_fast_n
        self._generator = None

    def inputs(self, text, image, tokenizer, placeholder):
        """(inputs_embeds, attention_mask) for one request, checked as generate_image checks it."""
        texts = [text] if isinstance(text, str) else text
        if self._generator is not None:
            if tokenizer is not None:
                raise TypeError("emu_fast.Engine: a from_pretrained generator has its own tokenizer; "
                                "tokenizer= is not taken")
            return self._generator.prompt_inputs(texts, image, DEFAULT_PLACEHOLDER if placeholder is None else placeholder)
        from ..dropin.accelerate import prompt_inputs

        model = self.owner
        family = model._emu_fast_family
        if placeholder is None:
            placeholder = family.signature().parameters["placeholder"].default
        return prompt_inputs(model, texts, family.tokenizer(model, tokenizer), image, placeholder)


class Engine:
    """Serves requests on an accelerated model (or pipeline) from a scheduler thread.

    max_queue: requests waiting at most (more are refused with EngineFull). max_admit: requests
    prefilled per iteration at most, so rows in progress are not starved by a burst. timeout:
    seconds a request may take from submission (None: no limit); a request past it fails with
    TimeoutError and frees its rows. The batch is bounded by the decoder's max_batch."""

    def __init__(self, model, *, max_queue: int = 256, max_admit: int = 8, timeout: Optional[float] = None,
                 heartbeat: float = 1.0):
        for name, value in (("max_queue", max_queue), ("max_admit", max_admit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"emu_fast.Engine: {name} must be a positive int, got {value!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"emu_fast.Engine: timeout must be positive seconds or None, got {timeout!r}")
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not heartbeat > 0:
            raise ValueError(f"emu_fast.Engine: heartbeat must be positive seconds, got {heartbeat!r}")
        self._source = _Source(model)
        self._model = self._source.owner
        if getattr(self._model, "_emu_fast_engine", None) is not None:
            raise RuntimeError("emu_fast.Engine: this model is served by another open Engine; close that one first")
        self._decoder: EmuDecoder = self._source.decoder
        # Tensor parallelism (heartbeat: seconds between rank 0's messages while it is idle, well
        # within the group's timeout): rank 0 schedules, the others follow.
        tp = self._decoder.tensor_parallel
        self._heartbeat = None if tp is None else heartbeat
        self._follower = tp is not None and tp.rank != 0
        self._group_error: Optional[BaseException] = None
        self._stopped = ""  # why the scheduler stopped, if it failed
        if tp is not None and tp.rank == 0:
            self._decoder = Leader(self._decoder, tp)
        self._n = self._source.n
        self._max_queue, self._max_admit, self._timeout = max_queue, max_admit, timeout
        self._max_rows = self._decoder.max_batch
        self._cv = threading.Condition()
        self._queue: Deque[_Request] = collections.deque()
        self._active: List[_Request] = []  # in row order: request i holds the next .rows rows
        self._closing = False
        self._cancel_on_close = False
        self._stats = collections.Counter()
        self._latencies: Deque[tuple] = collections.deque(maxlen=1024)  # (queue, prefill, decode) seconds
        self._started = time.monotonic()
        try:
            self._decoder.reset()
        except GroupLost as e:  # rank 0: the followers are gone before the engine began
            raise RuntimeError(f"emu_fast.Engine: {e}") from None
        target, name = (self._follow, "emu_fast.Engine follower") if self._follower else (self._run, "emu_fast.Engine")
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._model._emu_fast_engine = self
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def submit(self, text, image: Optional[torch.Tensor] = None, *, tokenizer=None,
               placeholder: Optional[str] = None, timeout: Optional[float] = None) -> Future:
        """A request for `text` (a prompt, or a list of prompts generated together as
        generate_image would) with optional prompt images, as the model's generate_image takes
        them. Returns a Future of [len(text), n, D]; a bad prompt fails only its future."""
        future: Future = Future()
        try:
            embeds, mask = self._source.inputs(text, image, tokenizer, placeholder)
            self._enqueue(future, embeds, mask, timeout)
        except (EngineFull, EngineClosed):
            raise
        except Exception as e:  # the request's own fault: its future carries it
            future.set_exception(e)
        return future

    def submit_inputs(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *,
                      timeout: Optional[float] = None) -> Future:
        """A request already embedded ([b, T, H] and its [b, T] mask, as EmuDecoder.generate takes
        them). Returns a Future of [b, n, D]."""
        future: Future = Future()
        self._enqueue(future, inputs_embeds, attention_mask, timeout)
        return future

    def _follow(self) -> None:
        _use_decoder_device(self._decoder)
        try:
            self._group_error = follow(self._decoder, self._decoder.tensor_parallel)
        finally:
            self._detach()

    def _detach(self) -> None:
        """The thread's end: closed for good, and the model's generate_image its own again."""
        with self._cv:
            self._closing = True
        if getattr(self._model, "_emu_fast_engine", None) is self:
            self._model._emu_fast_engine = None

    def generate(self, texts: Sequence[str], image: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Blocking: each prompt of `texts` as its own request (they share steps with each other and
        with everything else running); [len(texts), n, D]. Prompt images go with a single prompt."""
        if isinstance(texts, str):
            texts = [texts]
        if image is not None and len(texts) != 1:
            raise ValueError("emu_fast.Engine.generate: prompt images go with one prompt; submit() the others")
        futures = [self.submit(t, image, **kwargs) for t in texts]
        return torch.cat([f.result() for f in futures])

    async def generate_async(self, text, image: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """For asyncio services: the request's result; cancelling the awaiting task cancels the
        request (its rows are freed at the next iteration)."""
        return await asyncio.wrap_future(self.submit(text, image, **kwargs))

    def _enqueue(self, future: Future, embeds, mask, timeout):
        if self._follower:
            raise RuntimeError(f"emu_fast.Engine: rank {self._decoder.tensor_parallel.rank} follows rank 0's engine "
                               "(tensor parallelism): submit requests on rank 0")
        if not isinstance(embeds, torch.Tensor) or not isinstance(mask, torch.Tensor):
            raise TypeError("emu_fast.Engine: inputs_embeds and attention_mask must be tensors")
        if embeds.dim() != 3 or mask.dim() != 2 or mask.shape != embeds.shape[:2]:
            raise ValueError(f"emu_fast.Engine: inputs_embeds must be [b, T, H] with a [b, T] mask, got "
                             f"{tuple(embeds.shape)} and {tuple(mask.shape)}")
        if self._max_rows is not None and embeds.shape[0] > self._max_rows:
            raise ValueError(f"emu_fast.Engine: a request of {embeds.shape[0]} prompts exceeds the decoder's "
                             f"max_batch of {self._max_rows}")
        timeout = self._timeout if timeout is None else timeout
        now = time.monotonic()
        request = _Request(future, embeds, mask, self._n, None if timeout is None else now + timeout, now)
        with self._cv:
            if self._closing:
                raise EngineClosed("emu_fast.Engine is closed" + (f" (it stopped: {self._stopped})" if self._stopped else ""))
            if len(self._queue) >= self._max_queue:
                self._stats["refused"] += 1
                raise EngineFull(f"emu_fast.Engine: {len(self._queue)} requests are waiting (max_queue); "
                                 "try again later")
            self._queue.append(request)
            self._stats["submitted"] += 1
            self._cv.notify()

    # ------------------------------------------------------------------ lifecycle and stats

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests; finish the ones queued and running (or, with cancel=True, cancel
        them), then stop the scheduler. A result already computed is never lost."""
        with self._cv:
            self._closing = True
            self._cancel_on_close = self._cancel_on_close or cancel
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()  # a follower: until rank 0's engine closes
        if self._follower and self._group_error is not None:
            raise RuntimeError(f"emu_fast.Engine: the tensor-parallel group failed while following rank 0: "
                               f"{self._group_error}") from self._group_error

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> dict:
        """Queue depth, active rows, steps and images per second since the start, request counts,
        and the median queue / prefill / decode seconds of recent requests."""
        with self._cv:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            lat = list(self._latencies)
            out = dict(queued=len(self._queue), active_requests=len(self._active),
                       active_rows=sum(r.rows for r in self._active), steps_per_s=self._stats["steps"] / elapsed,
                       images_per_s=self._stats["rows_done"] / elapsed, **{k: self._stats[k] for k in (
                           "submitted", "completed", "failed", "cancelled", "timed_out", "refused", "steps")})
        for i, name in enumerate(("queue_s", "prefill_s", "decode_s")):
            values = sorted(x[i] for x in lat)
            out[f"median_{name}"] = values[len(values) // 2] if values else None
        return out

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        _use_decoder_device(self._decoder)
        group_lost = False
        try:
            with torch.no_grad():
                while self._iteration():
                    pass
        except BaseException as e:  # the engine cannot go on: fail everything, never hang
            group_lost = isinstance(e, GroupLost)
            self._stopped = f"{type(e).__name__}: {e}"
            self._fail_all(RuntimeError(f"emu_fast.Engine stopped: {self._stopped}"))
        finally:
            if isinstance(self._decoder, Leader) and not group_lost:
                self._decoder.close()  # the followers' engines close with this one
            self._detach()

    def _iteration(self) -> bool:
        with self._cv:
            idle = False
            while not self._queue and not self._active and not self._closing and not idle:
                idle = not self._cv.wait(self._heartbeat)  # None: no timeout (no followers to keep)
        if idle:
            self._decoder.heartbeat()
            return True
        with self._cv:
            if self._closing and self._cancel_on_close:
                for r in list(self._queue) + self._active:
                    r.future.cancel()
                self._queue.clear()
            if self._closing and not self._queue and not self._active:
                return False
        self._drop_finished_elsewhere()
        # Rows in progress step first, then the waiting requests are admitted: the clients of the
        # requests that finished last iteration resubmit during this step, and are prefilled
        # together (a prefill of several prompts costs far less per prompt than one each, and
        # each prefill holds up every row in progress). An idle engine admits at once.
        if self._active:
            self._step()
        self._admit()
        return True

    def _drop_finished_elsewhere(self) -> None:
        """Rows of requests cancelled or past their deadline are retired."""
        now = time.monotonic()
        cancelled = [r for r in self._active if r.future.cancelled()]
        late = [r for r in self._active if not r.future.done() and r.deadline is not None and now > r.deadline]
        if cancelled or late:
            self._retire(cancelled + late)
        with self._cv:
            self._stats["cancelled"] += len(cancelled)
        for r in late:
            self._finish(r, error=TimeoutError(f"emu_fast.Engine: the request took over its timeout "
                                               f"({r.deadline - r.submitted:.3g} s)"), key="timed_out")

    def _take_waiting(self) -> List[_Request]:
        free = None if self._max_rows is None else self._max_rows - sum(r.rows for r in self._active)
        taken = []
        with self._cv:
            while self._queue and len(taken) < self._max_admit:
                r = self._queue[0]
                if r.future.cancelled():
                    self._queue.popleft()
                    self._stats["cancelled"] += 1
                    continue
                if r.deadline is not None and time.monotonic() > r.deadline:
                    self._queue.popleft()
                    self._finish(r, error=TimeoutError("emu_fast.Engine: the request waited past its timeout"),
                                 key="timed_out")
                    continue
                if free is not None and r.rows > free:
                    break  # first come, first served: it waits for rows to free up
                taken.append(self._queue.popleft())
                free = None if free is None else free - r.rows
        return taken

    def _admit(self) -> None:
        taken = self._take_waiting()
        if not taken:
            return
        try:
            self._admit_group(taken)
        except Exception:  # one of them failed: each alone, so a bad one fails only itself
            for r in taken:
                self._admit_group([r])

    def _admit_group(self, group: List[_Request]) -> None:
        try:
            t0 = time.monotonic()
            width = max(r.embeds.shape[1] for r in group)
            # Each request keeps its own padding: right-padded to the widest, its rows keep their
            # first positions and lengths (the decoder takes one run of ones a row).
            embeds = torch.cat([torch.nn.functional.pad(r.embeds, (0, 0, 0, width - r.embeds.shape[1]))
                                for r in group])
            mask = torch.cat([torch.nn.functional.pad(r.mask.to("cpu", torch.long), (0, width - r.mask.shape[1]))
                              for r in group])
            first = self._decoder.admit(embeds, mask, self._n - 1)
        except Exception as e:
            if len(group) == 1:
                self._finish(group[0], error=e, key="failed")
                return
            raise
        now = time.monotonic()
        row = 0
        for r in group:
            r.admitted, r.prefilled = t0, now
            r.outputs.append(first[row:row + r.rows])
            row += r.rows
        with self._cv:
            self._active.extend(group)
        self._complete([r for r in group if len(r.outputs) == r.n])

    def _step(self) -> None:
        prev = torch.cat([r.outputs[-1] for r in self._active])
        try:
            out = self._decoder.step(prev)
        except Exception as e:  # the step failed: the requests in it fail, the engine goes on
            with self._cv:
                failed, self._active = self._active, []
            self._decoder.reset()
            for r in failed:
                self._finish(r, error=e, key="failed")
            return
        self._stats["steps"] += 1
        row = 0
        done = []
        for r in self._active:
            r.outputs.append(out[row:row + r.rows])
            row += r.rows
            if len(r.outputs) == r.n:
                done.append(r)
        self._complete(done)

    def _complete(self, done: List[_Request]) -> None:
        """Requests with their n outputs: their rows are freed first, then their futures resolved
        (so a caller woken by its result sees the engine without it)."""
        if done:
            self._retire(done)
            for r in done:
                self._finish(r)

    def _retire(self, requests: List[_Request]) -> None:
        rows, row = [], 0
        gone = set(map(id, requests))
        for r in self._active:
            if id(r) in gone:
                rows.extend(range(row, row + r.rows))
            row += r.rows
        self._decoder.retire(rows)
        with self._cv:
            self._active = [r for r in self._active if id(r) not in gone]

    def _finish(self, r: _Request, error: Optional[BaseException] = None, key: str = "completed") -> None:
        try:
            if error is not None:
                r.future.set_exception(error)
            else:
                r.future.set_result(torch.stack(r.outputs, dim=1))
        except InvalidStateError:  # cancelled meanwhile by its caller
            key = "cancelled"
        with self._cv:
            self._stats[key] += 1
            if key == "completed":
                self._stats["rows_done"] += r.rows
                now = time.monotonic()
                self._latencies.append((r.admitted - r.submitted, r.prefilled - r.admitted, now - r.prefilled))

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            waiting = list(self._queue) + list(self._active)
            self._queue.clear()
            self._active = []
        for r in waiting:
            if not r.future.done():
                self._finish(r, error=error, key="failed")
