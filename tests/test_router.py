"""The router's choice of workers, without processes: only healthy workers of the role, the
least loaded first."""

import asyncio

import pytest

from meshserve.server.router import NoWorker, Router


def test_picks_the_least_loaded_healthy_worker_of_the_role():
  async def main():
    router = Router(("p1:1", "p2:1"), ("d1:1", "d2:1", "d3:1"), None, 1 << 20)
    p1, p2, d1, d2, d3 = router.workers
    assert not router.serving
    with pytest.raises(NoWorker, match="no healthy prefill worker"):
      router.pick("prefill")
    for w in router.workers:
      w.healthy = True
    assert router.serving
    p1.calls.update({object(), object()})
    p2.calls.add(object())
    assert router.pick("prefill") is p2
    d1.calls.add(object())
    d2.calls.add(object())
    assert router.pick("decode") is d3
    d3.healthy = False  # the least loaded, but down
    assert router.pick("decode") in (d1, d2)
    d1.healthy = d2.healthy = False
    assert not router.serving
    with pytest.raises(NoWorker, match="no healthy decode worker"):
      router.pick("decode")
    await router.close()

  asyncio.run(main())
