"""The `meshserve` CLI with a fault the tests own, not the product:

    python tests/fault_server.py FAULT_FILE serve ...

runs `meshserve serve ...` with every engine step failing once FAULT_FILE exists (the core then
dies as on any failed step). The CLI itself is the installed one, untouched."""

import os
import sys

from meshserve.engine.engine import Engine
from meshserve.server.cli import main

fault = sys.argv.pop(1)
step = Engine.step


def failing_step(self):
  if os.path.exists(fault):
    raise RuntimeError(f"fault injected through {fault}")
  return step(self)


Engine.step = failing_step
sys.exit(main())
