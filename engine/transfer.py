"""KV between processes: `jax.experimental.transfer`, from a prefill worker's devices straight
onto a decode worker's.

The prefill side cuts the packed KV [2, L, n, Z, K, D] along the kv heads into as many pieces
as the decode layout has kv-head shards (one when it keeps KV replicated), puts each piece on
one of its devices and offers them under a transfer id (`await_pull`). The decode side pulls
piece i onto a device that holds kv-head shard i in its own layout (copying it on to the
devices that hold the same shard) and assembles the array in its sharding, ready to be
written into its pool. Neither side needs the other's layout beyond that count.

A transfer is named by (the prefill server's address, transfer id), which a gRPC control
message carries; see server/stages.py.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading

import jax
import numpy as np
from jax.experimental import transfer
from jax.sharding import SingleDeviceSharding

from meshserve.engine.handoff import PackedKV

log = logging.getLogger(__name__)

HEADS = PackedKV.KV_HEADS  # the pieces' cut


def kv_head_shards(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> int:
  """How many distinct kv-head slices a packed KV array of `shape` has in `sharding`."""
  slices = {
    index[HEADS].indices(shape[HEADS]) for index in sharding.devices_indices_map(shape).values()
  }
  return len(slices)


@dataclasses.dataclass(frozen=True)
class Offer:
  """KV a prefill worker holds for one pull: its id and how to ask for its pieces."""

  transfer_id: int
  piece_shape: tuple[int, ...]
  dtype: np.dtype
  num_pieces: int


class TransferServer:
  """This process's end of the KV transfers: offers KV to pull, and pulls KV offered by others.
  One per process; it listens on `host` (any free port) and `address` is what peers dial."""

  def __init__(self, host: str = "127.0.0.1"):
    client = jax.local_devices()[0].client
    self._server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
    self.address: str = self._server.address()
    self._connections: dict[str, transfer.TransferConnection] = {}
    self._lock = threading.Lock()

  def offer(self, kv: jax.Array, num_pieces: int) -> Offer:
    """Offers `kv` for one pull, cut into `num_pieces` along the kv heads. Returns at once; the
    pieces stay alive until pulled (or `withdraw`n)."""
    heads = kv.shape[HEADS]
    if heads % num_pieces:
      raise ValueError(f"kv_shards: {num_pieces} does not divide {heads} kv heads")
    width = heads // num_pieces
    devices = sorted(kv.sharding.device_set, key=lambda d: d.id)
    pieces = []
    for i in range(num_pieces):
      piece = jax.lax.slice_in_dim(kv, i * width, (i + 1) * width, axis=HEADS)
      pieces.append(jax.device_put(piece, devices[i % len(devices)]))
    transfer_id = secrets.randbits(63)
    self._server.await_pull(transfer_id, pieces)
    return Offer(transfer_id, tuple(pieces[0].shape), np.dtype(kv.dtype), num_pieces)

  def withdraw(self, offer: Offer) -> None:
    """Drops an offer nobody will pull (the request ended before its decode stage pulled): it
    pulls the pieces itself, so the server lets go of them."""
    device = SingleDeviceSharding(jax.local_devices()[0])
    specs = [
      jax.ShapeDtypeStruct(offer.piece_shape, offer.dtype, sharding=device)
    ] * offer.num_pieces
    self.connect(self.address).pull(offer.transfer_id, specs)

  def fetch(self, address: str, offer: Offer):
    """The KVFetch of an offer at `address`: pulls its pieces into the caller's sharding."""

    def fetch(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.Array:
      if kv_head_shards(sharding, shape) != offer.num_pieces:
        raise ValueError(
          f"kv: the offer has {offer.num_pieces} pieces, the decode layout has "
          f"{kv_head_shards(sharding, shape)} kv-head shards"
        )
      width = shape[HEADS] // offer.num_pieces
      expected = (*shape[:HEADS], width, *shape[HEADS + 1 :])
      if offer.piece_shape != expected:
        raise ValueError(f"kv: pieces of {offer.piece_shape}, expected {expected}")
      if tuple(sharding.shard_shape(shape)) != offer.piece_shape:
        raise ValueError(f"kv: the decode layout splits {shape} other than along the kv heads")
      holders: dict[int, list[jax.Device]] = {}  # piece -> the devices that hold it
      for device, index in sharding.devices_indices_map(shape).items():
        start = index[HEADS].indices(shape[HEADS])[0]
        holders.setdefault(start // width, []).append(device)
      specs = [
        jax.ShapeDtypeStruct(
          offer.piece_shape, offer.dtype, sharding=SingleDeviceSharding(holders[i][0])
        )
        for i in range(offer.num_pieces)
      ]
      pieces = self.connect(address).pull(offer.transfer_id, specs)
      on_device = {}
      for i, piece in enumerate(pieces):
        for device in holders[i]:
          on_device[device] = piece if device == holders[i][0] else jax.device_put(piece, device)
      arrays = [on_device[d] for d in sharding.addressable_devices_indices_map(shape)]
      return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    return fetch

  def connect(self, address: str) -> transfer.TransferConnection:
    """The (cached) connection to the transfer server at `address`; the first call dials."""
    with self._lock:
      connection = self._connections.get(address)
      if connection is None:
        connection = self._connections[address] = self._server.connect(address)
      return connection
