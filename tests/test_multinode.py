"""Multi-node for real: two torchrun invocations acting as two nodes on 127.0.0.1 (gloo) train
exactly what one process trains with the same global batch. The command is the README's
multi-node command, with 1 process per node instead of 8."""
import os
import socket
import subprocess
import sys

import torch

from scripts import base_train
from test_base_train import TINY, weights  # the same tiny run as the single-node tests


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process(base_dir):
    args = TINY + ["--num-iterations", "4", "--total-batch-size", "256"]  # 2 data streams either way
    base_train.main(args + ["--model-tag", "one"])
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "scripts.base_train", *args, "--model-tag", "two-nodes"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd(),
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 process(es)" in outs[0]  # one process per node, two nodes: a world of 2
    one, two = weights(base_dir, "one", 4), weights(base_dir, "two-nodes", 4)
    for k in one:  # fp32 on CPU; averaging two gradients is exact in either order
        assert torch.allclose(one[k].float(), two[k].float(), rtol=1e-5, atol=1e-6), k
