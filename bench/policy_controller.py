"""`slinfer-controller` with its balancer policy chosen on the command line, for the routing benchmark.

The controller builds one `Balancer()` with the default policy (least outstanding; prefix affinity is a
per-model config switch). Until a `[[models]].balancer` config key exists, this runs the unchanged controller
with `Balancer(policy=...)` in its place, so round-robin can be measured through the real gateway. It changes
nothing else.

    python bench/policy_controller.py --balancer round_robin --config slinfer.toml
"""

from __future__ import annotations

import argparse
import functools
import sys

from slinfer.controller import main as controller_main
from slinfer.controller.balancer import POLICIES, Balancer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--balancer", choices=POLICIES, required=True)
    args, rest = parser.parse_known_args()
    controller_main.Balancer = functools.partial(Balancer, policy=args.balancer)  # type: ignore[misc]
    return controller_main.main(rest)


if __name__ == "__main__":
    sys.exit(main())
