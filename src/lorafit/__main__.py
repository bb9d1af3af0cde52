"""`python -m lorafit ...`: what torchrun starts in each process (torchrun --nproc-per-node 4 -m lorafit train X)."""

from lorafit.cli import main

if __name__ == "__main__":
    main()
