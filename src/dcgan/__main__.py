"""`python -m dcgan [overrides]` is `gan-train`: the form torchrun takes (`torchrun --nproc_per_node=N -m dcgan
...`)."""

from dcgan.cli import train_main

train_main()
