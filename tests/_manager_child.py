"""A training-loop stand-in for the kill -9 tests of test_checkpoint_manager.py.

Usage: ``python _manager_child.py ROOT KEEP_LAST``. Prints ``ready`` once torch is imported,
then saves steps 1, 2, 3... forever through ``CheckpointManager`` in the background, every
weight and momentum buffer of step ``s`` filled with ``s``, so a mixed checkpoint shows. The
parent kills it with SIGKILL at a random moment.
"""

import sys

import torch

import bigmodel


def main() -> None:
    root, keep_last = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()  # momentum buffers exist
    manager = bigmodel.CheckpointManager(root, keep_last=keep_last, max_shard_size="600KB")
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
                optimizer.state[p]["momentum_buffer"].fill_(step)
        manager.save(step, model, optimizer, extra={"step": step})


if __name__ == "__main__":
    main()
