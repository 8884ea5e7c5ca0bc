"""emu_fast.Engine on a tensor-parallel model: rank 0 schedules, the other ranks follow.

Every rank holds a share of every layer, so every rank must make the same decoder calls in the
same order (each call's all-reduces pair up across the ranks). Rank 0's engine takes the requests
and decides each iteration; before it makes a decoder call (admit, step, retire, reset) it
broadcasts the call with its inputs over the group, and each other rank's engine, a follower,
makes the same call on its own decoder. A step's input is each row's last output, which every
rank computed itself (the ranks' outputs are equal: the same all-reduced sums through the same
replicated head), so a step is broadcast as its shape alone and each follower feeds its own
outputs back. A call that fails on rank 0 fails the same way on the followers (the same inputs,
the same checks), which ignore it: rank 0 acts on it. While idle, rank 0 sends a heartbeat so
that the followers' wait for the next call stays within the group's timeout. If the group breaks (a rank died or hung past the timeout), rank 0's engine stops and
fails every request with the reason; a follower's engine ends with it.
"""
from __future__ import annotations

from typing import Optional


class GroupLost(BaseException):
    """The tensor-parallel group failed under the engine (a rank died or hung past the group's
    timeout): not a request's fault, and nothing can go on. A BaseException so that no request's
    error handling takes it for its own; the scheduler stops on it."""


def _leader_rank(tp) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(tp.group, 0)


class Leader:
    """Rank 0's decoder as its engine uses it: each call is broadcast to the followers first."""

    def __init__(self, decoder, tp):
        self._decoder, self._tp = decoder, tp

    def __getattr__(self, name):  # everything else: the decoder's own (max_batch, ...)
        return getattr(self._decoder, name)

    def _send(self, *call) -> None:
        import torch.distributed as dist

        try:
            dist.broadcast_object_list([call], src=_leader_rank(self._tp), group=self._tp.group,
                                       device=self._tp.collective_device(self._decoder.input_device))
        except Exception as e:  # noqa: BLE001 - any failure of the group ends the engine
            raise GroupLost(f"the tensor-parallel group failed (a rank may have died or hung past the group's "
                            f"timeout): {type(e).__name__}: {e}") from e

    def admit(self, embeds, mask, steps):
        self._send("admit", embeds.cpu(), mask.cpu(), steps)
        return self._decoder.admit(embeds.to(self._decoder.input_device), mask, steps)  # as the followers do

    def step(self, prev):
        self._send("step", tuple(prev.shape))  # the followers step from their own outputs
        return self._decoder.step(prev.to(self._decoder.output_device))

    def retire(self, rows):
        self._send("retire", list(rows))
        return self._decoder.retire(rows)

    def reset(self):
        self._send("reset")
        return self._decoder.reset()

    def heartbeat(self) -> None:
        self._send("noop")

    def close(self) -> None:
        """Best effort: a group that broke meanwhile has no followers left to tell."""
        try:
            self._send("close")
        except GroupLost:
            pass


def follow(decoder, tp) -> Optional[BaseException]:
    """A follower's loop: make every call rank 0's engine broadcasts, until it closes. Returns
    None when rank 0 closed its engine, or the error that broke the group (or that found this
    rank's rows no longer rank 0's)."""
    import torch
    import torch.distributed as dist

    src = _leader_rank(tp)
    last = None  # each active row's last output, in row order: the next step's input
    with torch.no_grad():
        while True:
            box = [None]
            try:
                dist.broadcast_object_list(box, src=src, group=tp.group,
                                           device=tp.collective_device(decoder.input_device))
            except Exception as e:  # noqa: BLE001 - the group is gone: the follower ends with it
                return e
            op, *args = box[0]
            if op == "close":
                return None
            if op == "step" and (last is None or tuple(last.shape) != tuple(args[0])):
                # Rank 0 steps rows this rank does not hold as it does: nothing can pair up now.
                return RuntimeError(f"emu_fast.Engine follower: rank 0 steps rows of shape {tuple(args[0])} but "
                                    f"this rank holds {None if last is None else tuple(last.shape)}")
            try:
                if op == "admit":
                    embeds, mask, steps = args
                    first = decoder.admit(embeds.to(decoder.input_device), mask, steps)
                    last = first if last is None else torch.cat([last, first])
                elif op == "step":
                    last = decoder.step(last)
                elif op == "retire":
                    decoder.retire(args[0])
                    gone = set(args[0])
                    if last is not None:
                        last = last[[i for i in range(last.shape[0]) if i not in gone]]
                elif op == "reset":
                    decoder.reset()
                    last = None
            except Exception:  # noqa: BLE001 - rank 0 meets the same error and acts on it
                pass
