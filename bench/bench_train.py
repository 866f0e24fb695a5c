"""Training throughput of fastpop vs a torch.func ensemble, a grouped conv and a loop of nn.Modules, and
fastpop's evaluation: the same as `fastpop bench`.

    python bench/bench_train.py --nets 10,100,1000 --steps 20
"""

import sys

from fastpop.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
