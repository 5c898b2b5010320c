"""`make demo`: five real daemons on 127.0.0.1 learn scikit-learn's digits together.

Run with ``python -m peerlearn.testnet.demo [--nodes 5] [--algo gossip-vca] [--rounds 25]``.
It prints progress every second and a summary per node (accuracy, rounds, bytes moved, join
time). On failure the node logs are kept and their location is printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peerlearn.errors import ControlError
from peerlearn.testnet.local import LocalSwarm

LEARN_TIMEOUT = 300.0  # seconds
PROGRESS_EVERY = 1.0  # seconds


def _progress(swarm: LocalSwarm, started: float) -> list[dict[str, Any]]:
    states = [swarm.learning(i) for i in range(swarm.size)]
    rounds = " ".join(f"{s.get('round', 0):3d}" for s in states)
    accs = " ".join(
        "  -  " if s.get("accuracy") is None else f"{s['accuracy']:.3f}" for s in states
    )
    print(
        f"  t={time.monotonic() - started:5.1f}s  rounds {rounds}  |  accuracy {accs}", flush=True
    )
    return states


def run_demo(root: Path, nodes: int, algo: str, rounds: int) -> None:
    swarm = LocalSwarm(
        root,
        nodes,
        swarm="demo",
        algo=algo,
        max_rounds=rounds,
        round_interval=0.5,
        sample_size=max(2, nodes - 2),
    )
    try:
        print(
            f"[1/3] starting {nodes} daemons on 127.0.0.1, swarm 'demo', {algo}, "
            f"{rounds} rounds; each trains on 1/{nodes} of the digits (logs in {root})"
        )
        swarm.start_all()
        for i in range(nodes):
            status = swarm.status(i)
            print(f"      node{i}: {status.get('peer_id', '?')} at {status.get('addrs', ['?'])[0]}")
        print("[2/3] learning (round and test accuracy of each node)")
        started = time.monotonic()
        deadline = started + LEARN_TIMEOUT
        while True:
            states = _progress(swarm, started)
            if all(s.get("phase") == "finished" for s in states):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"learning did not finish within {LEARN_TIMEOUT:.0f} s")
            time.sleep(PROGRESS_EVERY)
        print("[3/3] summary")
        print("      node  rounds  accuracy  MB out  MB in  joined in  peer")
        statuses = [swarm.status(i) for i in range(nodes)]
        for i, status in enumerate(statuses):
            learn = status["learning"]
            join = "-" if learn["join_seconds"] is None else f"{learn['join_seconds']:.2f} s"
            print(
                f"      node{i} {learn['round']:6d}  {learn['accuracy']:8.3f}  "
                f"{status['bytes_out'] / 1e6:6.2f} {status['bytes_in'] / 1e6:6.2f}  "
                f"{join:>9s}  {status['peer_id'][:20]}..."
            )
        accs = [s["learning"]["accuracy"] for s in statuses]
        moved = sum(s["bytes_out"] for s in statuses) / 1e6
        print(
            f"      mean accuracy {sum(accs) / len(accs):.3f}, worst {min(accs):.3f}; "
            f"{moved:.1f} MB of models moved in total"
        )
    finally:
        codes = swarm.stop_all()
        print(f"      daemons stopped, exit codes {codes}")
    if any(code != 0 for code in codes):
        raise RuntimeError(f"a daemon did not exit cleanly: {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument(
        "--algo", default="gossip-vca", choices=["gossip-vca", "gossip", "dpsgd", "modest"]
    )
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="peerlearn-demo-"))
    try:
        run_demo(root, args.nodes, args.algo, args.rounds)
    except (RuntimeError, TimeoutError, ControlError) as exc:
        print(f"demo FAILED: {exc}\nnode logs kept in {root}", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(root)
    print(f"demo OK: {args.nodes} daemons learned digits together")


if __name__ == "__main__":
    main()
