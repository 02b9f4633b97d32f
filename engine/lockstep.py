"""Multi-host serving: process 0 schedules, every other process follows in lockstep.

A model that spans the hosts of a TPU slice runs one SPMD program per step, which every
process must dispatch with the same host arrays. Process 0 runs the server, the front end and
the engine core. Each turn of its core (the inbox messages it took: adds, aborts, a stop) is
published to the `jax.distributed` coordination service's key-value store under the turn's
number. A follower (every other process) reads the turns in order, applies the same messages
to its own `Engine` and steps whenever that leaves it work, as the core does. The engines are
deterministic (unseeded requests draw their seeds in arrival order, the scheduler and the page
allocator depend on nothing else), so every process schedules, pages and samples alike, and
only these few bytes a turn cross between hosts: never a token, a page table or a logit. Each
turn starts with a check of the state it applies to (process 0's open requests and steps): a
follower out of step fails at once rather than run a program its peers do not. A failing
process 0 publishes a stop turn, best effort.

Liveness: a follower's heartbeat starts once it has compiled its steps and follows; process
0's core is ready (and the server SERVING) only once every follower's has. `Publisher.watch`
calls back once a heartbeat has not moved for DEAD_AFTER_S (a dead or hung host, whose
collectives would wait forever), and the server then fails every stream UNAVAILABLE and turns
NOT_SERVING.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable

from meshserve.engine.params import Constraint, SamplingParams

log = logging.getLogger(__name__)

PREFIX = "meshserve/lockstep"
HEARTBEAT_S = 0.5
DEAD_AFTER_S = 3.0
KEEP_TURNS = 4096  # published turns kept in the store; older ones are deleted


def _client():
  from jax._src import distributed  # the coordination service's client (jax.distributed)

  if distributed.global_state.client is None:
    raise RuntimeError("lockstep needs jax.distributed initialized (--coordinator-address)")
  return distributed.global_state.client


def add_message(request_id: str, token_ids, params: SamplingParams, cache_salt: str) -> list:
  """An add, as a turn carries it (JSON data); a constraint is compiled again on arrival."""
  return ["add", request_id, list(token_ids), dataclasses.asdict(params), cache_salt]


def params_of(data: dict) -> SamplingParams:
  constraint = data.pop("constraint")
  return SamplingParams(**data, constraint=constraint and Constraint(**constraint))


class Publisher:
  """Process 0's side: publishes each core turn, and watches the followers' heartbeats."""

  def __init__(self, num_processes: int):
    self.client = _client()
    self.followers = range(1, num_processes)
    self.turn = 0
    self._lock = threading.Lock()  # the core's thread publishes; a failing core's stop too

  def wait_followers(self, cancel: threading.Event) -> None:
    """Returns once every follower has loaded its model, compiled its steps and started
    following (its first heartbeat), or once `cancel` is set."""
    waiting = set(self.followers)
    while waiting and not cancel.wait(HEARTBEAT_S):
      waiting = {p for p in waiting if self._beat(p) is None}
    log.info("every follower is following" if not waiting else "stopped waiting for followers")

  def _beat(self, process: int) -> str | None:
    try:
      return self.client.key_value_try_get(f"{PREFIX}/heartbeat/{process}")
    except Exception:  # noqa: BLE001 - no heartbeat yet: it is still warming up
      return None

  def __call__(self, messages: list, engine=None) -> None:
    """Publishes one turn of the core: the messages it is about to apply, in order, after a
    check of the state they apply to (`engine`'s open requests and steps), which a follower
    must match."""
    if engine is not None:
      messages = [["check", len(engine.requests), engine.num_steps], *messages]
    with self._lock:
      self.client.key_value_set(f"{PREFIX}/turn/{self.turn}", json.dumps(messages))
      if self.turn >= KEEP_TURNS:
        self.client.key_value_delete(f"{PREFIX}/turn/{self.turn - KEEP_TURNS}")
      self.turn += 1

  def watch(self, on_dead: Callable[[str], None]) -> threading.Thread:
    """Calls on_dead(reason) once, on a daemon thread, when a follower's heartbeat stops."""

    def run():
      seen = {p: (None, time.monotonic()) for p in self.followers}
      while True:
        time.sleep(HEARTBEAT_S)
        for p in self.followers:
          beat = self._beat(p)
          last, since = seen[p]
          if beat != last:
            seen[p] = (beat, time.monotonic())
          elif last is not None and time.monotonic() - since > DEAD_AFTER_S:
            on_dead(f"process {p} stopped answering (no heartbeat for {DEAD_AFTER_S:g}s)")
            return

    thread = threading.Thread(target=run, name="meshserve-lockstep-watch", daemon=True)
    thread.start()
    return thread


def follow(engine, process_id: int) -> None:
  """A follower's loop: applies process 0's turns to `engine` and steps as its core does,
  until the stop turn. Returns then."""
  client = _client()
  stop = threading.Event()

  def heartbeat():
    beat = 0
    while not stop.wait(HEARTBEAT_S):
      beat += 1
      client.key_value_set(f"{PREFIX}/heartbeat/{process_id}", str(beat), allow_overwrite=True)

  threading.Thread(target=heartbeat, name="meshserve-heartbeat", daemon=True).start()
  turn = 0
  try:
    while True:
      try:
        text = client.blocking_key_value_get(f"{PREFIX}/turn/{turn}", 60_000)
      except Exception as e:
        if "DEADLINE_EXCEEDED" in str(e):  # no turn for a minute: an idle server
          continue
        raise  # the coordination service is gone: process 0 with it
      turn += 1
      for message in json.loads(text):
        if message[0] == "check":
          mine = [len(engine.requests), engine.num_steps]
          if message[1:] != mine:
            raise RuntimeError(
              f"turn {turn - 1}: process 0 has {message[1:]} (requests, steps), this process "
              f"{mine}: out of step"
            )
          continue
        if message[0] == "stop":
          for request_id in list(engine.requests):
            engine.abort(request_id)
          return
        _apply(engine, message)
      if engine.has_unfinished():
        engine.step()
  finally:
    stop.set()


def _apply(engine, message: list) -> None:
  try:
    if message[0] == "add":
      _, request_id, token_ids, params, salt = message
      engine.add_request(token_ids, params_of(params), request_id, cache_salt=salt)
    else:
      engine.abort(message[1])
  except ValueError as e:  # refused on process 0 too, or the next turn's check says not
    log.warning("turn message %s refused: %s", message[:2], e)
